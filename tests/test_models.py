"""GPT-2 and Mistral against transformers on tiny random configs: logits, gradients, masks."""

from __future__ import annotations

import gc
import json
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F

import minitune as mt
from minitune.errors import UserError
from minitune.freeze import blocks
from minitune.models import GPT2, GPT2Config, Mistral, MistralConfig
from tests.conftest import save_hf, tiny_gpt2_config, tiny_mistral_config

TOL = 1e-4

MISTRAL_CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "window_shorter_than_sequence": dict(sliding_window=5),
    "explicit_head_dim": dict(head_dim=24),  # Nemo-style: heads * head_dim != hidden_size
    "tied_head": dict(tie_word_embeddings=True),
    "rope_theta_1e6": dict(rope_theta=1e6, rms_norm_eps=1e-5),
}
GPT2_CASES = {
    "base": dict(),
    "untied_head": dict(tie_word_embeddings=False),
    "n_inner_and_relu": dict(n_inner=80, activation_function="relu"),
    "inverse_layer_scale": dict(scale_attn_by_inverse_layer_idx=True),
}


def _hf_and_ours(hf_config, tmp_path):
    hf = save_hf(hf_config, tmp_path)
    return hf, mt.load_model(tmp_path)


def _padded_batch(vocab: int, T: int = 16):
    """Three rows: full, left-padded by 5, right-padded by 4 (pad id 0)."""
    ids = torch.randint(3, vocab, (3, T))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, -4:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _assert_parity(hf, ours, vocab):
    ids = torch.randint(0, vocab, (2, 16))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff <= TOL, f"max |dlogits| {diff:.2e}"
    ids, mask = _padded_batch(vocab)
    pos = (mask.cumsum(-1) - 1).clamp_min(0).masked_fill(mask == 0, 0)  # what HF generate passes
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        out = ours(ids, attention_mask=mask)
    real = mask.bool()  # padding positions carry no meaning in either model
    diff = (ref[real] - out[real]).abs().max().item()
    assert diff <= TOL, f"padded batch: max |dlogits| {diff:.2e}"


@pytest.mark.parametrize("case", MISTRAL_CASES)
def test_mistral_logits_match_transformers(case, tmp_path):
    hf, ours = _hf_and_ours(tiny_mistral_config(**MISTRAL_CASES[case]), tmp_path)
    assert isinstance(ours, Mistral)
    _assert_parity(hf, ours, 101)


@pytest.mark.parametrize("case", GPT2_CASES)
def test_gpt2_logits_match_transformers(case, tmp_path):
    hf, ours = _hf_and_ours(tiny_gpt2_config(**GPT2_CASES[case]), tmp_path)
    assert isinstance(ours, GPT2)
    _assert_parity(hf, ours, 101)


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_gradients_match_transformers(family, tmp_path):
    config = tiny_gpt2_config() if family == "gpt2" else tiny_mistral_config(sliding_window=6)
    hf, ours = _hf_and_ours(config, tmp_path)
    hf.train()
    ours.train()
    ids, mask = _padded_batch(101)
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 5] = -100  # its predecessor is padding, whose outputs the two models define differently
    pos = (mask.cumsum(-1) - 1).clamp_min(0).masked_fill(mask == 0, 0)
    hf(ids, attention_mask=mask, position_ids=pos, labels=labels).loss.backward()
    logits = ours(ids, attention_mask=mask)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100).backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    for name, p in ours.named_parameters():
        ref = hf_grads[name]
        if family == "gpt2" and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            ref = ref.t()  # Conv1D keeps (in, out)
        assert torch.allclose(p.grad, ref, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_left_padding_gives_the_unpadded_logits(family):
    if family == "gpt2":
        model = GPT2(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()
    else:
        model = Mistral(MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, sliding_window=4)).eval()
    ids = torch.randint(0, 50, (1, 10))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model(padded, attention_mask=mask)[:, 3:], model(ids), atol=1e-5)


