"""Autoregressive decoding with a KV cache: greedy, temperature, top-k and top-p sampling.

The prompt runs through the model once (prefill) and fills a cache allocated for this call;
every later step feeds one token per row. Batched prompts are left-padded, so every row's
next token sits in the last column; the attention mask keeps padding invisible and the
positions count only real tokens.
"""

from __future__ import annotations

import torch

from .models.base import CausalLM


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). temperature 0 = argmax."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the first always stays
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _check_args(input_ids, max_new_tokens, temperature, top_k, top_p):
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise ValueError(f"input_ids must be (batch, prompt_len) with prompt_len > 0; got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1; got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")


@torch.no_grad()  # not inference_mode: the ids it returns may feed a training step (online DPO)
def generate(model: CausalLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, attention_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None, pad_token_id: int | None = None) -> torch.Tensor:
    """Prompt plus up to `max_new_tokens` new tokens per row: LongTensor (B, T + new).

    A row stops at its first EOS (any of `eos_token_id`); later positions of that row hold
    `pad_token_id` (default: the first EOS id), and decoding ends early once every row has
    stopped. Pass `attention_mask` for left-padded batches; pass a seeded `generator` for
    repeatable sampling.
    """
    _check_args(input_ids, max_new_tokens, temperature, top_k, top_p)
    eos = torch.as_tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long,
                          device=input_ids.device).flatten()
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != "
                         f"input_ids shape {tuple(input_ids.shape)}")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("attention_mask ends in padding: batched prompts must be left-padded")

    was_training = model.training
    model.eval()  # no dropout while decoding
    try:
        return _decode(model, input_ids, attention_mask.long(), max_new_tokens, eos, pad,
                       lambda logits: sample_next(logits, temperature, top_k, top_p, generator))
    finally:
        model.train(was_training)


def _decode(model, tokens, mask, max_new_tokens, eos, pad, pick):
    cache = model.make_cache(tokens.size(0), tokens.size(1) + max_new_tokens)
    step_input = tokens  # the whole prompt first (prefill), then one token per row
    done = torch.zeros(tokens.size(0), dtype=torch.bool, device=tokens.device)
    for _ in range(max_new_tokens):
        logits = model(step_input, attention_mask=mask, cache=cache, logits_to_keep=1)  # (B, 1, vocab): the last only
        next_ids = pick(logits[:, -1])  # (B,)
        next_ids = next_ids.masked_fill(done, pad)
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_ids)[:, None]], dim=1)
        done = done | torch.isin(next_ids, eos)
        if bool(done.all()):
            break
        step_input = next_ids[:, None]
    return tokens
