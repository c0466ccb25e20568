"""Llama, Qwen2 and Qwen3 against transformers, each switch on and off, on tiny random configs built with
transformers' own config classes: float32 logits, padded and packed batches, gradients, greedy generation, the
KV cache, checkpoints and PEFT adapters both ways, config.json in its legacy and its transformers-5 spelling,
and the published full-size configs built on the meta device."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import minitune as mt
from minitune.lora import apply_lora, load_adapter, save_adapter
from tests.conftest import left_padded_prompts

TOL = 1e-4  # float32 logits against transformers
VOCAB = 101

LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # with head_dim 16 one pair is on the ramp
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
SLIDING = dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)  # layer 0 full, layer 1 slides

# name: (model_type, keyword arguments of transformers' config class on top of the tiny config)
CASES = {
    "llama": ("llama", {}),
    "llama-attention_bias": ("llama", dict(attention_bias=True)),
    "llama-mlp_bias": ("llama", dict(mlp_bias=True)),
    "llama-head_dim_32": ("llama", dict(head_dim=32)),  # q_proj 64 -> 128
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),  # Llama 3.2 1B/3B
    "llama-rope_llama3": ("llama", dict(rope_parameters=LLAMA3)),
    "llama-rope_linear": ("llama", dict(rope_parameters=LINEAR)),
    "llama-eos_list": ("llama", dict(eos_token_id=[2, 3])),
    "llama-all": ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=32, tie_word_embeddings=True,
                                rope_parameters=LLAMA3)),
    "qwen2": ("qwen2", {}),  # q/k/v biases always; no sliding window
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-sliding": ("qwen2", SLIDING),
    "qwen2-layer_types": ("qwen2", dict(use_sliding_window=True, sliding_window=4,  # transformers 5's explicit list
                                        layer_types=["sliding_attention", "full_attention"])),
    "qwen2-yarn": ("qwen2", dict(rope_parameters=YARN)),
    "qwen2-all": ("qwen2", dict(tie_word_embeddings=True, rope_parameters=YARN, **SLIDING)),
    "qwen3": ("qwen3", {}),  # q_norm/k_norm always
    "qwen3-head_dim_32": ("qwen3", dict(head_dim=32)),
    "qwen3-attention_bias": ("qwen3", dict(attention_bias=True)),
    "qwen3-yarn": ("qwen3", dict(rope_parameters=YARN)),
    "qwen3-sliding": ("qwen3", SLIDING),
    "qwen3-all": ("qwen3", dict(attention_bias=True, head_dim=32, tie_word_embeddings=True, rope_parameters=YARN,
                                **SLIDING)),
}
FORWARD_CASES = [c for c in CASES if c != "llama-eos_list"]  # that one differs from "llama" only when generating
FAMILY_CASES = ["llama-all", "qwen2-all", "qwen3-all"]  # every switch at once: the costlier checks
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_config(case: str):
    """transformers' config of a case: vocab 101, hidden 64, 2 layers, 4 heads, 2 KV heads."""
    import transformers
    model_type, overrides = CASES[case]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
              initializer_range=0.1)  # larger than 0.02: sharper attention, so RoPE and windows show in the logits
    if model_type == "qwen3":
        kw["head_dim"] = 16  # Qwen3Config's default is 128, whatever the hidden size
    kw.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[model_type]
    return cls(**kw)


def random_hf(config):
    """A transformers model of `config` in float32, eval mode, with random biases and norm weights too (they
    start at 0 and 1, where a bias or a norm weight read from the wrong place would not show)."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (transformers model, the folder it saved itself to); each case built once for the module.
    The model is shared: tests only run it (a test that trains or wraps it loads its own copy)."""
    made = {}

    def get(case):
        if case not in made:
            folder = tmp_path_factory.mktemp(case)
            with torch.random.fork_rng():
                torch.manual_seed(sorted(CASES).index(case))
                hf = random_hf(tiny_config(case))
            hf.save_pretrained(folder)
            made[case] = hf, folder
        return made[case]

    return get


