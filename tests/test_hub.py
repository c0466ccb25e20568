"""Checkpoint I/O: transformers <-> minitune round trips, shards, the hub cache, and every error."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import minitune as mt
from minitune.hub import parse_size, shard_state
from tests.conftest import save_hf, tiny_gpt2_config, tiny_mistral_config

CONFIGS = {  # values away from the defaults, so a save that dropped one would show
    "gpt2": lambda: tiny_gpt2_config(layer_norm_epsilon=1e-3),
    "mistral": lambda: tiny_mistral_config(sliding_window=6, tie_word_embeddings=False, rope_theta=50.0,
                                           rms_norm_eps=1e-2),
    "mistral_tied": lambda: tiny_mistral_config(tie_word_embeddings=True, head_dim=24),
}


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("name", CONFIGS)
def test_save_then_transformers_loads_the_same_model(name, tmp_path):
    import transformers
    hf = save_hf(CONFIGS[name](), tmp_path / "hf")
    ours = mt.load_model(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    ids = torch.randint(0, 101, (2, 12))
    assert (_logits(back, ids) - _logits(ours, ids)).abs().max() <= 1e-5
    assert (_logits(hf, ids) - _logits(ours, ids)).abs().max() <= 1e-4
    # exactly the tensor names transformers itself writes
    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == set(load_file(tmp_path / "hf" / "model.safetensors"))


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_sharded_save_and_load_both_ways(family, tmp_path):
    import transformers
    config = tiny_gpt2_config() if family == "gpt2" else tiny_mistral_config()
    hf = save_hf(config, tmp_path / "hf", max_shard_size="60KB")  # transformers writes the shards
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = mt.load_model(tmp_path / "hf")
    ids = torch.randint(0, 101, (1, 10))
    assert (_logits(hf, ids) - _logits(ours, ids)).abs().max() <= 1e-4

    ours.save_pretrained(tmp_path / "ours", max_shard_size="60KB")
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "ours").glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert not (tmp_path / "ours" / "model.safetensors").exists()
    stored = {k: v for s in shards for k, v in load_file(tmp_path / "ours" / s).items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert (_logits(back, ids) - _logits(ours, ids)).abs().max() <= 1e-5
    assert (_logits(mt.load_model(tmp_path / "ours"), ids) - _logits(ours, ids)).abs().max() == 0


def test_resave_replaces_old_shards_and_leaves_no_temporary_files(tmp_path):
    model = mt.models.GPT2(mt.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16))
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    (tmp_path / "tokenizer.json").write_text("{}")  # files of others in the folder are kept
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_shard_plan():
    state = {"a": torch.zeros(10), "b": torch.zeros(30), "c": torch.zeros(5), "d": torch.zeros(5)}
    assert [list(s) for s in shard_state(state, 80)] == [["a"], ["b"], ["c", "d"]]  # b alone exceeds 80 B
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


def test_gpt2_hub_layout_without_prefix_and_with_mask_buffers(tmp_path):
    """The gpt2 repo's own file: no "transformer." prefix, Conv1D weights, attn.bias buffers."""
    hf = save_hf(tiny_gpt2_config(), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    hub_style = {k.removeprefix("transformer."): v for k, v in state.items()}
    for i in range(2):
        hub_style[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(hub_style, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, 101, (1, 9))
    assert (_logits(hf, ids) - _logits(mt.load_model(tmp_path), ids)).abs().max() <= 1e-4


def test_dtype_and_device_on_load(tmp_path):
    save_hf(tiny_mistral_config(), tmp_path)
    model = mt.load_model(tmp_path, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu" and not model.training
    stored = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(v, stored[k].to(torch.bfloat16)) for k, v in model.state_dict().items())
    assert mt.load_model(tmp_path).dtype == torch.float32  # None keeps the stored dtype
    model.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert mt.load_model(tmp_path / "bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'int8'"):
        mt.load_model(tmp_path, dtype="int8")


def _lay_out_hub_cache(hf_home: Path, repo_id: str, src: Path) -> str:
    """The hub cache as huggingface_hub writes it: blobs by hash, a snapshot of links, refs/main."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in src.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return commit


def test_hub_id_resolves_from_the_cache_offline(tmp_path):
    hf = save_hf(tiny_mistral_config(), tmp_path / "src")
    commit = _lay_out_hub_cache(tmp_path / "hf_home", "someone/tiny-mistral", tmp_path / "src")
    ids = torch.randint(0, 101, (1, 8))
    torch.save(_logits(hf, ids), tmp_path / "expected.pt")
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import torch, minitune as mt
from minitune.hub import resolve
assert resolve("someone/tiny-mistral", ["config.json"]).name == "{commit}"
m = mt.load_model("someone/tiny-mistral")
ids, want = torch.load(r"{tmp_path / 'ids.pt'}"), torch.load(r"{tmp_path / 'expected.pt'}")
with torch.no_grad():
    assert (m(ids) - want).abs().max() <= 1e-4
try:
    mt.load_model("someone/not-cached")
except FileNotFoundError as e:
    assert "someone/not-cached" in str(e) and "HF_HUB_OFFLINE" in str(e), e
else:
    raise AssertionError("no error for a repo missing from the cache")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


# ---------------------------------------------------------------- errors name the file and the key

@pytest.fixture
def saved_mistral(tmp_path):
    save_hf(tiny_mistral_config(), tmp_path)
    return tmp_path


def _edit_state(folder: Path, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_only_the_needed_files_are_fetched_from_the_hub(tmp_path, monkeypatch):
    """config + index first, then exactly the shards it lists: never other weight formats."""
    import huggingface_hub
    save_hf(tiny_mistral_config(), tmp_path, max_shard_size="60KB")
    (tmp_path / "consolidated.safetensors").write_bytes(b"not for us")
    asked = []

    def fake_snapshot_download(repo_id, allow_patterns, **kwargs):
        asked.append(sorted(allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    mt.load_model("someone/sharded")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert asked == [["config.json", "model.safetensors.index.json"],
                     sorted(["config.json", "model.safetensors.index.json", *shards])]
    asked.clear()
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError):
        mt.load_tokenizer("someone/sharded")
    assert not any(p.endswith(".safetensors") for p in asked[0])


def test_corrupt_safetensors_names_the_file(saved_mistral):
    path = saved_mistral / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # cut inside the last tensor
    with pytest.raises(ValueError, match=r"model\.safetensors: the tensors end at byte \d+ but the file has"):
        mt.load_model(saved_mistral)
    path.write_bytes(data[:100])  # cut inside the header
    with pytest.raises(ValueError, match=r"model\.safetensors: not a safetensors file"):
        mt.load_model(saved_mistral)
    path.write_bytes(data[:8] + b"{" * (len(data) - 8))
    with pytest.raises(ValueError, match=r"model\.safetensors: not a safetensors file \(unreadable header"):
        mt.load_model(saved_mistral)


def _write_raw(path: Path, header, data: bytes):
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


@pytest.mark.parametrize("header, message", [
    ([1, 2], r"not a safetensors file \(the header is not a JSON object\)"),
    ({"w": {"dtype": "F32", "shape": [2]}}, r"tensor 'w': data_offsets None are not \[start, end\]"),
    ({"w": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, r"tensor 'w': shape \['2'\] is not a list"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, r"tensor 'w': dtype 'Q4' is not one minitune reads"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, r"tensor 'w': 8 bytes for shape \[3\]"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, r"tensor .b. starts at byte 0 of the data, expected 8 \(tensors overlap"),
])
def test_malformed_safetensors_headers_are_named(header, message, tmp_path):
    from minitune.hub import read_header
    _write_raw(tmp_path / "x.safetensors", header, bytes(8))
    with pytest.raises(ValueError, match=r"x\.safetensors: " + message):
        read_header(tmp_path / "x.safetensors")


def test_a_tensor_stored_twice_is_refused(tmp_path):
    save_hf(tiny_gpt2_config(), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["ln_f.weight"] = state["transformer.ln_f.weight"].clone()  # the hub spelling as well
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor 'transformer\.ln_f\.weight' is stored twice"):
        mt.load_model(tmp_path)


@pytest.mark.parametrize("family", ["gpt2", "mistral_tied"])
def test_tied_checkpoints_that_store_a_head_load_as_transformers_loads_them(family, tmp_path):
    import transformers
    config = CONFIGS["gpt2" if family == "gpt2" else "mistral_tied"]()
    save_hf(config, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    embed_key = next(k for k in state if k.endswith(("wte.weight", "embed_tokens.weight")))
    ids = torch.randint(0, 101, (1, 8))

    def check(edited, tied):
        save_file(edited, tmp_path / "model.safetensors", metadata={"format": "pt"})
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            ours = mt.load_model(tmp_path)
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        assert ours.head_is_tied == tied
        assert (_logits(hf, ids) - _logits(ours, ids)).abs().max() <= 1e-4

    check({**state, "lm_head.weight": state[embed_key].clone()}, tied=True)  # a stored copy: still tied
    check({**state, "lm_head.weight": torch.randn_like(state[embed_key])}, tied=False)  # a different head wins
    head_only = {k: v for k, v in state.items() if k != embed_key}
    check({**head_only, "lm_head.weight": state[embed_key]}, tied=True)  # the head is the shared matrix


def test_saving_a_model_whose_tie_was_broken_keeps_its_head(tmp_path):
    model = mt.models.GPT2(mt.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    model.lm_head.weight = torch.nn.Parameter(torch.randn(50, 32))  # e.g. trained apart after to_empty
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    back = mt.load_model(tmp_path)
    ids = torch.randint(0, 50, (1, 6))
    assert torch.equal(_logits(back, ids), _logits(model.eval(), ids))


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("load_as", [None, torch.float32, torch.bfloat16])
def test_every_dtype_pair_loads_bit_exactly(stored, load_as, tmp_path):
    """GPT-2 mixes both read paths: straight into place, and transposed or cast through a buffer."""
    model = mt.models.GPT2(mt.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    model.to(stored).save_pretrained(tmp_path)
    loaded = mt.load_model(tmp_path, dtype=load_as)
    assert loaded.dtype == (load_as or stored)
    for key, value in load_file(tmp_path / "model.safetensors").items():
        ours = loaded.state_dict()[key]
        assert torch.equal(ours, loaded.tensor_from_checkpoint(key, value).to(ours.dtype)), key


def test_missing_tensor_is_named(saved_mistral):
    _edit_state(saved_mistral, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        mt.load_model(saved_mistral)


def test_unexpected_tensor_is_named_with_its_file(saved_mistral):
    _edit_state(saved_mistral, lambda s: s.update({"model.layers.7.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.7\.extra\.weight'"):
        mt.load_model(saved_mistral)


def test_shape_mismatch_gives_both_shapes(saved_mistral):
    _edit_state(saved_mistral, lambda s: s.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \[65\], the model expects \[64\]"):
        mt.load_model(saved_mistral)


def test_unknown_model_type(saved_mistral):
    config = json.loads((saved_mistral / "config.json").read_text())
    (saved_mistral / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_moe"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'qwen3_moe' is not supported"):
        mt.load_model(saved_mistral)


def test_invalid_config_json_names_the_line(saved_mistral):
    (saved_mistral / "config.json").write_text('{\n  "model_type": "mistral",\n  "hidden_size": ,\n}')
    with pytest.raises(ValueError, match=r"config\.json, line 3"):
        mt.load_model(saved_mistral)


def test_absent_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        mt.load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config\.json: file not found"):
        mt.load_model(tmp_path / "empty")
    save_hf(tiny_gpt2_config(), tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").rename(tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="found pytorch_model.bin: minitune reads only safetensors"):
        mt.load_model(tmp_path / "bin")
    save_hf(tiny_gpt2_config(), tmp_path / "shards", max_shard_size="60KB")
    next((tmp_path / "shards").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-.*listed in model.safetensors.index.json is missing"):
        mt.load_model(tmp_path / "shards")
