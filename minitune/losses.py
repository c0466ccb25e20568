"""Training losses built on the models' final hidden states and the fused kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The target of position t is the label at t + 1; the last position has none.

    Shifting the labels left (instead of dropping the last hidden state) keeps the hidden states
    contiguous, so the loss never copies them.
    """
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)  # (B, T)


def causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                   ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy of `model` on a batch, without materialising the logits.

    labels [B, T] are aligned with input_ids, as in Hugging Face (`labels=input_ids` trains on every
    token; -100 marks positions without a loss, such as a prompt); they are shifted here. Without
    labels, every non-padding token is a target. reduction "mean" averages over the targets,
    "sum" adds them up (divide by the token count of a whole accumulated batch yourself), "none"
    gives [B, T] with 0 where there is no target.

    The loss is float32 and goes through `kernels.fused_linear_cross_entropy` with the model's
    `lm_head` weight (tied or not), so only a chunk of [tokens, vocab] logits exists at a time.
    """
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    hidden = model.hidden_states(input_ids, attention_mask, position_ids)  # (B, T, C)
    return kernels.fused_linear_cross_entropy(hidden, model.lm_head.weight, shift_labels(labels, ignore_index),
                                              ignore_index, reduction, label_smoothing)
