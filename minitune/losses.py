"""Training losses built on the models' final hidden states and the fused kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label of a position without a loss, as in Hugging Face


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The target of position t is the label at t + 1; the last position has none.

    Shifting the labels left (instead of dropping the last hidden state) keeps the hidden states
    contiguous, so the loss never copies them.
    """
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)  # (B, T)


def causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                   reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of `model` on a batch, without materialising the logits.

    labels [B, T] are aligned with input_ids, as in Hugging Face (`labels=input_ids` trains on every
    token; -100 marks positions without a loss, such as a prompt); they are shifted inside. Without
    labels, every non-padding token is a target. reduction "mean" averages over the targets,
    "sum" adds them up (divide by the token count of a whole accumulated batch yourself), "none"
    gives [B, T] with 0 where there is no target.

    The loss is float32. The model computes it in its forward (`model(..., labels=...)`), so a model
    wrapped in DDP or FSDP works the same: `kernels.fused_linear_cross_entropy` on the final hidden
    states and the `lm_head` weight (tied or not), one chunk of [tokens, vocab] logits at a time.
    """
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    return model(input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                 reduction=reduction)
