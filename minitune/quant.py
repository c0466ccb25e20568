"""4-bit NormalFloat (NF4) weights: QLoRA (Dettmers et al. 2023) as bitsandbytes stores it, bit for bit.

A frozen weight of n values becomes half a byte per value plus a little state:

    blocks of 64 values, each scaled by its absolute maximum into [-1, 1]
    each value rounded to the nearest of the 16 NF4 levels (quantiles of a normal distribution),
        ties to the lower level; two 4-bit codes per byte, the first value in the high nibble
    double quantization: the block maxima less their mean (`offset`), in blocks of 256, each
        scaled by its absolute maximum and rounded to the nearest of 256 levels of the 8-bit
        "dynamic" code (Dettmers 2016); 4.127 bits a value in all instead of 4.5

    nf4 = quantize_nf4(weight)          # what bitsandbytes' quantize_4bit(weight, quant_type="nf4",
    w = nf4.dequantize(torch.bfloat16)  #   compress_statistics=True) gives, and dequantize_4bit undoes

`NF4Linear` is a frozen linear layer over such a weight: its forward dequantizes the weight for one
matmul (a Triton kernel on CUDA) and its backward dequantizes it again, so no full-precision copy
outlives the matmul. LoRA goes on top (`mt.lora.apply_lora`). `quantize_model` swaps a model's
decoder-block linear layers for NF4Linear; `mt.load_model(..., quantize="nf4")` does it while
streaming the checkpoint, and also reads the checkpoints transformers writes with bitsandbytes
(the hub's `*-bnb-4bit` repositories): the state-dict names are bitsandbytes' own.

On bitsandbytes' CPU backend: its C++ library rounds the 8-bit block-maxima codes through a
65,536-entry lookup table, which picks the second-nearest level for about 0.15% of them; its CUDA
kernels and its PyTorch reference backend round to the nearest, as this file does (tests/test_quant.py
checks both facts). Its CUDA quantization kernel (csrc/kernels.cu) parts from its own reference where
this file follows the reference: it is built with --use_fast_math, so its 1/absmax is an approximate
division, and a float32 value within a rounding or two of a boundary between levels can land one level
apart (on an H200, float32 weights' codes were not all bitsandbytes'; bf16 and fp16 weights' were,
byte for byte); an all-zero block (0 x 1/0 is NaN there and stores code 0, -1 times the block's near-zero
maximum); and a last, shorter block (scaled by a reciprocal there, divided in the reference). Dequantizing
is bit for bit either way, so a `*-bnb-4bit` checkpoint made on a GPU loads exactly
(test_quant.py compares against the CUDA kernels on a GPU).
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .kernels import nf4_dequantize

# The 16 NF4 levels, float32 as bitsandbytes holds them (create_normal_map(0.9677083), normalised to [-1, 1]).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' choices
NESTED_BLOCKSIZE = 256  # block maxima per scale in the double quantization
CHUNK = 1 << 18  # values quantized at once on the CPU: float32 temporaries of 1 MB (64x that on a GPU)
QUANT_METHOD = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                "bnb_4bit_quant_type": "nf4", "bnb_4bit_quant_storage": "uint8"}  # config.json's quantization_config


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dynamic_code(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code: 256 sorted levels in [-1, 1], dense near 0.

    For each decade 10^-6 .. 10^0 (exponent e = 0..6), 2^e levels: the midpoints of an even split of
    [0.1, 1] times 10^(e-6), with both signs; then 0 and 1. (create_dynamic_map(signed=True) in
    bitsandbytes/functional.py, whose arithmetic this repeats to the bit.)"""
    levels = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        levels += (10 ** (e - 6) * means).tolist() + (-(10 ** (e - 6)) * means).tolist()  # products in float32
    return torch.tensor(sorted(levels + [0.0, 1.0]), dtype=torch.float32, device=device)


