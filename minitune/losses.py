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
                   reduction: str = "mean", cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy of `model` on a batch, without materialising the logits.

    labels [B, T] are aligned with input_ids, as in Hugging Face (`labels=input_ids` trains on every
    token; -100 marks positions without a loss, such as a prompt); they are shifted inside. Without
    labels, every non-padding token is a target. reduction "mean" averages over the targets,
    "sum" adds them up (divide by the token count of a whole accumulated batch yourself), "none"
    gives [B, T] with 0 where there is no target.

    The loss is float32. The model computes it in its forward (`model(..., labels=...)`), so a model
    wrapped in DDP or FSDP works the same: `kernels.fused_linear_cross_entropy` on the final hidden
    states and the `lm_head` weight (tied or not), one chunk of [tokens, vocab] logits at a time.
    `lm_head`'s own forward does not run then, so under FSDP it must stay a plain Linear in the root
    module's unit, whose hooks gather its weight.
    """
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}  # a collated batch's bounds (see collate)
    return model(input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                 reduction=reduction, **extra)


def sequence_logps(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   average: bool = False) -> torch.Tensor:
    """log π(answer | prompt) of each row [B], float32: the sum of the labelled tokens' log-probabilities.

    labels [B, T] are aligned with input_ids, -100 on the prompt and the padding, as for the LM loss:
    the label at t is the token predicted from positions < t. The per-token log-probabilities are the
    negated per-token losses of the fused kernel (reduction="none"), so the [B, T, vocab] logits are
    never materialised: one chunk of rows at a time, as in training. average=True divides each row's sum
    by its number of labelled tokens (the length-normalised log-probability of IPO's and SimPO's papers).
    """
    token_losses = causal_lm_loss(model, input_ids, labels, attention_mask, reduction="none")  # (B, T), 0 off target
    logps = -token_losses.sum(-1)  # (B,)
    if average:
        logps = logps / (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
    return logps


def preference_logps(model, batch: dict[str, torch.Tensor], average: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probabilities [B] of a `data.collate_preferences` batch: its 2B sequences, the
    first B the chosen answers and the last B the rejected ones, in one forward rather than two, so the
    weights are read (and, under FSDP, gathered) once per micro-batch. In a packed batch each token's loss
    goes to its sequence (`sequence_ids`), padding adding a 0; unpacked, each row is one sequence."""
    token_losses = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                  batch.get("position_ids"), reduction="none", cu_seqlens=batch.get("cu_seqlens"))
    if "sequence_ids" in batch:  # packed: 2B sequences (a shape, nothing read back), padding (-1) adds 0 to the first
        owner = batch["sequence_ids"].clamp(min=0).flatten()
        logps = -torch.zeros(batch["answer_tokens"].numel(), device=token_losses.device).scatter_add(
            0, owner, token_losses.flatten())  # (2B,)
    else:
        logps = -token_losses.sum(-1)  # (2B,): a row per sequence
    if average:  # per labelled token (IPO, SimPO)
        logps = logps / batch["answer_tokens"].clamp(min=1)
    return logps.chunk(2)


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example preference losses [B], and the detached implicit rewards of the chosen and rejected answers.

    With the log-ratio margin  h = (log πθ(y_w) − log πref(y_w)) − (log πθ(y_l) − log πref(y_l)):

      sigmoid  −(1 − ε) log σ(β h) − ε log σ(−β h)          DPO (Rafailov et al. 2023, "Direct Preference
               Optimization: Your Language Model is Secretly a Reward Model"); ε = label_smoothing > 0 is
               conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences")
      ipo      (h − 1 / (2β))²                               IPO (Azar et al. 2023, "A General Theoretical
               Paradigm to Understand Learning from Human Preferences"); pass per-token average log-probs
               for its length-normalised form
      hinge    max(0, 1 − β h)                               SLiC (Zhao et al. 2023, "SLiC-HF")
      robust   ((1 − ε)(−log σ(β h)) + ε log σ(−β h)) / (1 − 2ε)   robust DPO (Chowdhury et al. 2024,
               "Provably Robust DPO"): an unbiased loss under preference labels flipped with rate ε

    The rewards are β (log πθ − log πref) of each answer, detached: TRL's rewards/chosen and rewards/rejected.
    When the policy equals the reference, h = 0: the sigmoid loss is ln 2 and both rewards are 0.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {', '.join(DPO_LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to the sigmoid and robust losses, not to {loss_type!r}")
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                reference_rejected_logps)}
    if len(shapes) != 1:
        raise ValueError(f"the four log-probability tensors must have one shape [B], got {sorted(map(tuple, shapes))}")
    chosen = policy_chosen_logps.float() - reference_chosen_logps.float()
    rejected = policy_rejected_logps.float() - reference_rejected_logps.float()
    h = chosen - rejected
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * h) * (1 - eps) + F.logsigmoid(-beta * h) * eps) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen.detach(), beta * rejected.detach()