def ours_from(folder):
    """minitune's model of a checkpoint folder, checked to be the class its model_type is registered to."""
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    assert model_type in mt.models.MODEL_CLASSES, f"model_type {model_type!r} is not in MODEL_CLASSES"
    model = mt.load_model(folder)
    assert type(model) is mt.models.MODEL_CLASSES[model_type]
    return model.eval()


def logits(model, ids, **kw):
    with torch.no_grad():
        out = model(ids, **kw)
    return getattr(out, "logits", out)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def hf_positions(mask):
    """The position ids transformers' generate gives a padded batch; the forward alone would not."""
    return (mask.cumsum(-1) - 1).clamp_min(0).masked_fill(mask == 0, 0)


def padded_batch(T: int = 16):
    """Three rows: full, left-padded by 5, right-padded by 4 (pad id 0)."""
    ids = torch.randint(3, VOCAB, (3, T))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, -4:] = 0
    return ids.masked_fill(mask == 0, 0), mask


# ---------------------------------------------------------------- forward

@pytest.mark.parametrize("case", FORWARD_CASES)
def test_logits_match_transformers(case, saved):
    hf, folder = saved(case)
    ours = ours_from(folder)
    ids = torch.randint(0, VOCAB, (2, 24))
    diff = max_diff(logits(hf, ids), logits(ours, ids))
    assert diff <= TOL, f"{case}: max |dlogits| {diff:.2e}"


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_padded_batch_matches_transformers(case, saved):
    hf, folder = saved(case)
    ours = ours_from(folder)
    ids, mask = padded_batch()
    ref = logits(hf, ids, attention_mask=mask, position_ids=hf_positions(mask))
    out = logits(ours, ids, attention_mask=mask)
    real = mask.bool()  # padding positions carry no meaning in either model
    diff = max_diff(ref[real], out[real])
    assert diff <= TOL, f"{case}: padded batch: max |dlogits| {diff:.2e}"


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_packed_rows_give_each_example_the_logits_transformers_gives_it_alone(case, saved):
    """attention_mask numbering the examples of a packed row (1, 1, 2, 2, 2, 3, 0): each example's logits are
    those transformers computes for it alone."""
    hf, folder = saved(case)
    ours = ours_from(folder)
    examples = [[torch.randint(3, VOCAB, (n,)) for n in row] for row in [[5, 7, 4], [9, 6]]]
    ids = torch.zeros(2, 18, dtype=torch.long)
    mask = torch.zeros(2, 18, dtype=torch.long)
    for r, row in enumerate(examples):
        start = 0
        for k, ex in enumerate(row, start=1):
            ids[r, start:start + len(ex)], mask[r, start:start + len(ex)] = ex, k
            start += len(ex)
    packed = logits(ours, ids, attention_mask=mask)
    worst = 0.0
    for r, row in enumerate(examples):
        start = 0
        for ex in row:
            worst = max(worst, max_diff(packed[r, start:start + len(ex)], logits(hf, ex[None])[0]))
            start += len(ex)
    assert worst <= TOL, f"{case}: packed rows: max |dlogits| {worst:.2e}"


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_gradients_match_transformers(case, saved):
    import transformers
    _, folder = saved(case)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    ours = ours_from(folder).train()
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 5] = -100  # its predecessor is padding, whose outputs the two models define differently
    ref = hf(ids, attention_mask=mask, position_ids=hf_positions(mask), labels=labels).loss
    ref.backward()
    loss = ours(ids, attention_mask=mask, labels=labels)
    loss.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5, f"{case}: loss {loss.item()} vs transformers {ref.item()}"
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    assert ours_grads.keys() == hf_grads.keys()
    bad = {n: max_diff(g, hf_grads[n]) for n, g in ours_grads.items()
           if not torch.allclose(g, hf_grads[n], atol=1e-5, rtol=1e-4)}
    assert not bad, f"{case}: gradients differ (max |dgrad|): {bad}"


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_equals_transformers(case, saved):
    """Left-padded prompts, 16 new tokens (past the window of 4 where one slides), the model's own EOS ids."""
    hf, folder = saved(case)
    ours = ours_from(folder)
    ids, mask = left_padded_prompts()
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    got = mt.generate(ours, ids, 16, attention_mask=mask, eos_token_id=ours.config.eos_token_id, pad_token_id=0)
    assert torch.equal(got, want), f"{case}:\nminitune     {got.tolist()}\ntransformers {want.tolist()}"


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_kv_cache_equals_full_recomputation(case, saved):
    """Prefill, a chunk of 3, then single tokens through the cache: the logits of one full pass."""
    _, folder = saved(case)
    model = ours_from(folder)
    ids, mask = left_padded_prompts(T=16)
    full = logits(model, ids, attention_mask=mask)
    cache = model.make_cache(3, 16)
    with torch.no_grad():
        pieces = [model(ids[:, a:b], attention_mask=mask[:, :b], cache=cache)
                  for a, b in [(0, 7), (7, 10)] + [(t, t + 1) for t in range(10, 16)]]
    real = mask.bool()
    diff = max_diff(torch.cat(pieces, dim=1)[real], full[real])
    assert diff <= 1e-5, f"{case}: cached vs recomputed: max |dlogits| {diff:.2e}"
    assert cache.length == 16