def _blockwise(values: torch.Tensor, blocksize: int, code: torch.Tensor):
    """Yields (first value's index, absmax (blocks,) float32, indices (values,) int32), CHUNK values at a time:
    each block scaled into [-1, 1] by its absolute maximum and every value rounded to the nearest level of the
    sorted `code`, ties to the lower one (bitsandbytes' order of operations: a multiply by the reciprocal of the
    maximum, a division in a last, shorter block). Only one chunk's float32 temporaries exist at a time."""
    flat = values.reshape(-1)
    edges = (code[:-1] + code[1:]) / 2  # (levels - 1,): a value above edge i is nearer level i + 1
    full = flat.numel() - flat.numel() % blocksize
    step = CHUNK if flat.device.type == "cpu" else 64 * CHUNK  # on a GPU, fewer launches
    for start in range(0, full, step):  # whole blocks at a time: every block size divides CHUNK
        chunk = flat[start:min(start + step, full)].float().view(-1, blocksize)  # (blocks, bs)
        chunk_max = chunk.abs().amax(dim=1)  # (blocks,)
        scaled = (chunk * (1.0 / chunk_max.clamp(min=1e-38))[:, None]).clamp_(-1, 1)  # not in place: may be the weight
        yield start, chunk_max, torch.bucketize(scaled.view(-1), edges, out_int32=True)
    if full < flat.numel():
        tail = flat[full:].float()
        tail_max = tail.abs().amax().clamp(min=1e-38)
        yield full, tail_max[None], torch.bucketize(torch.clamp(tail / tail_max, -1, 1), edges, out_int32=True)


