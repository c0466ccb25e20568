"""Per-sequence log-probabilities and DPO's reference model, three ways.

sequence_logps is checked against a naive computation from the full logits, in value and gradient;
the concatenated chosen+rejected forward against two separate forwards; and the three references
(a frozen copy, the policy with LoRA disabled, precomputed and cached) against each other.
"""

from __future__ import annotations

import math

import pytest
import torch

import minitune as mt
from minitune.data import collate_preferences
from minitune.losses import IGNORE_INDEX, dpo_loss, preference_logps, sequence_logps
from minitune.reference import (
    Reference,
    attach_logps,
    disable_dropout,
    fingerprint,
    load_logps,
    precompute_logps,
    save_logps,
)
from tests.conftest import save_hf, tiny_gpt2_config, tiny_mistral_config

PAD = 0


@pytest.fixture(params=["mistral", "gpt2"])
def model(request, tmp_path):
    config = {"mistral": tiny_mistral_config, "gpt2": tiny_gpt2_config}[request.param]()
    save_hf(config, tmp_path / "m")
    return mt.load_model(tmp_path / "m").eval()


@pytest.fixture
def mistral(tmp_path):
    save_hf(tiny_mistral_config(), tmp_path / "m")
    return mt.load_model(tmp_path / "m").eval()


def side(prompt: list[int], answer: list[int]) -> dict[str, list[int]]:
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def pairs(n: int, seed: int = 0) -> list[dict]:
    """n preference examples of random tokens: a shared prompt, answers of different lengths."""
    g = torch.Generator().manual_seed(seed)

    def tokens(k):
        return torch.randint(3, 101, (k,), generator=g).tolist()

    out = []
    for i in range(n):
        prompt = [1, *tokens(3 + i % 4)]
        out.append({"chosen": side(prompt, tokens(2 + i % 3)), "rejected": side(prompt, tokens(4 + i % 2))})
    return out