def test_several_eos_ids_stop_each_row_as_transformers_does(saved):
    hf, folder = saved("llama-eos_list")
    ours = ours_from(folder)
    assert ours.config.eos_token_id == [2, 3]
    ids, mask = left_padded_prompts()
    free = mt.generate(ours, ids, 12, attention_mask=mask)
    T = ids.size(1)
    eos = [int(free[0, T + 2]), int(free[1, T + 5])]  # row 0 stops after 3 tokens, row 1 after 6 at the latest
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=eos)
    got = mt.generate(ours, ids, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want), f"minitune {got.tolist()}\ntransformers {want.tolist()}"
    assert (got[0, T + 3:] == 0).all()  # row 0 stopped, at the latest on its third token


# ---------------------------------------------------------------- the switches are really on

SWITCHED_OFF = {  # case: the config.json keys that turn its switch off (the same weights load either way)
    "llama-rope_llama3": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "llama-rope_linear": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "qwen2-yarn": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "qwen3-yarn": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "qwen2-sliding": {"use_sliding_window": False, "layer_types": None},
    "qwen2-layer_types": {"use_sliding_window": False, "layer_types": None},
    "qwen3-sliding": {"use_sliding_window": False, "layer_types": None},
}


def with_config(src, dst, **changes):
    """A copy of the checkpoint folder `src` at `dst` whose config.json has `changes` (None: key removed)."""
    shutil.copytree(src, dst)
    raw = json.loads((src / "config.json").read_text())
    for key, value in changes.items():
        raw.pop(key, None)
        if value is not None:
            raw[key] = value
    (dst / "config.json").write_text(json.dumps(raw, indent=2))
    return dst


@pytest.mark.parametrize("case", SWITCHED_OFF)
def test_each_switch_changes_the_logits_and_minitune_follows_it_off_too(case, saved, tmp_path):
    """Guards the tests above against passing for nothing: at these sizes the switch moves the logits far
    beyond the tolerance. The same weights with the switch off load in both libraries alike as well."""
    import transformers
    hf, folder = saved(case)
    off = with_config(folder, tmp_path / "off", **SWITCHED_OFF[case])
    hf_off = transformers.AutoModelForCausalLM.from_pretrained(off, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 24))
    assert max_diff(logits(hf, ids), logits(hf_off, ids)) > 100 * TOL, f"{case}: the switch changes nothing here"
    diff = max_diff(logits(hf_off, ids), logits(ours_from(off), ids))
    assert diff <= TOL, f"{case} switched off: max |dlogits| {diff:.2e}"


