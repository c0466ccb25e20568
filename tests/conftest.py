"""Shared test helpers: tiny random Hugging Face models on disk, and the real fixture files."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this when
# a kernel is defined, so it is set here, before any test imports minitune.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example_module(relative_path: str):
    """A script under examples/ imported as a module (examples/ is not a package), once per session. examples/
    goes on sys.path, as when a script runs, so the examples that import another one find it."""
    if str(EXAMPLES) not in sys.path:
        sys.path.append(str(EXAMPLES))
    name = Path(relative_path).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / relative_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while a class is built
        spec.loader.exec_module(module)
    return sys.modules[name]


# two gloo processes on the CPU, one thread each
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run_command(command: list[str], timeout: float = 300, cwd: Path | None = None) -> tuple[int, str]:
    """(exit status, stderr) of a command run as a user would; under torchrun, one thread per process. On a
    timeout the whole process group goes, torchrun's workers included."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if command[:len(TORCHRUN)] == TORCHRUN else None
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, cwd=cwd)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"{' '.join(command)} did not finish in {timeout} s:\n{stderr[-3000:]}")
    return proc.returncode, stderr


def run_example(script: str, out: Path, *args: str) -> list[dict]:
    """examples/<script>'s main() into `out`, in this process, as `python examples/<script>` runs it; its
    metrics.jsonl."""
    example_module(script).main(["--out", str(out), *args])
    return read_metrics(out)


def example_stops(script: str, out: Path, *args: str) -> str:
    """The message examples/<script>'s main() stops with (the last line the script prints)."""
    with pytest.raises((SystemExit, ValueError)) as stop:
        example_module(script).main(["--out", str(out), *args])
    return str(stop.value)


def resumable_copy(run_dir: Path, to: Path, logged_after_the_save: str = "") -> Path:
    """A folder holding `run_dir`'s checkpoints, as a run killed after its last save leaves it."""
    to.mkdir()
    shutil.copytree(run_dir / "checkpoints", to / "checkpoints")
    (to / "metrics.jsonl").write_text(logged_after_the_save)
    return to


def first_lines(source: Path, n: int, to: Path) -> Path:
    """`to`, holding the first n lines of the JSONL file `source` (a small data set for a quick run)."""
    to.write_text("\n".join(source.read_text().splitlines()[:n]) + "\n")
    return to


def read_metrics(out: Path) -> list[dict]:
    """A run's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(metrics: list[dict]) -> list[dict]:
    """Metrics records without tokens_per_s, the one value two runs of the same steps do not share."""
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in metrics]


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"real tokenizer/config fixtures not found at {FIXTURES} (a clone outside the dev setup)")
    return FIXTURES


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_mistral_config(**overrides):
    import transformers
    kw = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              sliding_window=None, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return transformers.MistralConfig(**kw)


def tiny_gpt2_config(**overrides):
    import transformers
    kw = dict(vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
              eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    kw.update(overrides)
    return transformers.GPT2Config(**kw)


def save_hf(config, folder: Path, **save_kwargs):
    """A random transformers model of `config`, saved to `folder`, returned in eval mode (float32)."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(folder, **save_kwargs)
    return model


def left_padded_prompts(vocab: int = 101, T: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Three random prompts of T ids, left-padded by 3, 1 and 0 (ids, mask), as generate takes a batch."""
    ids = torch.randint(3, vocab, (3, T))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def tiny_family_folder(family: str, folder: Path) -> Path:
    """A random tiny Llama, Qwen2 or Qwen3 built with transformers and saved to `folder`, with the bundled
    tiny-mistral's tokenizer and chat template beside it (its 1088 embedding rows cover that vocabulary), as a
    user's folder for `--model`."""
    import transformers
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
              "qwen3": transformers.Qwen3Config}[family](
        vocab_size=1088, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    save_hf(config, folder)
    tiny = EXAMPLES / "assets" / "tiny-mistral"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        shutil.copy(tiny / name, folder / name)
    return folder


def with_template(tok, template: str):
    """A shallow copy of a Tokenizer with another chat template."""
    import copy
    tok = copy.copy(tok)
    tok.chat_template = template
    return tok