class NF4Weight(nn.Module):
    """A frozen weight in NF4 with its quantization state, under bitsandbytes' state-dict names.

    Its tensors are frozen parameters, as bitsandbytes' Params4bit and torchao's NF4Tensor are, so DDP and
    FSDP treat them as weights that never train (DDP would re-send buffers at every forward): `codes` (the
    packed bytes, saved as the layer's `weight`), `absmax`, `quant_map` (the 16 levels), and with double
    quantization `nested_absmax`, `nested_quant_map` (the dynamic code) and `offset`. The state dict adds
    `weight.quant_state.bitsandbytes__nf4`: bitsandbytes' JSON of the shape, dtype, block sizes and offset,
    as bytes. `shape` and `dtype` are the original weight's; `dequantize()` gives that dtype by default.
    """

    def __init__(self, codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, dtype: torch.dtype,
                 blocksize: int = 64, nested_absmax: torch.Tensor | None = None, offset: torch.Tensor | None = None):
        super().__init__()
        device = codes.device
        self.shape, self.dtype, self.blocksize = torch.Size(shape), dtype, blocksize
        double = nested_absmax is not None
        self._set("codes", codes.reshape(-1, 1))  # (ceil(n / 2), 1) uint8
        self._set("absmax", absmax)  # (blocks,) float32, or uint8 with double quantization
        self._set("quant_map", nf4_code(device))  # (16,)
        self._set("nested_absmax", nested_absmax)  # (ceil(blocks / 256),) float32
        self._set("nested_quant_map", dynamic_code(device) if double else None)  # (256,)
        self._set("offset", offset.float().reshape(1) if double else None)  # (1,) float32: FSDP shards no scalar

    def _set(self, name: str, value: torch.Tensor | None) -> None:
        self.register_parameter(name, None if value is None else nn.Parameter(value, requires_grad=False))

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def numel(self) -> int:
        return math.prod(self.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in `dtype` (default: the original's): bitsandbytes' dequantize_4bit, bit for bit."""
        flat = nf4_dequantize(self.codes, self.absmax, self.quant_map, self.numel(), self.blocksize,
                              dtype or self.dtype, self.nested_absmax, self.nested_quant_map, self.offset,
                              NESTED_BLOCKSIZE)
        return flat.view(self.shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parameters())

    # ---- bitsandbytes' state-dict layout: <prefix>weight is the bytes, the rest under <prefix>weight.* ----

    def quant_state_dict(self) -> dict:
        """The non-tensor state, as bitsandbytes' QuantState.as_dict packs it."""
        state = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                 "shape": list(self.shape)}
        if self.double_quant:
            state.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                          # meta: no value yet; sharded by FSDP2: gathered
                          "nested_offset": 0.0 if self.offset.is_meta else _whole(self.offset).item()})
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix[:-1]] = self.codes if keep_vars else self.codes.detach()  # "...q_proj.weight"
        for name in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
            if (value := self._parameters[name]) is not None:
                destination[prefix + name] = value if keep_vars else value.detach()
        destination[prefix + "quant_state.bitsandbytes__nf4"] = self.bitsandbytes__nf4

    @property
    def bitsandbytes__nf4(self) -> torch.Tensor:
        """quant_state_dict() as bitsandbytes packs it: JSON, as a uint8 tensor of its bytes."""
        return torch.tensor(list(json.dumps(self.quant_state_dict()).encode()), dtype=torch.uint8)

    @property
    def quant_state(self) -> "NF4Weight":
        # torch.distributed.checkpoint finds a state-dict entry by walking its dotted name with getattr:
        # "...weight.quant_state.bitsandbytes__nf4" must lead to the blob, as through bitsandbytes' QuantState
        return self

    def _apply(self, fn, recurse=True):
        # .to(device) moves the state; a dtype cast (model.to(torch.bfloat16), .half()) must not round the
        # float32 block maxima and levels: it changes only the dtype dequantize() gives
        device = fn(torch.zeros(1, device=self.device)).device
        for dtype in (torch.float32, torch.float16):  # .float() leaves float32 alone, .half() float16
            if (cast := fn(torch.zeros(1, dtype=dtype, device=self.device)).dtype) != dtype:
                self.dtype = cast
                fn = lambda t: t.to(device)  # noqa: E731
                break
        for name, value in self._parameters.items():
            if value is not None:
                self._set(name, fn(value.detach()))
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        parts = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if "codes" not in parts:  # the bytes, handed down by the layer (pass_bytes_down)
            missing_keys.append(prefix[:-1])
            return
        try:
            loaded = from_bnb({"": parts.pop("codes"), **parts}, where=prefix[:-1])
        except UserError as e:
            error_msgs.append(str(e))
            return
        self.set_(loaded)
        # "offset" comes from torch.distributed.checkpoint, which adds each parameter under its own name (its value is
        # also in the JSON state, which wins)
        known = {"absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset", "quant_state.bitsandbytes__nf4"}
        unexpected_keys += [prefix + key for key in parts if key not in known]

    @torch.no_grad()
    def set_(self, other: "NF4Weight") -> None:
        """Take another NF4Weight's values (on this one's device, unless this one is still on the meta device)."""
        if other.shape != self.shape:
            raise UserError(f"a 4-bit weight of shape {list(other.shape)} for a layer of shape {list(self.shape)}")
        device = other.device if self.device.type == "meta" else self.device
        self.dtype, self.blocksize = other.dtype, other.blocksize
        for name, value in other._parameters.items():
            self._set(name, None if value is None else value.detach().to(device))

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, double_quant={self.double_quant}"