NONTRIVIAL = {  # case: tensors of layer 1 that must hold more than their init (0 for a bias, 1 for a norm)
    "llama-attention_bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
                             "self_attn.o_proj.bias"],
    "llama-mlp_bias": ["mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias"],
    "qwen2": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
    "qwen3-attention_bias": ["self_attn.q_proj.bias", "self_attn.o_proj.bias"],
    "qwen3": ["self_attn.q_norm.weight", "self_attn.k_norm.weight", "input_layernorm.weight"],
}


@pytest.mark.parametrize("case", NONTRIVIAL)
def test_biases_and_norm_weights_in_the_checkpoints_are_not_their_init(case, saved):
    from safetensors.torch import load_file
    state = load_file(saved(case)[1] / "model.safetensors")
    for suffix in NONTRIVIAL[case]:
        init = 1.0 if suffix.endswith("norm.weight") else 0.0
        assert (state[f"model.layers.1.{suffix}"] - init).abs().max() > 0.01, suffix
    if case == "qwen2":
        assert "model.layers.1.self_attn.o_proj.bias" not in state  # Qwen2's o_proj has none


# ---------------------------------------------------------------- checkpoints and config.json

CONFIG_KEYS = ["rope_parameters", "layer_types", "sliding_window", "use_sliding_window", "max_window_layers",
               "attention_bias", "mlp_bias", "head_dim", "tie_word_embeddings", "eos_token_id", "bos_token_id",
               "rms_norm_eps", "num_key_value_heads", "intermediate_size", "max_position_embeddings"]


def config_value(config, key):
    """A value as transformers' model reads it: Qwen2's attention takes head_dim when there is one."""
    value = getattr(config, key, None)
    if key == "head_dim" and value is None:
        return config.hidden_size // config.num_attention_heads
    return value


@pytest.mark.parametrize("case", CASES)
def test_save_then_transformers_loads_the_same_model(case, saved, tmp_path):
    import transformers
    from safetensors.torch import load_file
    hf, folder = saved(case)
    ours = ours_from(folder)
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(back) is type(hf)
    ids = torch.randint(0, VOCAB, (2, 16))
    diff = max_diff(logits(back, ids), logits(ours, ids))
    assert diff <= 1e-5, f"{case}: transformers on minitune's save: max |dlogits| {diff:.2e}"
    changed = {k: (config_value(hf.config, k), config_value(back.config, k)) for k in CONFIG_KEYS
               if config_value(hf.config, k) != config_value(back.config, k)}
    assert not changed, f"{case}: config values (transformers' save, minitune's save) differ: {changed}"
    assert back.generation_config.eos_token_id == hf.generation_config.eos_token_id
    # exactly the tensor names transformers itself writes; and minitune reads its own save back bit for bit
    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == set(load_file(folder / "model.safetensors"))
    assert max_diff(logits(ours_from(tmp_path / "ours"), ids), logits(ours, ids)) == 0


def legacy_rope_config(raw: dict, spelling: str = "rope_type") -> dict:
    """A config.json as files written before transformers 5 hold it: rope_theta at the top level and the scaling
    in rope_scaling (keyed "type" in older files such as Qwen2.5's model card), no rope_parameters."""
    raw = dict(raw)
    rope = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    raw["rope_scaling"] = None if rope_type == "default" else {spelling: rope_type, **rope}
    raw["transformers_version"] = "4.45.0"
    return raw


@pytest.mark.parametrize("case, spelling", [("llama-rope_llama3", "rope_type"), ("llama-rope_linear", "type"),
                                            ("qwen2-yarn", "type"), ("qwen3-yarn", "rope_type"),
                                            ("llama", "rope_type")])