def naive_logps(model, input_ids, labels, attention_mask, average=False):
    """From the full [B, T, V] logits: log-softmax, the next token's entry, summed over the labelled ones."""
    logits = model(input_ids, attention_mask=attention_mask).float()  # (B, T, V)
    logprobs = logits[:, :-1].log_softmax(-1)  # position t predicts token t + 1
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep  # (B, T-1)
    return picked.sum(-1) / keep.sum(-1) if average else picked.sum(-1)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_equals_the_full_logits_computation_in_value_and_gradient(model, average):
    batch = collate_preferences(pairs(3), PAD)
    ours = sequence_logps(model, batch["input_ids"], batch["labels"], batch["attention_mask"], average)
    weights = torch.randn(ours.shape)
    (ours * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    theirs = naive_logps(model, batch["input_ids"], batch["labels"], batch["attention_mask"], average)
    (theirs * weights).sum().backward()
    assert ours.shape == (6,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sequence_logps_never_builds_the_full_logits(mistral, monkeypatch):
    """The log-probabilities come from the fused loss over the hidden states; lm_head's forward (the [B, T, V]
    logits) never runs."""
    def no_logits(*_):
        raise AssertionError("lm_head's forward ran: the full logits were built")
    monkeypatch.setattr(mistral.lm_head, "forward", no_logits)
    batch = collate_preferences(pairs(2), PAD)
    chosen, rejected = preference_logps(mistral, batch)
    assert chosen.shape == rejected.shape == (2,)


def test_sequence_logps_ignores_prompt_and_padding_tokens(mistral):
    """A row's value is its own: the same with any padding (width, pad id), and it depends on the prompt
    only as context: the prompt's tokens are not scored."""
    example = pairs(1)[0]["chosen"]
    alone = collate_preferences([{"chosen": example, "rejected": example}], PAD)
    wide = collate_preferences([{"chosen": example, "rejected": side([1] * 12, [5, 6])}], 7)  # wider, pad id 7
    a = sequence_logps(mistral, alone["input_ids"], alone["labels"], alone["attention_mask"])[0]
    b = sequence_logps(mistral, wide["input_ids"], wide["labels"], wide["attention_mask"])[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Scoring the prompt too (labels = input_ids) adds exactly the prompt tokens' log-probabilities.
    ids = alone["input_ids"][:1]
    everything = sequence_logps(mistral, ids, ids)
    n_prompt = example["labels"].index(next(t for t in example["labels"] if t != IGNORE_INDEX))
    prompt_only = ids.clone().masked_fill(torch.arange(ids.size(1)) >= n_prompt, IGNORE_INDEX)
    torch.testing.assert_close(everything, a + sequence_logps(mistral, ids, prompt_only), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and a log-probability is at most 0
        assert float(a) < 0


def test_one_concatenated_forward_equals_two_separate_ones(model):
    examples = pairs(4)
    chosen, rejected = preference_logps(model, collate_preferences(examples, PAD))
    for name, got in (("chosen", chosen), ("rejected", rejected)):
        alone = mt.data.collate([e[name] for e in examples], PAD)
        want = sequence_logps(model, alone["input_ids"], alone["labels"], alone["attention_mask"])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def randomize_lora(model) -> None:
    with torch.no_grad():
        for _, layer in mt.lora.lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.1)


@pytest.mark.parametrize("average", [False, True])
def test_the_three_reference_modes_give_the_same_losses(mistral, average):
    examples = pairs(5)
    copy = Reference("copy", mistral)  # taken before LoRA and before the policy moves
    cached = attach_logps(examples, precompute_logps(mistral, examples, PAD, batch_size=2, average=average))
    mt.lora.apply_lora(mistral, r=4, alpha=8, target_modules="all-linear", verbose=False)
    randomize_lora(mistral)  # the policy now differs from the reference
    disabled = Reference("lora-disabled", mistral)
    batch = collate_preferences(cached, PAD)
    policy = preference_logps(mistral.train(), batch, average)
    losses = {}
    references = {"copy": copy, "lora-disabled": disabled, "precomputed": Reference("precomputed", None)}
    for name, reference in references.items():
        ref = reference.logps(batch, average)
        losses[name] = dpo_loss(*policy, *ref, beta=0.1)[0]
        assert not any(r.requires_grad for r in ref)
    torch.testing.assert_close(losses["lora-disabled"], losses["copy"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["precomputed"], losses["copy"], rtol=1e-5, atol=1e-6)
    assert (losses["copy"] - math.log(2)).abs().max() > 1e-3  # the policy is not the reference
    assert mistral.training and not copy.model.training and not copy.model.model.embed_tokens.weight.requires_grad


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(model):
    batch = collate_preferences(pairs(3), PAD)
    losses, chosen, rejected = dpo_loss(*preference_logps(model, batch), *Reference("copy", model).logps(batch))
    torch.testing.assert_close(losses, torch.full((3,), math.log(2)))
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0


def test_without_dropout_a_training_policy_equals_its_reference(tmp_path):
    """GPT-2 has dropout 0.1 everywhere: in train mode its log-probs are noisy while the reference's (eval mode)
    are not, so the loss is not ln 2 before any update. disable_dropout makes the two agree."""
    save_hf(tiny_gpt2_config(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1), tmp_path / "g")
    policy = mt.load_model(tmp_path / "g").train()
    batch = collate_preferences(pairs(4), PAD)
    reference = Reference("copy", policy)
    noisy = dpo_loss(*preference_logps(policy, batch), *reference.logps(batch))[0]
    assert (noisy - math.log(2)).abs().max() > 1e-4
    disable_dropout(policy)
    assert policy.training and all(m.p == 0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))
    clean = dpo_loss(*preference_logps(policy, batch), *reference.logps(batch))[0]
    torch.testing.assert_close(clean, torch.full((4,), math.log(2)))


def test_reference_misuse_is_explained(mistral):
    batch = collate_preferences(pairs(2), PAD)
    with pytest.raises(ValueError, match="no LoRA layers"):
        Reference("lora-disabled", mistral).logps(batch)
    with pytest.raises(ValueError, match="no reference_logps"):
        Reference("precomputed", None).logps(batch)
    with pytest.raises(ValueError, match="expected one of copy, lora-disabled, precomputed"):
        Reference("frozen", mistral)
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        attach_logps(pairs(2), torch.zeros(3, 2))


def test_the_cache_round_trips_and_refuses_a_stale_file(mistral, tmp_path):
    examples = pairs(3)
    logps = precompute_logps(mistral, examples, PAD)
    key = fingerprint(mistral, examples, average=False)
    path = tmp_path / "ref.safetensors"
    assert load_logps(path, key) is None  # nothing cached yet
    save_logps(path, logps, key)
    torch.testing.assert_close(load_logps(path, key), logps, rtol=0, atol=0)
    assert not list(tmp_path.glob("*.tmp"))
    # Another model, other examples or the other averaging each change the fingerprint, and the file is refused.
    other_examples = fingerprint(mistral, pairs(3, seed=1), average=False)
    other_average = fingerprint(mistral, examples, average=True)
    with torch.no_grad():
        mistral.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    other_model = fingerprint(mistral, examples, average=False)
    assert len({key, other_examples, other_average, other_model}) == 4
    with pytest.raises(ValueError, match="delete the file to recompute"):
        load_logps(path, other_model)
    path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable reference"):
        load_logps(path, key)