def pass_bytes_down(layer: nn.Module, state_dict: dict, prefix: str) -> None:
    """For a layer's _load_from_state_dict: bitsandbytes keeps a 4-bit weight's bytes at "<layer>.weight", which
    load_state_dict hands to the layer, not to its NF4Weight (whose entries are "<layer>.weight.*"): move them
    to "<layer>.weight.codes", where the NF4Weight finds them."""
    if isinstance(layer.weight, NF4Weight) and prefix + "weight" in state_dict:
        state_dict[prefix + "weight.codes"] = state_dict.pop(prefix + "weight")


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor FSDP2 has sharded, gathered whole (every rank must call this); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """`weight` in NF4 on its own device: bitsandbytes' quantize_4bit(weight, blocksize, quant_type="nf4",
    compress_statistics=double_quant), bit for bit (its packed bytes, absmax, offset and nested state)."""
    if blocksize not in BLOCKSIZES:
        raise UserError(f"quantize_nf4: blocksize={blocksize!r}; bitsandbytes' block sizes are {BLOCKSIZES}")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UserError(f"quantize_nf4: a {weight.dtype} weight; expected float32, bfloat16 or float16")
    if weight.numel() == 0:
        raise UserError("quantize_nf4: an empty weight")
    n, device = weight.numel(), weight.device
    codes = torch.empty(-(-n // 2), dtype=torch.uint8, device=device)  # (ceil(n / 2),)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=device)  # (blocks,)
    for start, chunk_max, index in _blockwise(weight, blocksize, nf4_code(device)):
        absmax[start // blocksize:start // blocksize + chunk_max.numel()] = chunk_max
        if index.numel() % 2:
            index = F.pad(index, (0, 1), value=NF4_LEVELS.index(0.0))  # an odd count: a last value of 0 pads the byte
        pairs = index.to(torch.uint8).view(-1, 2)
        codes[start // 2:start // 2 + pairs.shape[0]] = (pairs[:, 0] << 4) | pairs[:, 1]  # first value: high nibble
    if not torch.isfinite(absmax).all():  # a NaN or inf would spread to every block through the offset
        bad = (~torch.isfinite(weight)).sum().item()
        raise UserError(f"quantize_nf4: the weight holds {bad} NaN or infinite values; NF4 can store only finite ones")
    if not double_quant:
        return NF4Weight(codes, absmax, weight.shape, weight.dtype, blocksize)
    offset = absmax.mean()
    nested = list(_blockwise(absmax - offset, NESTED_BLOCKSIZE, dynamic_code(device)))  # [(start, max, index)]
    nested_absmax, nested_index = torch.cat([m for _, m, _ in nested]), torch.cat([i for _, _, i in nested])
    return NF4Weight(codes, nested_index.to(torch.uint8), weight.shape, weight.dtype, blocksize, nested_absmax,
                     offset)


def from_bnb(parts: dict[str, torch.Tensor], where: str) -> NF4Weight:
    """An NF4Weight from bitsandbytes' state-dict entries of one layer's weight: "" (the bytes), "absmax",
    "quant_map", "quant_state.bitsandbytes__nf4" and, when double-quantized, "nested_absmax" and
    "nested_quant_map". `where` (the weight's key) names it in errors."""
    blob_key = next((k for k in parts if k.startswith("quant_state.bitsandbytes__")), None)
    if blob_key is None:
        raise UserError(f"{where}: a uint8 weight without its quant_state.bitsandbytes__nf4 entry; a 4-bit "
                        "checkpoint stores one beside each quantized weight")
    kind = blob_key.rpartition("__")[2]
    if kind != "nf4":
        raise UserError(f"{where}: bitsandbytes quant_type {kind!r}; minitune reads NF4 weights only "
                        "(bnb_4bit_quant_type='nf4')")
    try:
        state = json.loads(bytes(parts[blob_key].cpu().numpy()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where}.{blob_key}: not bitsandbytes' JSON quant state ({e})") from None
    double = "nested_absmax" in parts
    need = ["", "absmax"] + (["nested_absmax", "nested_quant_map"] if double else [])
    if missing := [f"{where}.{k}".rstrip(".") for k in need if k not in parts]:
        raise UserError(f"{where}: missing {', '.join(missing)} in the 4-bit checkpoint")
    try:
        shape, blocksize, dtype = torch.Size(state["shape"]), int(state["blocksize"]), getattr(torch, state["dtype"])
        nested = (int(state["nested_blocksize"]), float(state["nested_offset"])) if double else (NESTED_BLOCKSIZE, 0.0)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{where}.{blob_key}: quant state {state} lacks or garbles {e}") from None
    codes = parts[""].reshape(-1).view(torch.uint8)  # bitsandbytes may store the bytes as another dtype
    device = codes.device
    if "quant_map" in parts and not torch.equal(parts["quant_map"].float().cpu(), nf4_code()):
        raise UserError(f"{where}.quant_map: not the 16 NF4 levels")
    if double and not torch.equal(parts["nested_quant_map"].float().cpu(), dynamic_code()):
        raise UserError(f"{where}.nested_quant_map: not bitsandbytes' 8-bit dynamic code")
    if blocksize not in BLOCKSIZES or nested[0] != NESTED_BLOCKSIZE:
        raise UserError(f"{where}: block sizes {blocksize} and {nested[0]}; expected one of {BLOCKSIZES} and "
                        f"{NESTED_BLOCKSIZE}")
    n = math.prod(shape)
    blocks = -(-n // blocksize)
    parts = {**parts, "": codes}
    sizes = {"": -(-n // 2), "absmax": blocks, "nested_absmax": -(-blocks // NESTED_BLOCKSIZE) if double else None}
    for key, want in sizes.items():
        if want is not None and parts[key].numel() != want:
            raise UserError(f"{where}.{key}".rstrip(".") + f": {parts[key].numel()} values for a {list(shape)} "
                            f"weight in blocks of {blocksize}; expected {want}")
    if parts["absmax"].dtype != (want := torch.uint8 if double else torch.float32):
        raise UserError(f"{where}.absmax: {parts['absmax'].dtype}; with{'' if double else 'out'} double quantization "
                        f"bitsandbytes stores {want}")
    absmax = parts["absmax"]
    return NF4Weight(codes, absmax, shape, dtype, blocksize,
                     parts["nested_absmax"].float() if double else None,
                     torch.tensor(nested[1], dtype=torch.float32, device=device) if double else None)


# ---------------------------------------------------------------- the layer


class _NF4Matmul(torch.autograd.Function):
    """x @ W^T + b with W dequantized in the forward and again in the backward: no full-precision W kept between
    them. W never trains; the bias (frozen in NF4Linear) gets its gradient only if it asks for one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight
        bias = None if bias is None else bias.to(x.dtype)
        return F.linear(x, weight.dequantize(x.dtype), bias)  # (..., in) -> (..., out), one rounding as nn.Linear

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad @ ctx.weight.dequantize(grad.dtype) if ctx.needs_input_grad[0] else None  # (..., out) @ (out, in)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor | NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear that also takes an NF4Weight. Under autocast the matmul runs in the autocast dtype, as
    F.linear's would."""
    if not isinstance(weight, NF4Weight):
        return F.linear(x, weight, bias)
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return _NF4Matmul.apply(x, weight, bias)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is NF4: y = x @ dequantize(W)^T + b. The bias (Qwen2's q/k/v) stays
    in its dtype, frozen too."""

    def __init__(self, weight: NF4Weight, bias: nn.Parameter | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, layer: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        return cls(quantize_nf4(layer.weight.detach(), blocksize, double_quant), layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        pass_bytes_down(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ---------------------------------------------------------------- models


def quantizable_layers(model: nn.Module) -> list[str]:
    """Paths of the linear layers QLoRA quantizes: those inside the decoder blocks (attention and MLP). The
    embeddings, norms and head stay in the compute dtype, as transformers + bitsandbytes leave them."""
    if getattr(getattr(model, "config", None), "model_type", None) == "gpt2":
        raise UserError("NF4 quantization is for the Mistral-family decoders (Mistral, Llama, Qwen): GPT-2's "
                        "layers are Conv1D in its checkpoints, which bitsandbytes never quantizes")
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in f".{name}" and ".lora_" not in name]


def quantize_model(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
                   names: list[str] | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Swap the decoder blocks' linear layers (or those at `names`) for NF4Linear, in place; returns the model.

    On the meta device the swap builds empty NF4 layers of the right sizes (load_model fills them as it
    streams the checkpoint); elsewhere it quantizes each layer's weight on its device and frees it. `dtype`
    (default: the model's) is the compute dtype the saved config names."""
    for name in quantizable_layers(model) if names is None else names:
        layer = model.get_submodule(name)
        if isinstance(layer, NF4Linear):
            continue
        if not isinstance(layer, nn.Linear) or type(layer) is not nn.Linear:
            raise UserError(f"quantize_model: {name} is a {type(layer).__name__}; quantize before apply_lora")
        if layer.weight.device.type == "meta":
            new = NF4Linear(empty_nf4(layer.weight.shape, layer.weight.dtype, blocksize, double_quant), layer.bias)
        else:
            new = NF4Linear.from_linear(layer, blocksize, double_quant)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    if hasattr(model, "config"):  # what transformers writes, so that it loads the saved model in 4-bit too
        model.config.extra.setdefault("quantization_config", {
            **QUANT_METHOD, "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": _dtype_name(dtype or next(model.parameters()).dtype)})
    return model


def empty_nf4(shape: torch.Size, dtype: torch.dtype, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """An NF4Weight of `shape` on the meta device: the sizes of its buffers, no memory."""
    n = math.prod(shape)
    blocks = -(-n // blocksize)
    meta = {"device": "meta"}
    return NF4Weight(torch.empty(-(-n // 2), dtype=torch.uint8, **meta),
                     torch.empty(blocks, dtype=torch.uint8 if double_quant else torch.float32, **meta), shape, dtype,
                     blocksize, torch.empty(-(-blocks // NESTED_BLOCKSIZE), **meta) if double_quant else None,
                     torch.empty((), **meta) if double_quant else None)


def nf4_weights(model: nn.Module) -> dict[str, NF4Weight]:
    """The model's NF4 weights by state-dict key (a layer's path + ".weight")."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NF4Weight)}


@torch.no_grad()
def dequantized_state(model: nn.Module, delta=None) -> dict[str, torch.Tensor]:
    """The model's checkpoint_state() with every NF4 weight (and its quantization state) replaced by the
    dequantized weight in its dtype, on the CPU: a plain checkpoint. `delta(key)`, when given, is a float32
    update to add first (a LoRA adapter's), or None; the sum is rounded once. One weight at a time is
    dequantized on its device."""
    quantized = nf4_weights(model)
    state = {}
    for key, value in model.checkpoint_state().items():
        if any(key.startswith(f"{name}.") for name in quantized):  # weight.absmax, weight.quant_map, ...
            continue
        if key not in quantized:
            state[key] = value
            continue
        weight = quantized[key]
        update = delta(key) if delta is not None else None
        dense = weight.dequantize(torch.float32 if update is not None else weight.dtype)
        state[key] = (dense if update is None else dense + update).to(weight.dtype).cpu()
    return state


def parameter_numel(model: nn.Module, trainable_only: bool = False) -> int:
    """The model's parameter count, a tied weight once and a 4-bit weight by its values (not its bytes)."""
    quantized = [m for m in model.modules() if isinstance(m, NF4Weight)]
    skip = {id(p) for m in quantized for p in m.parameters()}
    params = {id(p): p for p in model.parameters() if id(p) not in skip and (p.requires_grad or not trainable_only)}
    return sum(p.numel() for p in params.values()) + (0 if trainable_only else sum(m.numel() for m in quantized))


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, NF4Weight) for m in model.modules())


__all__ = ["NF4Weight", "NF4Linear", "quantize_nf4", "from_bnb", "linear", "quantize_model", "quantizable_layers",
           "nf4_weights", "is_quantized", "dequantized_state", "parameter_numel", "pass_bytes_down", "empty_nf4", "nf4_code", "dynamic_code", "NF4_LEVELS"]
