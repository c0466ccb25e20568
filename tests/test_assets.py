"""The bundled tiny models in examples/assets: they load in minitune and in transformers alike,
match their config files, and know the valley they were pre-trained on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import minitune as mt
from tests.conftest import example_module

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "examples" / "assets"
DATA = ROOT / "examples" / "data"
NAMES = ("tiny-gpt2", "tiny-mistral")
FACTS = ("town", "job", "pet", "colour")
MAX_BYTES = 8 * 1024 * 1024


def pretrain_tiny():
    return example_module("pretrain_tiny.py")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=NAMES)
def asset(request):
    folder = ASSETS / request.param
    return folder, mt.load_model(folder), mt.load_tokenizer(folder)


@pytest.fixture(scope="module")
def valley_words() -> set[str]:
    texts = [r["text"] for r in read_jsonl(DATA / "source" / "train.jsonl")]
    return {w for t in texts for w in re.findall(r"[A-Za-z]+", t)}


def read_jsonl(path: Path) -> list[dict]:
    return pretrain_tiny().read_jsonl(path)


def validation_stream(tok, limit: int | None = None) -> torch.Tensor:
    """The source validation split as pretrain_tiny.py streams it (each document closed by EOS)."""
    texts = pretrain_tiny().read_texts(DATA / "source" / "validation.jsonl")[:limit]
    return pretrain_tiny().token_stream(tok, texts)


def mean_loss(model, stream: torch.Tensor, seq_len: int = 256) -> float:
    """Next-token loss over consecutive windows, measured as examples/pretrain_tiny.py measures it."""
    return pretrain_tiny().validation_loss(model, stream, seq_len)


def test_files_are_small_and_complete():
    for name in NAMES:
        folder = ASSETS / name
        files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json", "pretraining.json"]
        for file in files + (["chat_template.jinja"] if name == "tiny-mistral" else []):
            assert (folder / file).is_file(), f"{folder / file} is missing"
        size = (folder / "model.safetensors").stat().st_size
        assert size <= MAX_BYTES, f"{folder / 'model.safetensors'} is {size} bytes, over the 8 MB budget"


def test_model_matches_its_config(asset):
    folder, model, tok = asset
    raw = read_json(folder / "config.json")
    ours = model.config.to_dict()
    for key, value in raw.items():
        if key not in ("dtype", "torch_dtype", "transformers_version"):
            assert ours[key] == value, f"{folder}/config.json: {key} is {value!r}, the model has {ours[key]!r}"
    assert model.input_embeddings().num_embeddings == raw["vocab_size"] >= len(tok)
    assert model.lm_head.weight.shape == (raw["vocab_size"], model.input_embeddings().embedding_dim)
    assert model.dtype == torch.float32
    assert (raw["bos_token_id"], raw["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)


def test_tiny_mistral_has_gqa_and_a_sliding_window():
    config = read_json(ASSETS / "tiny-mistral" / "config.json")
    context = read_json(ASSETS / "tiny-mistral" / "pretraining.json")["seq_len"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["sliding_window"] < context <= config["max_position_embeddings"]
    assert config["tie_word_embeddings"] is False


def test_tokenizers_match_transformers(asset):
    transformers = pytest.importorskip("transformers")
    folder, _, tok = asset
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    texts = [r["text"] for r in read_jsonl(DATA / "source" / "validation.jsonl")[:20]]
    texts += [r["text"] for r in read_jsonl(DATA / "target" / "validation.jsonl")[:5]] + ["Ünïcode ✓ 42"]
    for text in texts:
        assert tok.encode(text) == theirs.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_token, tok.eos_token) == (theirs.bos_token, theirs.eos_token)


def test_tiny_mistral_chat_template_matches_transformers():
    transformers = pytest.importorskip("transformers")
    folder = ASSETS / "tiny-mistral"
    tok, theirs = mt.load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    chat = read_jsonl(DATA / "sft" / "validation.jsonl")[0]["messages"]
    for prompt in (False, True):
        text = tok.apply_chat_template(chat, add_generation_prompt=prompt)
        assert text == theirs.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False)
    assert "<|user|>\n" in text and text.endswith("<|assistant|>\n")
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # one BOS, added by the tokenizer
    # the template in tokenizer_config.json too, for readers that look only there
    assert read_json(folder / "tokenizer_config.json")["chat_template"] == tok.chat_template


def test_transformers_loads_the_same_model(asset):
    """Same logits over a whole training context: 256 tokens, twice tiny-mistral's sliding window."""
    transformers = pytest.importorskip("transformers")
    folder, model, tok = asset
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = validation_stream(tok)[None, :256]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_every_position_was_trained(asset):
    """The loss late in a window is no worse than early in it, up to the model's context (GPT-2's learned
    positions) or twice the training context (Mistral's RoPE and sliding window carry over)."""
    folder, model, tok = asset
    config = read_json(folder / "config.json")
    length = config.get("n_positions") or 2 * read_json(folder / "pretraining.json")["seq_len"]
    stream = validation_stream(tok)
    windows = stream[:len(stream) // length * length].view(-1, length)[:8]
    with torch.no_grad():
        losses = mt.losses.causal_lm_loss(model, windows, reduction="none")[:, :-1]  # (B, T - 1)
    early, late = losses[:, :length // 2].mean().item(), losses[:, length // 2:].mean().item()
    assert late < 1.25 * early + 0.05, (early, late)


def test_recorded_validation_loss_is_the_models(asset):
    """pretraining.json's number is this checkpoint's loss on the source validation split."""
    folder, model, tok = asset
    record = read_json(folder / "pretraining.json")
    assert mean_loss(model, validation_stream(tok), record["seq_len"]) == pytest.approx(record["val_loss"], abs=1e-3)


def test_far_better_than_a_random_model_of_the_same_shape(asset):
    folder, model, tok = asset
    stream = validation_stream(tok, limit=100)
    random_model = type(model)(model.config).eval()
    trained, untrained = mean_loss(model, stream), mean_loss(random_model, stream)
    assert untrained > 6.0  # about ln(vocab): a random model knows nothing
    assert trained < 0.25 * untrained, (trained, untrained)


def test_greedy_text_is_fluent_valley_text(asset, valley_words):
    """Greedy continuation of a prompt: many words, all of them the valley's, sentences that end."""
    _, model, tok = asset
    ids = torch.tensor([tok.encode("One morning, Mira")])
    text = tok.decode(mt.generate(model, ids, 40)[0].tolist())
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 20 and set(words) <= valley_words, text
    assert text.count(".") >= 2, text


def test_the_models_know_the_valley(asset):
    """pretraining.json's account of what the model knows is this checkpoint's, and it is far above chance
    (1 in 8 towns, 1 in 12 trades): facts as plain-text completions, held-out questions in the question
    book's format; through the chat template, which pre-training never showed, next to nothing."""
    folder, model, tok = asset
    recorded = read_json(folder / "pretraining.json")["knowledge"]
    assert pretrain_tiny().valley_knowledge(model, tok, DATA) == recorded
    assert min(recorded["facts"].values()) >= recorded["people"] // 4, recorded
    assert recorded["book_exact_match"] >= recorded["questions"] // 6, recorded
    if tok.chat_template:
        assert recorded["chat_exact_match"] < recorded["book_exact_match"] // 4, recorded


def test_pretraining_is_repeatable(tmp_path):
    """Two short runs of examples/pretrain_tiny.py with the same seed write identical weights, and the
    tokenizer and config files they write are the committed ones, byte for byte."""
    world = tmp_path / "world"  # a small answer key, so that measuring knowledge takes no time
    (world / "eval" / "generation").mkdir(parents=True)
    (world / "world.jsonl").write_text("".join(json.dumps(p) + "\n" for p in read_jsonl(DATA / "world.jsonl")[:2]))
    questions = read_jsonl(DATA / "eval" / "generation" / "test.jsonl")[:3]
    (world / "eval" / "generation" / "test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        pretrain_tiny().main(["--out", str(out), "--log-dir", str(out / "logs"), "--world", str(world),
                              "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2"])
    for name in NAMES:
        weights = [(out / name / "model.safetensors").read_bytes() for out in outs]
        assert weights[0] == weights[1], name
        written = sorted(p.name for p in (outs[0] / name).iterdir())
        assert written == sorted(p.name for p in (ASSETS / name).iterdir()), name
        for file in set(written) - {"model.safetensors", "pretraining.json"}:
            assert (outs[0] / name / file).read_bytes() == (ASSETS / name / file).read_bytes(), f"{name}/{file}"
        metrics = read_jsonl(outs[0] / "logs" / name / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [0, 2]
        assert set(metrics[1]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "val_loss"}
        knowledge = read_json(outs[0] / name / "pretraining.json")["knowledge"]
        assert (knowledge["people"], knowledge["questions"], set(knowledge["facts"])) == (2, 3, set(FACTS))
