"""What every model family shares: a config read from config.json and the load/save plumbing.

A family file (gpt2.py, mistral.py) defines its config dataclass and its nn.Module; this file
gives both the Hugging Face round trip, so the family files stay about the architecture.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UserError


@dataclass
class ModelConfig:
    """Base for a family's config: fields named as in config.json.

    Field defaults are the Hugging Face config class defaults, used only for keys a
    config.json leaves out (as transformers does). Keys we do not model are kept in `extra`
    and written back on save, so a saved folder loses nothing of the original config.
    """

    model_type: ClassVar[str] = ""
    architecture: ClassVar[str] = ""  # the transformers class name written to "architectures"
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        raw = dict(raw)
        if raw.get("model_type", cls.model_type) != cls.model_type:
            raise UserError(f"{source}: model_type {raw.get('model_type')!r}, expected {cls.model_type!r}")
        raw.pop("model_type", None)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
        values = {k: raw.pop(k) for k in list(raw) if k in fields}
        for key, value in values.items():
            default = fields[key].default
            ids = isinstance(value, list) and all(type(v) is int for v in value)  # several EOS ids, where allowed
            number = isinstance(value, (int, float)) or value is None or (ids and "list" in str(fields[key].type))
            if isinstance(default, (int, float)) and not number:
                raise UserError(f"{source}: key {key!r} is {value!r}, expected a number like {default!r}")
        cls._read_nested(raw, values, source)
        config = cls(**values, extra=raw)
        config.validate(source)
        return config

    @classmethod
    def _read_nested(cls, raw: dict[str, Any], values: dict[str, Any], source: str) -> None:
        """Hook for values stored under another name or nested: pops them from `raw` (or a field's raw value
        already in `values`) into `values`."""

    def validate(self, source: str) -> None:
        """Hook: raise ValueError naming `source` and the key when a value cannot work."""

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.extra.items() if k not in ("dtype", "torch_dtype")}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        out["model_type"] = self.model_type
        out["architectures"] = [self.architecture]
        return out


class CausalLM(nn.Module):
    """Base of the family models: loading, saving, tying and resizing. Each family's file holds its
    `forward` (logits, or the loss when given labels), top to bottom.

    Subclasses set `config_class` and may override the two checkpoint hooks to map hub tensor
    names and layouts to their own.
    """

    config_class: ClassVar[type[ModelConfig]]
    lm_head: nn.Linear
    # keys that are buffers in some hub checkpoints and that we never load (regexes)
    ignored_checkpoint_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None) -> "CausalLM":
        from . import load_model
        model = load_model(name_or_path, dtype=dtype, device=device)
        if not isinstance(model, cls):
            raise UserError(f"{name_or_path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def save_pretrained(self, out_dir: str, max_shard_size: int | str = "5GB",
                        state: dict[str, torch.Tensor] | None = None) -> None:
        from ..hub import save_model
        save_model(self, out_dir, max_shard_size=max_shard_size, state=state)

    # ---- checkpoint hooks: hub key/layout <-> our key/layout ----

    @classmethod
    def key_from_checkpoint(cls, key: str) -> str:
        """Our state-dict key for a hub tensor name."""
        return key

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The state dict in the hub's names and layouts; a tied head is the embedding, left out.

        LoRA tensors are never part of it (mt.lora.save_adapter writes them): the base weights as they
        stand go out, which are the merged ones after mt.lora.merge_lora."""
        state = {k: self.tensor_from_checkpoint(k, v) for k, v in self.state_dict().items()
                 if ".lora_A." not in k and ".lora_B." not in k}
        if self.head_is_tied:
            del state["lm_head.weight"]
        return state

    @classmethod
    def tensor_from_checkpoint(cls, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """A hub tensor in our layout (`key` is ours); must be its own inverse, as saving uses it too."""
        return tensor

    def input_embeddings(self) -> nn.Embedding:
        """The token embedding (the family knows where it lives)."""
        raise NotImplementedError

    @property
    def head_is_tied(self) -> bool:
        """Whether lm_head is the embedding matrix itself (not merely equal to it)."""
        return self.lm_head.weight is self.input_embeddings().weight

    @torch.no_grad()
    def resize_token_embeddings(self, new_size: int, pad_to_multiple_of: int | None = None,
                                new_tokens_from: int | None = None) -> int:
        """Grow the token embedding (and an untied head) to `new_size` rows, rounded up to a multiple of
        `pad_to_multiple_of` (64 keeps matmuls on tensor-core shapes); returns the new size.

        The rows of new tokens start at the mean of the rows before them, embedding and head each: a new
        token starts as an "average" token, with a logit near the typical one, not a random vector that
        the softmax would give a huge or tiny probability (Hewitt 2021, "Initializing new word
        embeddings"). New tokens are the ids from `new_tokens_from` (the tokenizer's length before it
        grew) on; by default the rows appended here. Pass it when the embedding was already padded past
        the tokenizer: those spare rows were never a token, and a tied head has trained them down.
        config.vocab_size follows, so save_pretrained writes a checkpoint transformers loads.
        """
        old = self.input_embeddings()
        rows = old.num_embeddings
        if pad_to_multiple_of:
            new_size = -(-new_size // pad_to_multiple_of) * pad_to_multiple_of
        new_size = max(new_size, rows) if new_tokens_from is not None else new_size
        start = rows if new_tokens_from is None else new_tokens_from
        if new_size < rows:
            raise ValueError(f"resize_token_embeddings: {new_size} rows is fewer than the {rows} the model has; "
                             "shrinking would drop trained tokens")
        if not 0 < start <= rows:
            raise ValueError(f"resize_token_embeddings: new_tokens_from={start} must be in 1..{rows}")

        def grown(weight: torch.Tensor) -> nn.Parameter:
            mean = weight[:start].float().mean(0, keepdim=True).to(weight.dtype)
            out = torch.cat([weight[:start], mean.expand(new_size - start, -1)])  # (new_size, C)
            return nn.Parameter(out, requires_grad=weight.requires_grad)

        tied = self.head_is_tied
        old.weight = grown(old.weight)
        old.num_embeddings = new_size
        self.lm_head.weight = old.weight if tied else grown(self.lm_head.weight)
        self.lm_head.out_features = new_size
        self.config.vocab_size = new_size
        return new_size

    def tie_weights(self) -> None:
        """Share the output projection with the input embedding when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.input_embeddings().weight

    def init_weights(self) -> None:
        """Random initialisation of every weight, each family's recipe (also after `to_empty`)."""
        raise NotImplementedError

    def post_init(self) -> None:
        """End of a family's __init__: tying, then the random init (skipped on the meta device).

        load_model builds on the meta device, where an init would only cost time (it pulls in
        torch's compiler stack) for weights about to be read from the checkpoint. A model built
        on meta and materialised with `to_empty` (FSDP2) gets its values from `init_weights()`.
        """
        self.tie_weights()
        if next(self.parameters()).device.type != "meta":
            self.init_weights()

    @property
    def device(self) -> torch.device:
        from ..distributed import model_device  # the GPU, for a sharded model whose shards live on the CPU
        return model_device(self)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, trainable_only: bool = False) -> int:
        from ..quant import parameter_numel  # a 4-bit weight counts its values, not its bytes
        return parameter_numel(self, trainable_only)