def test_legacy_rope_scaling_config_json_reads_as_transformers_reads_it(case, spelling, saved, tmp_path):
    import transformers
    hf, folder = saved(case)
    legacy = tmp_path / "legacy"
    shutil.copytree(folder, legacy)
    (legacy / "config.json").write_text(json.dumps(legacy_rope_config(json.loads((folder / "config.json").read_text()),
                                                                      spelling), indent=2))
    hf_legacy = transformers.AutoModelForCausalLM.from_pretrained(legacy, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 24))
    assert max_diff(logits(hf_legacy, ids), logits(hf, ids)) <= 1e-6  # transformers reads both spellings alike
    diff = max_diff(logits(hf_legacy, ids), logits(ours_from(legacy), ids))
    assert diff <= TOL, f"{case}, legacy rope_scaling ({spelling!r}): max |dlogits| {diff:.2e}"


QWEN2_LEGACY_WINDOWS = {  # config.json keys of files written before layer_types existed
    "qwen2.5-style, window off": dict(use_sliding_window=False, sliding_window=4, max_window_layers=1,
                                      layer_types=None),
    "window on from max_window_layers": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                             layer_types=None),
    "window on in every layer": dict(use_sliding_window=True, sliding_window=4, max_window_layers=0, layer_types=None),
}


@pytest.mark.parametrize("variant", QWEN2_LEGACY_WINDOWS)
def test_qwen2_sliding_window_keys_read_as_transformers_reads_them(variant, saved, tmp_path):
    """Real Qwen2.5 files say sliding_window 131072 (or 32768) with use_sliding_window false: no layer slides.
    Files without layer_types slide in layers max_window_layers and up, when use_sliding_window is true."""
    import transformers
    _, folder = saved("qwen2-sliding")
    variant_dir = with_config(folder, tmp_path / "v", **QWEN2_LEGACY_WINDOWS[variant])
    hf = transformers.AutoModelForCausalLM.from_pretrained(variant_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 24))
    diff = max_diff(logits(hf, ids), logits(ours_from(variant_dir), ids))
    assert diff <= TOL, f"qwen2 {variant} (transformers: layer_types {hf.config.layer_types}): max |dlogits| {diff:.2e}"


def test_yarn_without_original_max_position_embeddings_reads_as_transformers(saved, tmp_path):
    """transformers takes max_position_embeddings for a yarn (or llama3) scaling that leaves the original
    context length out (standardize_rope_params in modeling_rope_utils.py)."""
    import transformers
    _, folder = saved("qwen3-yarn")
    raw = json.loads((folder / "config.json").read_text())
    rope = {k: v for k, v in raw["rope_parameters"].items() if k != "original_max_position_embeddings"}
    variant = with_config(folder, tmp_path / "v", rope_parameters=rope, max_position_embeddings=32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(variant, dtype=torch.float32).eval()
    assert hf.config.rope_parameters["original_max_position_embeddings"] == 32
    ids = torch.randint(0, VOCAB, (2, 24))
    diff = max_diff(logits(hf, ids), logits(ours_from(variant), ids))
    assert diff <= TOL, f"yarn without original_max_position_embeddings: max |dlogits| {diff:.2e}"


# ---------------------------------------------------------------- PEFT adapters both ways

def randomize_lora(model) -> None:
    with torch.no_grad():
        for _, layer in mt.lora.lora_layers(model):
            layer.lora_A.weight.normal_(0, 0.05)
            layer.lora_B.weight.normal_(0, 0.05)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_an_adapter_saved_here_loads_in_peft_with_the_same_logits(case, saved, tmp_path):
    peft = pytest.importorskip("peft")
    import transformers
    _, folder = saved(case)
    ours = ours_from(folder)
    apply_lora(ours, r=4, alpha=8, target_modules=ALL_LINEAR, verbose=False)
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(folder))
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.randint(3, VOCAB, (2, 12))
    diff = max_diff(logits(ours, ids), logits(theirs, ids))
    assert diff <= 1e-5, f"{case}: PEFT on minitune's adapter: max |dlogits| {diff:.2e}"


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_an_adapter_peft_saved_loads_here_with_the_same_logits(case, saved, tmp_path):
    peft = pytest.importorskip("peft")
    import transformers
    _, folder = saved(case)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=ALL_LINEAR,
                                                       task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(ours_from(folder), tmp_path / "peft")
    ids = torch.randint(3, VOCAB, (2, 12))
    diff = max_diff(logits(ours, ids), logits(theirs.eval(), ids))
    assert diff <= 1e-5, f"{case}: minitune on PEFT's adapter: max |dlogits| {diff:.2e}"
    assert {n.rpartition(".")[2] for n, _ in mt.lora.lora_layers(ours)} == set(ALL_LINEAR)


