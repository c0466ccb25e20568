from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="minitune",
    version="0.1.0",
    description="A small, readable PyTorch library for fine-tuning GPT-2 and Mistral-family models",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["minitune", "minitune.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4.3",
        "tokenizers>=0.19",
        "huggingface-hub>=0.25",
        "numpy",
        "tqdm",
        "jinja2>=3.1.6",  # sandbox fixes: chat templates come from the hub
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "dev": ["pytest", "transformers>=5", "peft", "bitsandbytes>=0.50", "matplotlib"],
        "plot": ["matplotlib"],
    },
)
