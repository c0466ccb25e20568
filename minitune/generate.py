"""Autoregressive decoding with a KV cache: greedy, temperature, top-k and top-p sampling.

The prompt runs through the model once (prefill) and fills a cache allocated for this call;
every later step feeds one token per row. Batched prompts are left-padded, so every row's
next token sits in the last column; the attention mask keeps padding invisible and the
positions count only real tokens. Every argument is checked before the first forward pass.
"""

from __future__ import annotations

import math
import warnings

import torch

from .distributed import all_ranks, is_sharded
from .errors import UserError, is_int, is_number
from .models.base import CausalLM
from .models.common import warn_past_trained_length


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


def _check_int(name: str, value, minimum: int) -> None:
    if not is_int(value):
        raise TypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise UserError(f"{name} must be >= {minimum}; got {value}")


def _check_args(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_token_id):
    """Each argument's type (TypeError) and value (UserError, a ValueError), named with the value given."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be a LongTensor of token ids (torch.tensor([ids]) makes one); got {got}")
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        hint = " (one prompt: input_ids[None])" if input_ids.dim() == 1 else ""
        raise ValueError(f"input_ids must be (batch, prompt_len) with prompt_len > 0; "
                         f"got {tuple(input_ids.shape)}{hint}")
    _check_int("max_new_tokens", max_new_tokens, 0)
    if not is_number(temperature):
        raise TypeError(f"temperature must be a number (0 = greedy); "
                        f"got {temperature!r} ({type(temperature).__name__})")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature must be a finite number >= 0 (0 = greedy); got {temperature}")
    if top_k is not None:
        _check_int("top_k", top_k, 1)
    if top_p is not None and not is_number(top_p):
        raise TypeError(f"top_p must be a number in (0, 1] or None; got {top_p!r} ({type(top_p).__name__})")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1]; got {top_p}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        warnings.warn(f"top_k={top_k} and top_p={top_p} are ignored at temperature 0 (greedy decoding); "
                      "pass temperature > 0 to sample", stacklevel=4)  # 4: the caller of generate
    if isinstance(eos_token_id, torch.Tensor):
        eos_ok = not (eos_token_id.is_floating_point() or eos_token_id.dtype == torch.bool)
    else:
        ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        eos_ok = eos_token_id is None or all(map(is_int, ids))
    if not eos_ok:
        raise TypeError(f"eos_token_id must be an int, a list of ints, a tensor of ids or None; got {eos_token_id!r}")
    if pad_token_id is not None and not is_int(pad_token_id):
        raise TypeError(f"pad_token_id must be an int or None; got {pad_token_id!r}")


def _checked_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mask of a left-padded batch: input_ids' shape, 0 (padding) and 1 (token) only, ones when None."""
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}; got {got}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but input_ids are on {input_ids.device}")
    other = attention_mask[(attention_mask != 0) & (attention_mask != 1)]  # a packed row's 2, 3, ...; an additive mask
    if other.numel():
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (token) in generate; got {other[0].item()}")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("attention_mask ends in padding: batched prompts must be left-padded")
    return attention_mask


def _check_ids(model: CausalLM, input_ids: torch.Tensor) -> None:
    """The ids must be on the model's device and rows of its embedding (the error there is a crash deep in torch)."""
    if input_ids.device != model.device:
        raise ValueError(f"input_ids are on {input_ids.device} but the model is on {model.device}: "
                         "move them with input_ids.to(model.device)")
    rows = model.input_embeddings().num_embeddings
    low, high = (int(v) for v in torch.aminmax(input_ids))
    if low < 0 or high >= rows:
        raise ValueError(f"input_ids hold id {low if low < 0 else high}, outside the model's embedding "
                         f"(ids 0..{rows - 1}); a tokenizer bigger than the model? see minitune.tokenizer.check_fits")


def check_length(model: CausalLM, prompt_len: int, max_new_tokens: int, prompt: str = "prompt") -> None:
    """Refuse, before any work, a generation that would run out of positions; warn where it leaves training.

    The whole sequence, prompt and new tokens, must fit. GPT-2's learned positions stop at n_positions:
    past it there is no embedding, so it is an error. Rotary positions (the Mistral family) go on past
    max_position_embeddings, but the model never trained there: a warning, the one its forward gives.
    `prompt` names the prompt in the message (e.g. "prompt 3" of a list).
    """
    _check_int("max_new_tokens", max_new_tokens, 0)
    config, total = model.config, prompt_len + max_new_tokens
    if hasattr(config, "n_positions") and total > config.n_positions:  # learned positions: a hard end
        raise UserError(f"{prompt} of {prompt_len} tokens + max_new_tokens {max_new_tokens} = {total} is more than "
                        f"{type(model).__name__}'s n_positions {config.n_positions} (config.json): "
                        "shorten the prompt or lower max_new_tokens")
    if hasattr(config, "max_position_embeddings"):  # rotary positions: they go on, with a warning
        warn_past_trained_length(model, total, config.max_position_embeddings)


@torch.no_grad()  # not inference_mode: the ids it returns may feed a training step (online DPO)
def generate(model: CausalLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, attention_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None, pad_token_id: int | None = None) -> torch.Tensor:
    """Prompt plus up to `max_new_tokens` new tokens per row: LongTensor (B, T + new).

    A row stops at its first EOS (any of `eos_token_id`); later positions of that row hold
    `pad_token_id` (default: the first EOS id), and decoding ends early once every row has
    stopped. Pass `attention_mask` for left-padded batches; pass a seeded `generator` for
    repeatable sampling. A model sharded with FSDP2 decodes until every rank's rows have stopped
    (each rank must call generate as many times, with the same max_new_tokens).
    """
    _check_args(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_token_id)
    _check_ids(model, input_ids)
    attention_mask = _checked_mask(input_ids, attention_mask)
    check_length(model, int(attention_mask.sum(-1).max()), max_new_tokens)  # the longest row's real tokens
    eos = torch.as_tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long,
                          device=input_ids.device).flatten()
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)

    was_training = model.training
    model.eval()  # no dropout while decoding
    try:
        return _decode(model, input_ids, attention_mask.long(), max_new_tokens, eos, pad,
                       lambda logits: sample_next(logits, temperature, top_k, top_p, generator))
    finally:
        model.train(was_training)


def _decode(model, tokens, mask, max_new_tokens, eos, pad, pick):
    lockstep = is_sharded(model)  # FSDP2: every rank must run every forward, so all stop together
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
        if all_ranks(bool(done.all()), tokens.device) if lockstep else bool(done.all()):
            break
        step_input = next_ids[:, None]
    return tokens