# ---------------------------------------------------------------- full-size configs on the meta device

# The published config.json values of meta-llama/Llama-3.1-8B(-Instruct), meta-llama/Llama-3.2-1B, Qwen/Qwen2.5-7B and
# Qwen/Qwen3-8B (the real files are not available offline; these are their keys as published on the hub).
REAL_CONFIGS = {
    "Llama-3.1-8B": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, attention_dropout=0.0,
        bos_token_id=128000, eos_token_id=128001, hidden_act="silu", hidden_size=4096, initializer_range=0.02,
        intermediate_size=14336, max_position_embeddings=131072, mlp_bias=False, num_attention_heads=32,
        num_hidden_layers=32, num_key_value_heads=8, pretraining_tp=1, rms_norm_eps=1e-05,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16", transformers_version="4.43.0.dev0",
        use_cache=True, vocab_size=128256),
    "Llama-3.1-8B-Instruct": dict(  # as the base model's file, but three EOS ids
        architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, attention_dropout=0.0,
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009], hidden_act="silu", hidden_size=4096,
        initializer_range=0.02, intermediate_size=14336, max_position_embeddings=131072, mlp_bias=False,
        num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=8, pretraining_tp=1, rms_norm_eps=1e-05,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16", transformers_version="4.42.3",
        use_cache=True, vocab_size=128256),
    "Llama-3.2-1B": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, attention_dropout=0.0,
        bos_token_id=128000, eos_token_id=128001, head_dim=64, hidden_act="silu", hidden_size=2048,
        initializer_range=0.02, intermediate_size=8192, max_position_embeddings=131072, mlp_bias=False,
        num_attention_heads=32, num_hidden_layers=16, num_key_value_heads=8, pretraining_tp=1, rms_norm_eps=1e-05,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        rope_theta=500000.0, tie_word_embeddings=True, torch_dtype="bfloat16", transformers_version="4.45.0.dev0",
        use_cache=True, vocab_size=128256),
    "Qwen2.5-7B": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", attention_dropout=0.0, bos_token_id=151643,
        eos_token_id=151643, hidden_act="silu", hidden_size=3584, initializer_range=0.02, intermediate_size=18944,
        max_position_embeddings=131072, max_window_layers=28, num_attention_heads=28, num_hidden_layers=28,
        num_key_value_heads=4, rms_norm_eps=1e-06, rope_theta=1000000.0, sliding_window=131072,
        tie_word_embeddings=False, torch_dtype="bfloat16", transformers_version="4.43.1", use_cache=True,
        use_mrope=False, use_sliding_window=False, vocab_size=152064),
    "Qwen3-8B": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False, attention_dropout=0.0,
        bos_token_id=151643, eos_token_id=151645, head_dim=128, hidden_act="silu", hidden_size=4096,
        initializer_range=0.02, intermediate_size=12288, max_position_embeddings=40960, max_window_layers=36,
        num_attention_heads=32, num_hidden_layers=36, num_key_value_heads=8, rms_norm_eps=1e-06, rope_scaling=None,
        rope_theta=1000000, sliding_window=None, tie_word_embeddings=False, torch_dtype="bfloat16",
        transformers_version="4.51.0", use_cache=True, use_sliding_window=False, vocab_size=151936),
}
PUBLISHED_PARAMETERS = {"Llama-3.1-8B": 8_030_261_248, "Llama-3.1-8B-Instruct": 8_030_261_248,
                        "Llama-3.2-1B": 1_235_814_400, "Qwen2.5-7B": 7_615_616_512, "Qwen3-8B": 8_190_735_360}