def _tiny(family: str):
    if family == "gpt2":
        return GPT2(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()
    return Mistral(MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, sliding_window=4)).eval()


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_a_packed_row_gives_each_example_its_own_logits_and_loss(family):
    """attention_mask numbering the examples of a packed row (1, 1, 2, 2, 2, 3, 0): each example sees
    only itself, from position 0, so its logits and loss are those it gets alone."""
    model = _tiny(family)
    lengths = [[5, 7, 4], [9, 6]]
    examples = [[torch.randint(0, 50, (n,)) for n in row] for row in lengths]
    T = 18
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for r, row in enumerate(examples):
        start = 0
        for k, ex in enumerate(row, start=1):
            ids[r, start:start + len(ex)], mask[r, start:start + len(ex)] = ex, k
            start += len(ex)
    labels = ids.masked_fill(mask == 0, -100)
    labels[mask != torch.nn.functional.pad(mask, (1, 0))[:, :-1]] = -100  # an example's first token: no target
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
        packed_loss = model(ids, attention_mask=mask, labels=labels, reduction="sum")
        alone_loss = 0.0
        for r, row in enumerate(examples):
            start = 0
            for ex in row:
                torch.testing.assert_close(logits[r, start:start + len(ex)], model(ex[None])[0], atol=1e-5, rtol=1e-5)
                alone_loss += model(ex[None], labels=ex[None], reduction="sum")
                start += len(ex)
    torch.testing.assert_close(packed_loss, alone_loss, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_training_forward_and_backward_read_nothing_back(family, packed, monkeypatch):
    """Whether a batch is padded or packed changes no branch in the forward: on a GPU nothing waits for the
    device (no bool(), item(), tolist() of a tensor). Here every such read of any tensor is recorded."""
    model = _tiny(family).train()
    model.gradient_checkpointing = True
    examples = [{"input_ids": torch.randint(0, 50, (n,)).tolist()} for n in (7, 4, 9, 3)]
    for example in examples:
        example["labels"] = example["input_ids"]
    batch = mt.data.collate(mt.data.pack(examples, 16) if packed else examples, pad_id=0)
    reads = []
    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, real=real, name=name: reads.append(name) or real(self, *a))
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch.get("position_ids"))
    logits.float().square().mean().backward()
    assert reads == []


