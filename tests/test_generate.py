"""Decoding: greedy equal to transformers' generate, the KV cache equal to recomputation, sampling."""

from __future__ import annotations

import pytest
import torch

import minitune as mt
from minitune.generate import sample_next
from tests.conftest import save_hf, tiny_gpt2_config, tiny_mistral_config

CONFIGS = {
    "gpt2": lambda: tiny_gpt2_config(),
    # prompt 7 + 20 new tokens run well past the window of 6
    "mistral_window": lambda: tiny_mistral_config(sliding_window=6),
}


def _left_padded_prompts(vocab=101, T=7):
    ids = torch.randint(3, vocab, (3, T))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_equals_transformers(name, tmp_path):
    hf = save_hf(CONFIGS[name](), tmp_path)
    model = mt.load_model(tmp_path)
    ids, mask = _left_padded_prompts()
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(mt.generate(model, ids, 20, attention_mask=mask), want)


@pytest.mark.parametrize("name", CONFIGS)
def test_per_row_eos_stopping_equals_transformers(name, tmp_path):
    hf = save_hf(CONFIGS[name](), tmp_path)
    model = mt.load_model(tmp_path)
    ids, mask = _left_padded_prompts()
    free = mt.generate(model, ids, 12, attention_mask=mask)
    eos = int(free[0, ids.size(1) + 2])  # row 0 meets it after 3 tokens; other rows may not
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=eos)
    got = mt.generate(model, ids, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)
    assert (got[0, ids.size(1) + 3:] == 0).all()


def test_generation_stops_early_when_every_row_is_done(tmp_path):
    model = mt.load_model(_saved(tmp_path))
    ids = torch.randint(3, 101, (2, 5))
    free = mt.generate(model, ids, 10)
    eos = [int(free[0, 5]), int(free[1, 5])]  # both rows' first new token
    assert mt.generate(model, ids, 10, eos_token_id=eos).shape == (2, 6)


def _saved(tmp_path):
    save_hf(tiny_mistral_config(sliding_window=4), tmp_path)
    return tmp_path


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_kv_cache_equals_full_recomputation(family, tmp_path):
    """Prefill, a chunk of 3, then single tokens through the cache: the logits of one full pass."""
    save_hf(tiny_gpt2_config() if family == "gpt2" else tiny_mistral_config(sliding_window=5), tmp_path)
    model = mt.load_model(tmp_path)
    ids, mask = _left_padded_prompts(T=16)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)  # (B, 16, V), no cache
        cache = model.make_cache(3, 16)
        pieces = [model(ids[:, a:b], attention_mask=mask[:, :b], cache=cache)
                  for a, b in [(0, 7), (7, 10)] + [(t, t + 1) for t in range(10, 16)]]
    cached = torch.cat(pieces, dim=1)
    real = mask.bool()
    assert (cached[real] - full[real]).abs().max() <= 1e-5
    assert cache.length == 16


def test_sampling_is_seedable_and_the_filters_work(tmp_path):
    model = mt.load_model(_saved(tmp_path))
    ids = torch.randint(3, 101, (2, 5))
    draw = lambda seed, **kw: mt.generate(model, ids, 15, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    greedy = mt.generate(model, ids, 15)
    assert torch.equal(draw(3, top_k=1), greedy)
    assert torch.equal(draw(4, top_p=1e-6), greedy)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {int(sample_next(logits, 1.0, generator=g, **kw)) for _ in range(300)}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.79) == {0, 1}  # 0.5 + 0.3 reaches 0.79: the third is not needed
    assert draws(top_p=0.81) == {0, 1, 2}
    assert draws() == {0, 1, 2, 3}
    assert int(sample_next(logits)) == 0


def test_generated_ids_can_feed_a_training_step(tmp_path):
    """Online DPO and self-training backpropagate through a forward pass over generated ids."""
    model = mt.load_model(_saved(tmp_path)).train()
    out = mt.generate(model, torch.randint(3, 101, (2, 5)), 4, eos_token_id=torch.tensor(2))
    assert model.training  # restored after decoding in eval mode
    model(out).logsumexp(-1).mean().backward()
    assert model.lm_head.weight.grad is not None


@pytest.mark.parametrize("form", ["int", "list", "0-d tensor", "1-d tensor"])
def test_eos_ids_in_any_form(form, tmp_path):
    model = mt.load_model(_saved(tmp_path))
    ids = torch.randint(3, 101, (1, 4))
    first = int(mt.generate(model, ids, 3)[0, 4])  # made the EOS: generation must stop right there
    eos = {"int": first, "list": [first, 100], "0-d tensor": torch.tensor(first),
           "1-d tensor": torch.tensor([first, 100])}[form]
    assert mt.generate(model, ids, 3, eos_token_id=eos).shape == (1, 5)
    assert mt.generate(model, ids, 3, eos_token_id=[]).shape == (1, 7)  # no EOS: all 3 tokens


def test_bad_generate_arguments(tmp_path):
    model = mt.load_model(_saved(tmp_path))
    ids = torch.randint(3, 101, (2, 5))
    right_padded = torch.ones_like(ids)
    right_padded[0, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        mt.generate(model, ids, 3, attention_mask=right_padded)
    with pytest.raises(ValueError, match="top_p"):
        mt.generate(model, ids, 3, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        mt.generate(model, ids, 3, temperature=-1.0)
    assert torch.equal(mt.generate(model, ids, 0), ids)


@pytest.mark.parametrize("name", ["tiny-mistral", "tiny-gpt2"])
def test_generate_answers_in_batches_equal_one_at_a_time(name):
    """Left-padded batches of chat and text prompts of different lengths give each prompt's own greedy answer."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "examples" / "assets" / name
    tok, model = mt.load_tokenizer(folder), mt.load_model(folder).eval()
    prompts = ["What is 3 plus 4?\n", "Who lives in Stonebridge? Tell me about the weaver and her owl.\n", "One"]
    if tok.chat_template:
        prompts += [[{"role": "user", "content": "What is 3 plus 4?"}],
                    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Say bread."}]]
    batched = mt.evaluate.generate_answers(model, tok, prompts, batch_size=4, max_new_tokens=12)
    alone = [mt.evaluate.generate_answers(model, tok, [p], batch_size=1, max_new_tokens=12)[0] for p in prompts]
    assert batched == alone and all(batched)
    assert not any(tok.eos_token in answer for answer in batched if tok.eos_token)