def meta_models(raw: dict, tmp_path):
    """(transformers' model, minitune's) on the meta device, from the same config.json contents."""
    import transformers
    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path)  # as a checkpoint's file is read
    cls = mt.models.MODEL_CLASSES[raw["model_type"]]
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config)
        ours = cls(cls.config_class.from_dict(raw))
    return hf, ours


def assert_same_parameters(hf, ours, what):
    theirs = {n: tuple(p.shape) for n, p in hf.named_parameters()}
    mine = {n: tuple(p.shape) for n, p in ours.named_parameters()}
    assert mine.keys() == theirs.keys(), (f"{what}: only minitune {sorted(mine.keys() - theirs.keys())[:6]}, "
                                          f"only transformers {sorted(theirs.keys() - mine.keys())[:6]}")
    shapes = {n: (mine[n], theirs[n]) for n in mine if mine[n] != theirs[n]}
    assert not shapes, f"{what}: shapes (minitune, transformers) differ: {dict(list(shapes.items())[:6])}"
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_published_configs_build_the_same_parameters_on_the_meta_device(name, tmp_path):
    raw = REAL_CONFIGS[name]
    hf, ours = meta_models(raw, tmp_path)
    assert_same_parameters(hf, ours, name)
    assert ours.num_parameters() == PUBLISHED_PARAMETERS[name]
    assert ours.head_is_tied == raw["tie_word_embeddings"]
    assert ours.config.eos_token_id == raw["eos_token_id"]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_keys_a_config_json_leaves_out_take_transformers_defaults(model_type, tmp_path):
    """E.g. Qwen3Config's head_dim defaults to 128 whatever the hidden size; Qwen2's q/k/v biases are on."""
    hf, ours = meta_models({"model_type": model_type}, tmp_path)
    assert_same_parameters(hf, ours, f"{model_type} defaults")
    assert ours.head_is_tied == hf.config.tie_word_embeddings


# The rope settings of the published configs (Qwen's yarn as their model cards give it for long contexts), on a
# model narrow enough to run, at positions far into the context where the scaling matters.
REAL_ROPE = {
    "Llama-3.1-8B": ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192},
                                   max_position_embeddings=131072, head_dim=128)),
    "Llama-3.2-1B": ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192},
                                   max_position_embeddings=131072, head_dim=64)),
    "Qwen2.5-7B-yarn": ("qwen2", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                                       "original_max_position_embeddings": 32768},
                                      max_position_embeddings=131072, hidden_size=256, num_attention_heads=2,
                                      num_key_value_heads=1)),  # head_dim 128
    "Qwen3-8B-yarn": ("qwen3", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                                     "original_max_position_embeddings": 32768},
                                    max_position_embeddings=131072, head_dim=128)),
}


@pytest.mark.parametrize("name", REAL_ROPE)
def test_published_rope_settings_far_into_the_context(name, tmp_path):
    import transformers
    model_type, overrides = REAL_ROPE[name]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
              "qwen3": transformers.Qwen3Config}[model_type](**kw)
    hf = random_hf(config)
    hf.save_pretrained(tmp_path)
    ours = ours_from(tmp_path)
    ids = torch.randint(0, VOCAB, (3, 12))
    positions = torch.arange(12) + torch.tensor([[0], [9000], [60000]])  # (3, 12)
    diff = max_diff(logits(hf, ids, position_ids=positions), logits(ours, ids, position_ids=positions))
    assert diff <= TOL, f"{name}: max |dlogits| {diff:.2e}"