def reference_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                          enable_gqa=False):
    """The oracle for torch's varlen_attn (CUDA only): each sequence of the flattened batch on its own, through
    SDPA, causal, its window counted as flash attention counts it (the query and `left` keys before it)."""
    assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32 and window_size[1] == 0
    bounds = cu_seq_q.tolist()
    assert max(b - a for a, b in zip(bounds, bounds[1:])) <= max_q == max_k
    out = torch.empty_like(q)  # (total, nh, hs)
    for start, end in zip(bounds, bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (heads, n, hs)
        ks, vs = (t.repeat_interleave(qs.size(0) // t.size(0), 0) for t in (ks, vs))
        i = torch.arange(end - start)
        allowed = i[None, :] <= i[:, None]
        if window_size[0] >= 0:
            allowed &= i[None, :] >= i[:, None] - window_size[0]
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale).transpose(0, 1)
    return out


@pytest.mark.parametrize("family, gqa_keyword", [("gpt2", True), ("mistral", True), ("mistral", False)],
                         ids=["gpt2", "mistral", "mistral-torch-2.11"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_the_variable_length_path_gives_the_masked_logits_loss_and_gradients(family, gqa_keyword, packed, monkeypatch):
    """On a GPU a collated batch's cu_seqlens replace the mask (varlen_attn); here the CPU runs that path with an
    SDPA oracle in place of the CUDA kernel: the plumbing (bounds, flattening, the window's count) is the same."""
    import minitune.models.common as common
    model = _tiny(family).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # the varlen path has no attention dropout
    examples = [{"input_ids": torch.randint(0, 50, (n,)).tolist()} for n in (7, 4, 9, 3, 6)]
    for example in examples:
        example["labels"] = example["input_ids"]
    batch = mt.data.collate(mt.data.pack(examples, 16) if packed else examples, pad_id=0)

    def run():
        model.zero_grad()
        loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     position_ids=batch.get("position_ids"), reduction="sum", cu_seqlens=batch["cu_seqlens"])
        loss.backward()
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch.get("position_ids"), cu_seqlens=batch["cu_seqlens"])
        return loss.detach(), logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    masked = run()
    calls = []

    def oracle(q, k, v, *args, **kwargs):  # torch 2.10 and 2.11 take no enable_gqa: their k and v have q's heads
        assert ("enable_gqa" in kwargs) == (gqa_keyword and k.size(1) != q.size(1))
        calls.append(1)
        return reference_varlen_attn(q, k, v, *args, **kwargs)

    monkeypatch.setattr(common, "VARLEN_GQA", gqa_keyword)
    monkeypatch.setattr(common, "varlen_attn", oracle)
    monkeypatch.setattr(common, "use_varlen", lambda *a: True)  # as on a GPU in bf16
    varlen = run()
    assert calls, "the variable-length path did not run"
    torch.testing.assert_close(varlen[0], masked[0], rtol=1e-5, atol=1e-5)
    real = batch["attention_mask"] != 0
    torch.testing.assert_close(varlen[1][real], masked[1][real], rtol=1e-5, atol=1e-5)
    for name, grad in masked[2].items():
        torch.testing.assert_close(varlen[2][name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_sliding_window_limits_what_a_token_sees():
    """Changing a token W or more places back leaves a query's logits alone; W-1 back does not."""
    W = 4
    model = Mistral(MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, sliding_window=W)).eval()
    ids = torch.randint(0, 50, (1, 12))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % 50
    with torch.no_grad():
        a, b = model(ids)[0], model(changed)[0]
    q_sees_5 = [q for q in range(12) if q - W < 5 <= q]
    for q in range(12):
        assert torch.equal(a[q], b[q]) != (q in q_sees_5), q


def three_block_model(family: str, dropout: float = 0.0):
    if family == "gpt2":
        return GPT2(GPT2Config(vocab_size=50, n_embd=32, n_layer=3, n_head=2, n_positions=32, resid_pdrop=dropout,
                               embd_pdrop=0.0, attn_pdrop=dropout))
    return Mistral(MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, attention_dropout=dropout))


def step_in_each_mode(model, ids, modes) -> tuple[list[list[bool]], list[list[torch.Tensor]]]:
    """For each (checkpointing, offload) mode, whether each block's input's memory is still alive after the forward
    (held for the backward), then the parameters' gradients of that step."""
    alive, grads = [], []
    for checkpointing, offload in modes:
        model.zero_grad()
        model.gradient_checkpointing, model.offload_checkpoints = checkpointing, offload
        inputs = []  # weak references to their memory: they keep nothing alive themselves
        hooks = [block.register_forward_pre_hook(lambda _, args: inputs.append(weakref.ref(args[0].untyped_storage())))
                 for block in blocks(model)]
        torch.manual_seed(0)  # the same dropout masks in every mode
        loss = model(ids).logsumexp(-1).mean()
        for hook in hooks:
            hook.remove()
        gc.collect()
        alive.append([ref() is not None for ref in inputs])
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return alive, grads


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_gradient_checkpointing_gives_the_same_gradients(family):
    """Plain, checkpointed and checkpointed with the checkpoints offloaded: the same gradients; the offloaded
    checkpoints are copies, so the blocks' inputs themselves are released after the forward (on a GPU: its memory)."""
    model = three_block_model(family, dropout=0.1).train()  # dropout: recomputed with the forward's masks
    ids = torch.randint(0, 50, (2, 8))
    alive, grads = step_in_each_mode(model, ids, [(False, False), (True, False), (True, True)])
    assert alive == [[True] * 3, [True] * 3, [False] * 3]
    for plain, checkpointed, offloaded in zip(*grads, strict=True):
        assert torch.allclose(plain, checkpointed, atol=1e-6)
        assert torch.equal(checkpointed, offloaded)


def test_dropout_follows_config_and_is_off_in_eval():
    model = GPT2(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.5))
    ids = torch.randint(0, 50, (1, 8))
    model.train()
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_tied_head_shares_the_embedding():
    model = GPT2(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    assert model.lm_head.weight is model.transformer.wte.weight
    model = Mistral(MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1))
    assert model.lm_head.weight is not model.model.embed_tokens.weight


# ---------------------------------------------------------------- configs

def test_mistral_config_reads_both_rope_spellings():
    old = MistralConfig.from_dict({"model_type": "mistral", "rope_theta": 1e6})
    new = MistralConfig.from_dict({"model_type": "mistral", "rope_parameters": {"rope_type": "default",
                                                                                  "rope_theta": 5e5}})
    assert old.rope_theta == 1e6 and new.rope_theta == 5e5
    assert MistralConfig.from_dict({"model_type": "mistral"}).rope_theta == 10000.0  # HF's default_theta
    both = {"model_type": "mistral", "rope_theta": 1.0, "rope_scaling": {"rope_type": "default", "rope_theta": 5e5},
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    assert MistralConfig.from_dict(both).rope_theta == 5e5  # HF: rope_scaling or rope_parameters
    # the scalings: kept with their parameters (the old "type" spelling too), refused when one is missing
    yarn = MistralConfig.from_dict({"model_type": "mistral", "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}})
    assert yarn.rope_theta == 1e6
    assert yarn.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert yarn.to_dict()["rope_parameters"] == {**yarn.rope_scaling, "rope_theta": 1e6}
    assert MistralConfig.from_dict({**both, "rope_scaling": {"type": "linear", "factor": 2.0}}).rope_scaling == {
        "rope_type": "linear", "factor": 2.0}
    with pytest.raises(UserError, match="my/config.json: rope_type 'llama3' needs low_freq_factor, high_freq_factor"):
        MistralConfig.from_dict({"model_type": "mistral", "rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
                                source="my/config.json")
    # as transformers: a yarn or llama3 scaling without its original context takes max_position_embeddings
    assert MistralConfig.from_dict({"model_type": "mistral", "max_position_embeddings": 4096, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0}}).rope_scaling["original_max_position_embeddings"] == 4096
    with pytest.raises(UserError, match="rope_type 'dynamic' is not supported"):
        MistralConfig.from_dict({"model_type": "mistral", "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})


def test_config_keeps_unknown_keys_and_reads_values_not_defaults():
    raw = {"model_type": "gpt2", "n_embd": 48, "n_head": 3, "layer_norm_epsilon": 1e-6, "summary_type": "cls_index"}
    config = GPT2Config.from_dict(raw)
    assert (config.n_embd, config.n_head, config.layer_norm_epsilon) == (48, 3, 1e-6)
    assert config.to_dict()["summary_type"] == "cls_index"
    model = GPT2(config)
    assert model.transformer.h[0].ln_1.eps == 1e-6


@pytest.mark.parametrize("raw, message", [
    ({"model_type": "gpt2", "n_embd": 50, "n_head": 3}, "not divisible"),
    ({"model_type": "gpt2", "activation_function": "swoosh"}, "activation_function 'swoosh'"),
    ({"model_type": "mistral", "num_attention_heads": 32, "num_key_value_heads": 5}, "num_key_value_heads 5"),
    ({"model_type": "llama"}, "model_type 'llama'"),
    ({"model_type": "mistral", "num_attention_heads": "4"}, "key 'num_attention_heads' is '4', expected a number"),
])
def test_bad_configs_are_refused_by_name(raw, message):
    cls = MistralConfig if raw["model_type"] != "gpt2" else GPT2Config
    with pytest.raises(ValueError, match=message):
        cls.from_dict(raw, source="some/config.json")


def test_real_mistral_7b_config_builds_exactly_the_index_tensors(fixtures_dir):
    folder = fixtures_dir / "mistral-7b-v0.1"
    config = MistralConfig.from_dict(json.loads((folder / "config.json").read_text()))
    assert (config.rope_theta, config.sliding_window, config.head_dim) == (10000.0, 4096, 128)
    with torch.device("meta"):
        model = Mistral(config)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(model.checkpoint_state()) == set(index["weight_map"])
    assert model.num_parameters() == 7_241_732_096


def test_bad_inputs_are_refused():
    model = GPT2(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=8)).eval()
    with pytest.raises(UserError, match=r"^position 8 is past n_positions 8 in config.json \(GPT-2 learned no more\): "
                                        r"feed at most 8 tokens per row, cached ones included; got 0 cached \+ 9 new$"):
        model(torch.zeros(1, 9, dtype=torch.long))
    cache = model.make_cache(1, 12)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(UserError, match=r"position 9 is past n_positions 8 .* got 6 cached \+ 4 new"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, :2] = 0
    assert model(torch.zeros(1, 10, dtype=torch.long), attention_mask=mask).shape == (1, 10, 50)  # padding takes no position
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(torch.zeros(4, dtype=torch.long))


def test_mistral_past_max_position_embeddings_warns_once_per_model():
    """Rotary positions run past max_position_embeddings (no error: it may be what the user wants), but never
    without a word. The check is on the Python length (cache included), so the training forward does not sync."""
    config = MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    model = Mistral(config).eval()
    message = (r"^Mistral: a sequence of 20 tokens runs past max_position_embeddings 16 in config.json, the length "
               r"the model was trained for; outputs there are unreliable$")
    with pytest.warns(UserWarning, match=message):
        assert model(torch.zeros(1, 20, dtype=torch.long)).shape == (1, 20, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.zeros(1, 24, dtype=torch.long))  # once per model
        Mistral(config).eval()(torch.zeros(1, 16, dtype=torch.long))  # up to the limit: silent
    cached = Mistral(config).eval()
    cache = cached.make_cache(1, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached(torch.zeros(1, 16, dtype=torch.long), cache=cache)
    with pytest.warns(UserWarning, match="a sequence of 17 tokens runs past max_position_embeddings 16"):
        cached(torch.zeros(1, 1, dtype=torch.long), cache=cache)  # 16 cached + 1 new


def test_random_init_follows_config_initializer_range():
    gpt2 = GPT2(GPT2Config(vocab_size=500, n_embd=64, n_layer=4, n_head=2, n_positions=64, initializer_range=0.05))
    assert abs(gpt2.transformer.wte.weight.std().item() - 0.05) < 0.005
    assert abs(gpt2.transformer.h[0].mlp.c_proj.weight.std().item() - 0.05 / 8 ** 0.5) < 0.003  # / sqrt(2 * n_layer)
    assert gpt2.transformer.h[0].attn.c_attn.bias.abs().max() == 0
    assert torch.equal(gpt2.transformer.ln_f.weight, torch.ones(64))
    mistral = Mistral(MistralConfig(vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, initializer_range=0.01, pad_token_id=3))
    embed = mistral.model.embed_tokens.weight
    assert abs(embed.std().item() - 0.01) < 0.001 and embed[3].abs().max() == 0
    assert torch.equal(mistral.model.norm.weight, torch.ones(64))


@pytest.mark.parametrize("family", ["gpt2", "mistral_tied"])
def test_meta_then_to_empty_then_init_weights_leaves_nothing_uninitialised(family):
    """The FSDP2 way of building a model: shapes on meta, storage by to_empty, values by init_weights."""
    if family == "gpt2":
        config = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16)
    else:
        config = MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    cls = GPT2 if family == "gpt2" else Mistral
    with torch.device("meta"):
        model = cls(config)
    torch.manual_seed(0)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.fill_(float("nan"))  # what uninitialised memory may hold
    model.init_weights()
    assert model.head_is_tied
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_family_configs_refuse_what_transformers_refuses_and_ignore_what_it_ignores():
    """A Llama file's sliding_window is kept on save but never slides; Qwen's layer_types must fit; a scaling of an
    unknown kind is refused even when the config is built in code; EOS ids must be ints."""
    from minitune.models import LlamaConfig, Qwen2Config

    llama = LlamaConfig.from_dict({"model_type": "llama", "sliding_window": 4096, "num_hidden_layers": 2})
    assert llama.window(0) is None and llama.to_dict()["sliding_window"] == 4096
    assert "sliding_window" not in LlamaConfig().to_dict()
    for layer_types, says in ((["full_attention"], "must name 2 layers"), (["full_attention", "chunked"], "each one of"),
                              (["sliding_attention", "full_attention"], "but no window")):
        with pytest.raises(UserError, match=says):
            Qwen2Config.from_dict({"model_type": "qwen2", "num_hidden_layers": 2, "layer_types": layer_types})
    with pytest.raises(UserError, match="rope_type 'dynamic' is not supported"):
        LlamaConfig(rope_scaling={"type": "dynamic", "factor": 2.0})
    assert LlamaConfig(rope_scaling={"type": "linear", "factor": 2.0}).rope_scaling == {"rope_type": "linear",
                                                                                       "factor": 2.0}
    with pytest.raises(UserError, match="key 'eos_token_id' is \\['</s>'\\]"):
        MistralConfig.from_dict({"model_type": "mistral", "eos_token_id": ["</s>"]})
