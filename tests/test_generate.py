"""Decoding: greedy equal to transformers' generate, the KV cache equal to recomputation, sampling."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import minitune as mt
from minitune.errors import UserError
from minitune.generate import sample_next
from minitune.models import GPT2, GPT2Config, Mistral, MistralConfig
from tests.conftest import left_padded_prompts, save_hf, tiny_gpt2_config, tiny_mistral_config

ASSETS = Path(__file__).resolve().parents[1] / "examples" / "assets"

CONFIGS = {
    "gpt2": lambda: tiny_gpt2_config(),
    # prompt 7 + 20 new tokens run well past the window of 6
    "mistral_window": lambda: tiny_mistral_config(sliding_window=6),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_equals_transformers(name, tmp_path):
    hf = save_hf(CONFIGS[name](), tmp_path)
    model = mt.load_model(tmp_path)
    ids, mask = left_padded_prompts()
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(mt.generate(model, ids, 20, attention_mask=mask), want)


@pytest.mark.parametrize("name", CONFIGS)
def test_per_row_eos_stopping_equals_transformers(name, tmp_path):
    hf = save_hf(CONFIGS[name](), tmp_path)
    model = mt.load_model(tmp_path)
    ids, mask = left_padded_prompts()
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
    ids, mask = left_padded_prompts(T=16)
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
    folder = ASSETS / name
    tok, model = mt.load_tokenizer(folder), mt.load_model(folder).eval()
    prompts = ["What is 3 plus 4?\n", "Who lives in Stonebridge? Tell me about the weaver and her owl.\n", "One"]
    if tok.chat_template:
        prompts += [[{"role": "user", "content": "What is 3 plus 4?"}],
                    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Say bread."}]]
    batched = mt.evaluate.generate_answers(model, tok, prompts, batch_size=4, max_new_tokens=12)
    alone = [mt.evaluate.generate_answers(model, tok, [p], batch_size=1, max_new_tokens=12)[0] for p in prompts]
    assert batched == alone and all(batched)
    assert not any(tok.eos_token in answer for answer in batched if tok.eos_token)


# ---------------------------------------------------------------- bad input: refused before any work, by name

def _tiny_mistral(max_position_embeddings=128):
    return Mistral(MistralConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=max_position_embeddings)).eval()


def _tiny_gpt2(n_positions=64):
    return GPT2(GPT2Config(vocab_size=101, n_embd=32, n_layer=1, n_head=2, n_positions=n_positions)).eval()


def _forward_calls(model) -> list:
    """A list that grows by one at every forward pass of `model`."""
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


IDS = torch.randint(3, 101, (2, 5))

BAD_GENERATE_ARGUMENTS = {  # name: (arguments after the model, the error, the message it must match)
    "max_new_tokens float": ((IDS, 2.5), TypeError, r"max_new_tokens must be an int; got 2.5 \(float\)"),
    "max_new_tokens bool": ((IDS, True), TypeError, r"max_new_tokens must be an int; got True \(bool\)"),
    "max_new_tokens negative": ((IDS, -1), UserError, r"max_new_tokens must be >= 0; got -1"),
    "top_k float": ((IDS, 3, 1.0, 2.5), TypeError, r"top_k must be an int; got 2.5"),
    "top_k zero": ((IDS, 3, 1.0, 0), UserError, r"top_k must be >= 1; got 0"),
    "temperature str": ((IDS, 3, "0.7"), TypeError, r"temperature must be a number \(0 = greedy\); got '0.7'"),
    "temperature nan": ((IDS, 3, float("nan")), UserError, r"temperature must be a finite number >= 0.*got nan"),
    "temperature negative": ((IDS, 3, -1.0), UserError, r"temperature must be a finite number >= 0.*got -1.0"),
    "top_p str": ((IDS, 3, 1.0, None, "0.9"), TypeError, r"top_p must be a number in \(0, 1\] or None; got '0.9'"),
    "top_p above 1": ((IDS, 3, 1.0, None, 1.5), UserError, r"top_p must be in \(0, 1\]; got 1.5"),
    "eos_token_id str": ((IDS, 3, 0.0, None, None, "</s>"), TypeError, r"eos_token_id must be an int.*got '</s>'"),
    "input_ids list": (([[5, 6, 7]], 3), TypeError, r"input_ids must be a LongTensor.*got list"),
    "input_ids float": ((IDS.float(), 3), TypeError, r"input_ids must be a LongTensor.*got torch.float32"),
    "input_ids 1-d": ((IDS[0], 3), ValueError, r"got \(5,\) \(one prompt: input_ids\[None\]\)"),
    "input_ids empty": ((IDS[:, :0], 3), ValueError, r"prompt_len > 0; got \(2, 0\)"),
    "id past the embedding": ((IDS.masked_fill(IDS == IDS[1, 2], 101), 3), ValueError,
                              r"input_ids hold id 101, outside the model's embedding \(ids 0..100\).*check_fits"),
    "negative id": ((IDS.masked_fill(IDS == IDS[1, 2], -100), 3), ValueError, r"input_ids hold id -100, outside"),
    "ids on another device": ((IDS.to("meta"), 3), ValueError, r"input_ids are on meta but the model is on cpu"),
}


@pytest.mark.parametrize("case", BAD_GENERATE_ARGUMENTS)
def test_bad_generate_arguments_are_refused_by_name_before_any_work(case):
    model = _tiny_mistral()
    calls = _forward_calls(model)
    args, error, message = BAD_GENERATE_ARGUMENTS[case]
    with pytest.raises(error, match=message) as raised:
        mt.generate(model, *args)
    assert type(raised.value) is error and "\n" not in str(raised.value)  # this type, not a subclass; one line
    assert calls == []


def test_bad_generate_keywords_are_refused_by_name():
    model = _tiny_mistral()
    with pytest.raises(TypeError, match=r"pad_token_id must be an int or None; got 2.0"):
        mt.generate(model, IDS, 3, pad_token_id=2.0)
    packed = torch.tensor([[1, 1, 2, 2, 2], [1, 1, 1, 1, 1]])  # a packed row's numbering means nothing here
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0 \(padding\) and 1 \(token\).*got 2"):
        mt.generate(model, IDS, 3, attention_mask=packed)
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor of input_ids' shape \(2, 5\); got list"):
        mt.generate(model, IDS, 3, attention_mask=[[1] * 5] * 2)
    assert mt.generate(model, IDS, 3, attention_mask=torch.ones(2, 5, dtype=torch.bool)).shape == (2, 8)  # bool is fine
    import numpy as np
    assert mt.generate(model, IDS, np.int64(3), top_k=np.int64(5), temperature=1.0).shape == (2, 8)  # numpy ints too


def test_top_k_or_top_p_without_a_temperature_warns_that_decoding_is_greedy():
    model = _tiny_mistral()
    with pytest.warns(UserWarning, match=r"top_k=5 and top_p=None are ignored at temperature 0 \(greedy"):
        out = mt.generate(model, IDS, 3, top_k=5)
    assert torch.equal(out, mt.generate(model, IDS, 3))


def test_gpt2_generation_past_n_positions_is_refused_before_any_work():
    """The whole sequence must fit GPT-2's learned positions; it used to fail only after decoding some tokens
    (or, at one token over, to pass silently: the last new token is never fed)."""
    model = _tiny_gpt2(n_positions=64)
    calls = _forward_calls(model)
    ids = torch.randint(3, 101, (2, 60))
    for new in (5, 10):
        with pytest.raises(UserError, match=rf"prompt of 60 tokens \+ max_new_tokens {new} = {60 + new} is more than "
                                            r"GPT2's n_positions 64 \(config.json\)"):
            mt.generate(model, ids, new)
    assert calls == []
    mask = torch.ones_like(ids)
    mask[:, :2] = 0  # left padding takes no positions: 58 real tokens + 6 new fit in 64
    assert mt.generate(model, ids, 6, attention_mask=mask).shape == (2, 66)


def test_mistral_generation_past_max_position_embeddings_warns_once_before_any_work():
    """Rotary positions go on past max_position_embeddings: no error, one warning, before the first forward."""
    model = _tiny_mistral(max_position_embeddings=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen_at_first_forward = []
        model.register_forward_pre_hook(lambda module, args: seen_at_first_forward.append(len(caught)))
        out = mt.generate(model, torch.randint(3, 101, (1, 10)), 10)
    assert out.shape == (1, 20)
    assert [str(w.message) for w in caught] == [
        "Mistral: a sequence of 20 tokens runs past max_position_embeddings 16 in config.json, the length the model "
        "was trained for; outputs there are unreliable"]
    assert seen_at_first_forward[0] == 1


def test_generate_answers_checks_every_prompt_before_any_work():
    tok, model = mt.load_tokenizer(ASSETS / "tiny-gpt2"), mt.load_model(ASSETS / "tiny-gpt2").eval()
    calls = _forward_calls(model)
    with pytest.raises(TypeError, match="generate_answers expects a list of prompts.*got one str"):
        mt.evaluate.generate_answers(model, tok, "What is 3 plus 4?")  # would answer each character
    with pytest.raises(UserError, match=r"prompt 1 \(''\) encodes to no tokens"):
        mt.evaluate.generate_answers(model, tok, ["What is 3 plus 4?", ""])
    long = "Who lives in Stonebridge? " * 40
    n = len(tok.encode(long))
    assert n + 32 > model.config.n_positions == 256
    with pytest.raises(UserError, match=rf"prompt 1 of {n} tokens \+ max_new_tokens 32 = {n + 32} is more than "
                                        r"GPT2's n_positions 256"):
        mt.evaluate.generate_answers(model, tok, ["One", long], batch_size=1)
    assert calls == []
