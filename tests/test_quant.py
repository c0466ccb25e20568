"""NF4 (QLoRA): bitsandbytes' bytes and values, the Triton dequantization, NF4Linear, LoRA over it, loading,
saving and resuming, against bitsandbytes, transformers and PEFT.

bitsandbytes is a test-only oracle: the tests that need it skip without it (the library never imports it).
On the CPU two of its paths are not what it computes on a GPU, and the `bnb` fixture steers around them:

- `quantize_blockwise` (the double quantization of the block maxima) runs a C++ kernel that rounds through
  a 65,536-entry lookup table and picks the second-nearest 8-bit level for ~0.15% of values. Its CUDA kernel
  and its PyTorch reference backend round to the nearest, as minitune does; the fixture puts the reference
  in its place (test_bnb_cpu_lookup_table_misrounds_and_ours_is_the_nearest checks the difference itself).
- `Linear4bit.forward` on a CPU with AVX512-BF16 (eval, no grad) repacks the weight and rounds the block
  maxima to bfloat16; `exact_cpu_path` turns that shortcut off, leaving dequantize + matmul.

Also: its C++ CPU `dequantize_4bit` treats each row of the weight as whole blocks, so it is wrong when a row
is not a multiple of the block size (a (64, 64) weight in blocks of 128); the comparisons of values use its
PyTorch reference backend (`bnb_dequantize`), and the tiny models here have rows of whole blocks so that
transformers' 4-bit forward on the CPU is exact.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import minitune as mt
from minitune.errors import UserError
from minitune.kernels.nf4 import nf4_dequantize_reference, nf4_dequantize_triton, program_tile
from minitune.lora import apply_lora, disable_lora, merge_lora, save_adapter, save_merged
from minitune.quant import NF4Linear, NF4Weight, dynamic_code, nf4_code, quantize_model, quantize_nf4
from tests.conftest import EXAMPLES, save_hf, tiny_gpt2_config, tiny_mistral_config

TINY_MISTRAL = EXAMPLES / "assets" / "tiny-mistral"  # hidden 128, intermediate 384: rows of whole blocks
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernel: compiled on a GPU, interpreted here
QUANTIZED_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


# ---------------------------------------------------------------- bitsandbytes as the oracle


def _reference_backend():
    """The dispatch keys of bitsandbytes' PyTorch reference backend (its "default" kernels)."""
    return torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def _patch_bnb(mp: pytest.MonkeyPatch):
    """bitsandbytes computing on the CPU what it computes on a GPU (see the module docstring); returns it."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.backends.default.ops as default_ops
    import bitsandbytes.functional as bf

    def quantize_blockwise(A, code=None, absmax=None, out=None, blocksize=4096, nested=False):
        code = bf.create_dynamic_map().to(A.device) if code is None else code
        q, am = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(_reference_backend(), A, code, blocksize)
        return q, bf.QuantState(absmax=am, code=code.clone(), blocksize=blocksize, dtype=A.dtype)

    mp.setattr(bf, "quantize_blockwise", quantize_blockwise)
    # the reference backend's torch.compile'd helpers, run eagerly: the same code without a compile per shape
    for name in ("_dequantize_4bit_compute", "_dequantize_blockwise_compute"):
        fn = getattr(default_ops, name, None)
        if fn is not None and hasattr(fn, "__wrapped__"):
            mp.setattr(default_ops, name, fn.__wrapped__)
    return bnb


@pytest.fixture
def bnb(monkeypatch):
    return _patch_bnb(monkeypatch)


@pytest.fixture
def bnb_cpu():
    """bitsandbytes as installed, its CPU kernels untouched."""
    return pytest.importorskip("bitsandbytes")


def bnb_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    import bitsandbytes.functional as bf
    return bf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def bnb_dequantize(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes.functional.dequantize_4bit's arithmetic through its PyTorch reference backend (its GPU's
    values): the block maxima restored, then the 4-bit codes scaled."""
    absmax = state.absmax
    if state.nested:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default.redispatch(
            _reference_backend(), absmax, state.state2.absmax, state.state2.code, state.state2.blocksize,
            torch.float32) + state.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
        _reference_backend(), packed, absmax, state.blocksize, "nf4", state.shape, dtype)


def exact_cpu_path(model: nn.Module) -> nn.Module:
    """Turn off Linear4bit's AVX512-BF16 inference shortcut (block maxima rounded to bfloat16)."""
    import bitsandbytes as bnb
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def hf_4bit(path, dtype=torch.float32, quant_type="nf4"):
    """transformers + bitsandbytes' 4-bit model of the checkpoint at `path` (QLoRA's settings, `dtype` both the
    model's and the compute dtype), on the CPU."""
    import transformers
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=config,
                                                              device_map="cpu")
    return exact_cpu_path(model.eval())


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def tiny_ids(batch=2, length=11, vocab=101):
    return torch.randint(3, vocab, (batch, length))


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict entries of the model's 4-bit weights (bitsandbytes' names)."""
    names = mt.quant.nf4_weights(model)
    return {k: v for k, v in model.state_dict().items()
            if k in names or any(k.startswith(f"{n}.") for n in names)}


def assert_same_tensors(a: dict, b: dict):
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def family_folder(family: str, folder):
    """A random tiny Llama or Qwen2 (q/k/v biases, given values: transformers' init zeroes them) whose weight
    rows are whole blocks of 64, saved to `folder`."""
    import transformers
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family](
        vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- bit compatibility


def test_codes_are_bitsandbytes(bnb):
    import bitsandbytes.functional as bf
    assert torch.equal(dynamic_code(), bf.create_dynamic_map())
    assert torch.equal(nf4_code(), bf.get_4bit_type("nf4", device="cpu"))


# (33, 17): an odd count and a short last block; (7,): one short block; (300, 129): several nested blocks, the
# last one short; (2, 4096): a nested block count that is a whole number (32 or 64 maxima)
@pytest.mark.parametrize("shape", [(64, 64), (33, 17), (7,), (300, 129), (2, 4096)])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double_quant", [True, False], ids=["double", "single"])
def test_quantize_and_dequantize_equal_bitsandbytes(bnb, shape, blocksize, double_quant):
    for dtype in DTYPES:
        w = torch.randn(shape, dtype=dtype) * 0.05
        packed, state = bnb_quantize(w, blocksize, double_quant)
        ours = quantize_nf4(w, blocksize, double_quant)
        n = math.prod(shape)
        assert ours.codes.dtype == torch.uint8 and ours.codes.shape == (-(-n // 2), 1) == packed.shape
        assert torch.equal(ours.codes, packed), dtype
        assert ours.absmax.dtype == state.absmax.dtype == (torch.uint8 if double_quant else torch.float32)
        assert torch.equal(ours.absmax, state.absmax), dtype
        assert torch.equal(ours.quant_map, state.code)
        assert ours.double_quant == state.nested
        if double_quant:
            assert torch.equal(ours.nested_absmax, state.state2.absmax)
            assert torch.equal(ours.nested_quant_map, state.state2.code)
            assert ours.offset.dtype == state.offset.dtype and torch.equal(ours.offset, state.offset.reshape(1))
        else:
            assert ours.nested_absmax is None and ours.offset is None
        assert ours.shape == w.shape and ours.dtype == dtype
        assert ours.dequantize().dtype == dtype  # the original's by default
        for out_dtype in DTYPES:
            theirs = bnb_dequantize(packed, state, out_dtype)
            got = ours.dequantize(out_dtype)
            assert got.dtype == theirs.dtype == out_dtype and got.shape == theirs.shape == w.shape
            assert torch.equal(got, theirs), (dtype, out_dtype)


def edge_weights() -> dict[str, torch.Tensor]:
    code = nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2  # exactly between two levels: ties go to the lower one
    ties = torch.cat([midpoints, torch.tensor([1.0]), -midpoints, torch.zeros(33)])  # 64, the block's maximum 1
    return {
        "zero_block": torch.cat([torch.zeros(64), torch.randn(64 * 5 + 7)]),
        "all_zero": torch.zeros(3, 64),
        "same_maxima": torch.randn(20, 64).sign(),  # every block's maximum 1: the maxima less their mean are 0
        "ties": ties.repeat(4),
        "tiny_and_huge": torch.cat([torch.randn(64), torch.randn(64), torch.randn(64)]),  # scaled per dtype below
        "one_value": torch.tensor([-0.3]),
    }


@pytest.mark.parametrize("case", list(edge_weights()))
def test_edge_values_equal_bitsandbytes(bnb, case):
    w = edge_weights()[case]
    for dtype in DTYPES:
        x = w.to(dtype)
        if case == "tiny_and_huge":  # subnormal, smallest normal and near-largest blocks of the dtype
            info = torch.finfo(dtype)
            x = (w * torch.tensor([info.tiny / 8, info.tiny, info.max / 8]).repeat_interleave(64)).to(dtype)
        for double_quant in (True, False):
            packed, state = bnb_quantize(x, 64, double_quant)
            ours = quantize_nf4(x, 64, double_quant)
            if case == "ties" and dtype == torch.float32:  # each midpoint i, i + 1 got level i: the lower one
                first = torch.stack([ours.codes.view(-1) >> 4, ours.codes.view(-1) & 0xF], 1).view(-1)[:15]
                assert first.tolist() == list(range(15))
            assert torch.equal(ours.codes, packed) and torch.equal(ours.absmax, state.absmax), (dtype, double_quant)
            if double_quant:
                assert torch.equal(ours.nested_absmax, state.state2.absmax) and torch.equal(ours.offset, state.offset.reshape(1))
            for out_dtype in DTYPES:
                assert torch.equal(ours.dequantize(out_dtype), bnb_dequantize(packed, state, out_dtype)), out_dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: bitsandbytes' CUDA kernels as the oracle")
@pytest.mark.parametrize("dtype", DTYPES)
def test_on_cuda_bytes_and_values_are_bitsandbytes_cuda_kernels(bnb_cpu, dtype):
    """On a GPU, nothing patched: bitsandbytes' own CUDA quantize_4bit and dequantize_4bit against ours (the Triton
    kernel), at a Mistral-7B k_proj shape with outliers. Dequantizing bitsandbytes' own state (what a hub *-bnb-4bit
    checkpoint holds) is bit for bit. Quantizing: on an H200, bf16 and fp16 weights gave bitsandbytes' bytes exactly,
    float32 ones not quite: its CUDA build divides approximately (fast math), so a float32 value within a rounding
    of a boundary between two levels can land on the other one; the codes may differ there, by one level, rarely."""
    import bitsandbytes.functional as bf
    w = torch.randn(1024, 4096, device="cuda") * 0.02
    w[::97] *= 40
    w = w.to(dtype)
    packed, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    theirs = NF4Weight(packed.view(torch.uint8), state.absmax, w.shape, dtype, 64, state.state2.absmax, state.offset)
    assert torch.equal(theirs.dequantize(dtype), bf.dequantize_4bit(packed, state))  # our kernel, their state
    ours = quantize_nf4(w)
    assert torch.equal(ours.absmax, state.absmax) and torch.equal(ours.nested_absmax, state.state2.absmax)
    assert ours.offset.item() == state.offset.item()
    mine, bnb = ours.codes.view(-1), packed.view(torch.uint8).view(-1)
    levels = [(codes >> 4, codes & 0xF) for codes in (mine, bnb)]
    apart = [(a.int() - b.int()).abs() for a, b in zip(levels[0], levels[1])]
    if dtype != torch.float32:
        assert torch.equal(mine, bnb)
    assert max(int(d.max()) for d in apart) <= 1 and sum(int((d > 0).sum()) for d in apart) <= 1e-4 * w.numel()


def test_bnb_cpu_lookup_table_misrounds_and_ours_is_the_nearest(bnb_cpu):
    """bitsandbytes' CPU double quantization (a C++ lookup table) differs from ours on a few block maxima; at
    each of them ours is the nearer 8-bit level to the exact scaled value (the lower one on a tie). The 4-bit
    codes, the nested scales and the offset are the same."""
    w = torch.randn(1024, 1024)
    packed, state = bnb_quantize(w)
    ours = quantize_nf4(w)
    assert torch.equal(ours.codes, packed)
    assert torch.equal(ours.nested_absmax, state.state2.absmax) and torch.equal(ours.offset, state.offset.reshape(1))
    differ = (ours.absmax != state.absmax).nonzero().view(-1)
    assert 0 < differ.numel() < 0.005 * ours.absmax.numel()  # ~0.15% in bitsandbytes' measurements
    # the exact values quantized: the block maxima less their mean, times each nested block's 1 / scale
    centered = w.view(-1, 64).abs().amax(dim=1) - state.offset  # (blocks,)
    scaled = torch.cat([block * (1.0 / block.abs().amax()) for block in centered.split(256)]).double()
    code = dynamic_code().double()
    ours_off = (code[ours.absmax[differ].long()] - scaled[differ]).abs()
    theirs_off = (code[state.absmax[differ].long()] - scaled[differ]).abs()
    assert ((ours_off < theirs_off) | ((ours_off == theirs_off) & (ours.absmax[differ] < state.absmax[differ]))).all()
    # and away from them, the same rounding: everywhere ours is the nearest level
    nearest = (code[None, :] - scaled[:, None]).abs().min(dim=1).values
    assert torch.equal((code[ours.absmax.long()] - scaled).abs(), nearest)


@pytest.mark.parametrize("double_quant", [True, False], ids=["double", "single"])
def test_bnb_quant_state_from_our_state_dict_dequantizes_to_our_values(bnb, double_quant):
    """Our state-dict entries, read by bitsandbytes' own QuantState.from_dict, dequantize in its public
    dequantize_4bit (its C++ CPU kernel: rows of whole blocks) to our values; the entries are its names,
    bytes and JSON."""
    import bitsandbytes.functional as bf
    for dtype, shape in ((torch.bfloat16, (96, 128)), (torch.float32, (40, 192)), (torch.float16, (8, 64))):
        w = torch.randn(shape, dtype=dtype)
        layer = NF4Linear(quantize_nf4(w, 64, double_quant))
        sd = layer.state_dict()
        packed, state = bnb_quantize(w, 64, double_quant)
        theirs = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
        assert_same_tensors(sd, theirs)  # names, dtypes, bytes, the JSON blob byte for byte
        rebuilt = bf.QuantState.from_dict({k.removeprefix("weight."): v for k, v in sd.items() if k != "weight"},
                                         device=torch.device("cpu"))
        for out_dtype in DTYPES:
            rebuilt.dtype = out_dtype
            assert torch.equal(bf.dequantize_4bit(sd["weight"], rebuilt), layer.weight.dequantize(out_dtype))


def test_quantize_nf4_refuses_what_bitsandbytes_cannot_store():
    with pytest.raises(UserError, match="blocksize=48"):
        quantize_nf4(torch.randn(4, 64), blocksize=48)
    with pytest.raises(UserError, match="int64"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.int64))
    with pytest.raises(UserError, match="empty"):
        quantize_nf4(torch.empty(0, 64))


# ---------------------------------------------------------------- the Triton kernel


PROGRAM_VALUES = 2 * math.prod(program_tile(64, torch.bfloat16))  # what one program writes (half that in float32)


# values: one, a program's worth less one, exactly one, one more, several programs with a tail
@pytest.mark.parametrize("n", [1, PROGRAM_VALUES - 1, PROGRAM_VALUES, PROGRAM_VALUES + 3, 3 * PROGRAM_VALUES + 77])
@pytest.mark.parametrize("double_quant", [True, False], ids=["double", "single"])
def test_triton_dequantize_equals_reference(monkeypatch, n, double_quant):
    monkeypatch.setenv("MINITUNE_KERNELS", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = torch.randn(n, device=device) * 3
    w[::97] *= 40  # outliers: scales of many sizes
    for blocksize in (32, 64, 128, 4096) if n > 100 else (64,):  # 4096: a block spans two programs
        q = quantize_nf4(w, blocksize, double_quant)
        args = (q.codes, q.absmax, q.quant_map, n, blocksize)
        nested = (q.nested_absmax, q.nested_quant_map, q.offset, 256)
        for dtype in DTYPES:
            expected = nf4_dequantize_reference(*args, dtype, *nested)
            got = nf4_dequantize_triton(*args, dtype, *nested)
            assert got.dtype == dtype and torch.equal(got, expected), (blocksize, dtype)
            assert torch.equal(mt.kernels.nf4_dequantize(*args, dtype, *nested), expected)  # the dispatch
            assert torch.equal(q.dequantize(dtype), expected)


def _sm90_instructions(dtype: torch.dtype, double_quant: bool, blocksize: int) -> list[str]:
    """The instructions of the kernel's PTX for sm_90 (H100, H200), compiled here by Triton's own compiler (no GPU
    needed), specialized as a launch on a 7B layer is: 16-byte-aligned pointers, n and the byte count multiples
    of 16."""
    import re
    import shutil
    from pathlib import Path

    nvidia = pytest.importorskip("triton.backends.nvidia", reason="this Triton has no CUDA backend")
    if not any((Path(nvidia.__file__).parent / "bin").glob("ptxas*")) and not shutil.which("ptxas"):
        pytest.skip("Triton's CUDA backend has no ptxas here: nothing can be compiled for sm_90")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import JITFunction

    from minitune.kernels import nf4

    rows, cols = program_tile(blocksize, dtype)
    out = {torch.bfloat16: "*i16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    pointers = {"CODES": "*u8", "ABSMAX": "*u8" if double_quant else "*fp32", "CODE": "*fp32",
                "NESTED_ABSMAX": "*fp32", "NESTED_CODE": "*fp32", "OFFSET": "*fp32", "OUT": out}
    constants = {"BLOCKSIZE": blocksize, "NESTED_BLOCKSIZE": 256, "DOUBLE_QUANT": double_quant,
                 "BF16_BITS": dtype == torch.bfloat16, "ROWS": rows, "COLS": cols}
    signature = {**pointers, "n": "i64", "n_bytes": "i64", **dict.fromkeys(constants, "constexpr")}
    kernel = JITFunction(nf4._nf4_dequantize_kernel.fn)  # compiled, even where the interpreter wraps it
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants,
                       attrs={(i,): [["tt.divisibility", 16]] for i in range(len(pointers) + 2)})
    kernel = triton_compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": nf4.NUM_WARPS, "enable_fp_fusion": False})
    return re.findall(r"^\s*(?:@%p\d+\s+)?([a-z][\w.]*)", kernel.asm["ptx"], re.M)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernel itself: bench_kernels times it there")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 4096])
def test_triton_dequantize_compiles_to_one_load_and_one_16_byte_store_a_thread(dtype, blocksize):
    """Memory-bound, the kernel must move its bytes in as few, as wide accesses as it can: each thread loads its
    codes in one access, looks each nibble up, and writes its values in one 16-byte store, with no shared-memory
    round trip between (the interleaved layout of the first version went through shared memory, and read its
    codes a byte at a time)."""
    instructions = _sm90_instructions(dtype, double_quant=True, blocksize=blocksize)
    thread_bytes = 16 // (2 * dtype.itemsize)  # the codes of one 16-byte store: 4 bytes, 2 for float32
    codes_load = f"ld.global.b{8 * thread_bytes}"  # all of them in one load
    assert instructions.count("st.global.v4.b32") == 1
    assert not [i for i in instructions if i.startswith(("st.global.b", "st.shared", "ld.shared", "bar."))]
    assert instructions.count("ld.global.b8") == 1  # the row's 8-bit block maximum
    # 32-bit loads: two table lookups a byte; the maximum's dynamic-code value, its nested scale, the offset
    assert instructions.count("ld.global.b32") == 2 * thread_bytes + 3 + (codes_load == "ld.global.b32")
    assert codes_load in instructions


def test_triton_dequantize_is_chosen_by_the_environment(monkeypatch):
    q = quantize_nf4(torch.randn(40, 64, device=DEVICE))
    calls = []
    import minitune.kernels as kernels
    real = kernels.nf4_dequantize_triton
    monkeypatch.setattr(kernels, "nf4_dequantize_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("MINITUNE_KERNELS", "torch")
    torch_values = q.dequantize(torch.bfloat16)
    assert calls == []
    monkeypatch.setenv("MINITUNE_KERNELS", "triton")
    assert torch.equal(q.dequantize(torch.bfloat16), torch_values) and calls == [1]


# ---------------------------------------------------------------- NF4Linear


def dense_twin(layer: NF4Linear, dtype=torch.float32) -> nn.Linear:
    """An nn.Linear holding the dequantized weight (and the bias)."""
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(layer.weight.dequantize(dtype))
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    return dense.requires_grad_(False)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_nf4_linear_forward_and_input_gradient_match_the_dequantized_layer(bias):
    layer = NF4Linear.from_linear(nn.Linear(128, 96, bias=bias))
    if bias:  # Qwen2's q/k/v: a bias beside the 4-bit weight, frozen too
        with torch.no_grad():
            layer.bias.normal_()
    dense = dense_twin(layer)
    x = torch.randn(3, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), dense(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters())
    assert all(p.grad is None for p in layer.parameters())
    assert isinstance(layer.weight, NF4Weight) and layer.weight.nbytes() < 128 * 96 * 4 / 4  # vs float32


def test_nf4_linear_bias_is_added_as_f_linear_adds_it():
    """In bfloat16 the bias goes into the matmul's one rounding, as F.linear (and so transformers' Linear4bit,
    whose forward is F.linear over the dequantized weight) does: not a second rounding after it."""
    layer = NF4Linear.from_linear(nn.Linear(64, 64, bias=True, dtype=torch.bfloat16))
    with torch.no_grad():
        layer.bias.normal_(0, 0.5)  # Qwen2's q/k/v biases are large
    x = torch.randn(2, 11, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = F.linear(x, layer.weight.dequantize(torch.bfloat16), layer.bias)
        assert torch.equal(layer(x), expected)
    layer.bias.requires_grad_(True)  # frozen in NF4Linear, but a user may train it: its gradient is the sum
    layer(x).float().sum().backward()
    torch.testing.assert_close(layer.bias.grad.float(), torch.full((64,), 22.0))


def test_nf4_linear_under_activation_checkpointing():
    from torch.utils.checkpoint import checkpoint
    layer = NF4Linear.from_linear(nn.Linear(64, 128, bias=True))
    x = torch.randn(2, 7, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y = checkpoint(lambda t: F.silu(layer(t)), x, use_reentrant=False)
    y_ref = F.silu(dense_twin(layer)(x2))
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)


def test_nf4_linear_under_cpu_autocast_bf16():
    layer = NF4Linear.from_linear(nn.Linear(128, 64, bias=True))
    x = torch.randn(4, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        exact = x @ layer.weight.dequantize(torch.float32).t() + layer.bias  # float32
    torch.testing.assert_close(y.float(), exact, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        dense = dense_twin(layer)(x)  # what F.linear gives under autocast
    torch.testing.assert_close(y, dense, rtol=1.6e-2, atol=1e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, layer.weight.dequantize(torch.float32).sum(0).expand(4, -1),
                               rtol=2e-2, atol=2e-2)


def test_dtype_cast_keeps_the_quantization_state():
    model = mt.load_model(TINY_MISTRAL, dtype=torch.float32, quantize="nf4")
    before = tensors_of(model)
    weights = mt.quant.nf4_weights(model)
    values = {k: w.dequantize(torch.bfloat16) for k, w in weights.items()}
    model.to(torch.bfloat16)
    assert_same_tensors(tensors_of(model), before)  # codes, absmax, quant_map, nested_*, offset: not rounded
    for k, w in weights.items():
        assert w.absmax.dtype == torch.uint8 and w.nested_absmax.dtype == w.offset.dtype == torch.float32
        assert w.dtype == torch.bfloat16 and torch.equal(w.dequantize(), values[k])
        assert json.loads(bytes(w.bitsandbytes__nf4.tolist()))["dtype"] == "bfloat16"  # what the saved state says
    assert model.model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == torch.bfloat16
    assert logits(model, tiny_ids(vocab=1088)).dtype == torch.bfloat16
    model.half()
    assert_same_tensors(tensors_of(model), before)
    assert all(w.dequantize().dtype == torch.float16 for w in weights.values())


def test_dtype_cast_back_to_float32_follows():
    """A bfloat16 model cast to float32 dequantizes to float32, as a float32 model cast to bfloat16 goes to
    bfloat16: the dtype a cast names is the one dequantize() gives, whichever it is."""
    model = mt.load_model(TINY_MISTRAL, dtype=torch.bfloat16, quantize="nf4")
    before = tensors_of(model)
    model.to(torch.float32)
    assert_same_tensors(tensors_of(model), before)
    assert model.lm_head.weight.dtype == torch.float32
    weights = mt.quant.nf4_weights(model).values()
    assert [w.dtype for w in weights] == [torch.float32] * len(weights)
    assert all(w.dequantize().dtype == torch.float32 for w in weights)


def tensors_of(model) -> dict[str, torch.Tensor]:
    """Copies of the tensors of the model's NF4 weights, by name (whether parameters or buffers)."""
    return {f"{name}.{k}": t.detach().clone() for name, w in mt.quant.nf4_weights(model).items()
            for k, t in [*w.named_parameters(), *w.named_buffers()]}


def test_quantize_model_equals_quantized_loading():
    dense = mt.load_model(TINY_MISTRAL, dtype=torch.float32)
    quantize_model(dense)
    loaded = mt.load_model(TINY_MISTRAL, dtype=torch.float32, quantize="nf4")
    assert set(mt.quant.nf4_weights(dense)) == set(mt.quant.nf4_weights(loaded))
    assert len(mt.quant.nf4_weights(loaded)) == 4 * 7  # every linear layer of the 4 blocks
    assert_same_tensors(quantized_state(dense), quantized_state(loaded))
    ids = tiny_ids(vocab=1088)
    assert torch.equal(logits(dense, ids), logits(loaded, ids))


# ---------------------------------------------------------------- LoRA over NF4


def randomize_lora(model):
    with torch.no_grad():
        for _, layer in mt.lora.lora_layers(model):
            layer.lora_A.weight.normal_(0, 0.05)
            layer.lora_B.weight.normal_(0, 0.05)


def test_lora_over_nf4_trains_only_the_float32_adapters():
    model = mt.load_model(TINY_MISTRAL, dtype=torch.bfloat16, quantize="nf4")
    apply_lora(model, r=4, alpha=8, target_modules="all-linear", verbose=False)
    randomize_lora(model)
    layers = dict(mt.lora.lora_layers(model))
    assert len(layers) == 4 * 7 and all(isinstance(layer.weight, NF4Weight) for layer in layers.values())
    adapters = {f"{name}.{part}.weight": getattr(layer, part).weight
                for name, layer in layers.items() for part in ("lora_A", "lora_B")}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(adapters)
    assert all(p.dtype == torch.float32 for p in adapters.values())
    before = {k: v.clone() for k, v in model.state_dict().items()}

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tiny_ids(vocab=1088)
    out = model(ids)
    assert out.dtype == torch.bfloat16
    F.cross_entropy(out[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert all(p.grad is None for name, p in model.named_parameters() if name not in adapters)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.values())
    opt.step()
    after = model.state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(adapters)


def test_lora_over_nf4_gradients_survive_checkpointing():
    model = mt.load_model(TINY_MISTRAL, dtype=torch.float32, quantize="nf4")
    apply_lora(model, r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), verbose=False)
    randomize_lora(model)
    ids = tiny_ids(vocab=1088)
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.train()
        model.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)


def test_disable_lora_gives_the_base_and_merge_is_refused():
    model = mt.load_model(TINY_MISTRAL, dtype=torch.float32, quantize="nf4")
    ids = tiny_ids(vocab=1088)
    base = logits(model, ids)
    apply_lora(model, r=4, alpha=8, target_modules=("q_proj", "v_proj"), verbose=False)
    randomize_lora(model)
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, base)
    with disable_lora(model):
        assert torch.equal(logits(model, ids), base)
    assert torch.equal(logits(model, ids), adapted)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="4-bit") as refused:
        merge_lora(model)
    assert "\n" not in str(refused.value)
    assert_same_tensors(model.state_dict(), state)  # nothing merged
    assert torch.equal(logits(model, ids), adapted)


def test_peft_adapter_on_transformers_4bit_model_gives_our_logits(bnb, tmp_path):
    peft = pytest.importorskip("peft")
    model = mt.load_model(TINY_MISTRAL, dtype=torch.float32, quantize="nf4")
    apply_lora(model, r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), verbose=False)
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    hf = peft.PeftModel.from_pretrained(hf_4bit(TINY_MISTRAL), tmp_path / "adapter").eval()
    exact_cpu_path(hf)
    ids = tiny_ids(vocab=1088)
    ours, theirs = logits(model, ids), logits(hf, ids)
    assert (ours - theirs).abs().max() <= 1e-5
    with disable_lora(model), hf.disable_adapter():
        assert torch.equal(logits(model, ids), logits(hf, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_save_merged_over_nf4_is_a_plain_checkpoint(dtype, tmp_path):
    import transformers
    model = mt.load_model(TINY_MISTRAL, dtype=dtype, quantize="nf4")
    apply_lora(model, r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), verbose=False)
    randomize_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_merged(model, tmp_path / "merged")
    assert_same_tensors(model.state_dict(), before)  # the model is left as it was

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == str(dtype).removeprefix("torch.")
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any(k.endswith(QUANTIZED_PARTS) or "lora_" in k for k in saved)
    assert set(saved) == set(load_file(TINY_MISTRAL / "model.safetensors"))
    assert all(v.dtype == dtype for v in saved.values())
    for name, layer in mt.lora.lora_layers(model):  # dequantized, the float32 update added, rounded once
        expected = (layer.weight.dequantize(torch.float32) + layer.delta_weight()).to(dtype)
        assert torch.equal(saved[f"{name}.weight"], expected), name
    for name, w in mt.quant.nf4_weights(model).items():
        if name.removesuffix(".weight") not in dict(mt.lora.lora_layers(model)):
            assert torch.equal(saved[name], w.dequantize(dtype)), name

    if dtype == torch.float32:
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        assert not getattr(hf, "is_quantized", False)
        assert all(type(m) is not NF4Linear for m in hf.modules())
        ids = tiny_ids(vocab=1088)
        assert (logits(hf, ids) - logits(model, ids)).abs().max() <= 1e-5
        reloaded = mt.load_model(tmp_path / "merged")
        assert not mt.quant.is_quantized(reloaded)
        assert (logits(reloaded, ids) - logits(model, ids)).abs().max() <= 1e-5


# ---------------------------------------------------------------- loading and saving


@pytest.mark.parametrize("family, dtype", [("mistral", torch.float32), ("mistral", torch.bfloat16),
                                           ("llama", torch.float32), ("qwen2", torch.float32),
                                           ("qwen2", torch.bfloat16)], ids=lambda v: str(v).removeprefix("torch."))
def test_quantized_loading_gives_transformers_bitsandbytes_logits(bnb, family, dtype, tmp_path):
    path = TINY_MISTRAL if family == "mistral" else family_folder(family, tmp_path / family)
    vocab = 1088 if family == "mistral" else 101
    ours = mt.load_model(path, dtype=dtype, quantize="nf4")
    hf = hf_4bit(path, dtype)
    assert_same_tensors(quantized_state(ours), quantized_state_of_hf(hf))  # bitsandbytes' bytes, key for key
    if family == "qwen2":
        assert ours.model.layers[0].self_attn.q_proj.bias is not None
    ids = tiny_ids(vocab=vocab)
    got, expected = logits(ours, ids), logits(hf, ids)
    assert got.dtype == expected.dtype == dtype
    if dtype == torch.float32:
        assert (got - expected).abs().max() <= 1e-4  # the goal
    assert torch.equal(got, expected)  # and in fact


def quantized_state_of_hf(hf) -> dict[str, torch.Tensor]:
    return {k: v for k, v in hf.state_dict().items()
            if k.endswith(QUANTIZED_PARTS) or f"{k}.absmax" in hf.state_dict()}


def test_quantized_model_keeps_embeddings_norms_and_head_dense():
    dense = mt.load_model(TINY_MISTRAL, dtype=torch.bfloat16)
    quant = mt.load_model(TINY_MISTRAL, dtype=torch.bfloat16, quantize="nf4")
    layers = {name for name, m in quant.named_modules() if isinstance(m, NF4Linear)}
    assert layers == {name for name, m in dense.named_modules() if isinstance(m, nn.Linear) and ".layers." in name}
    dense_params = dict(dense.named_parameters())
    params = {k: p for k, p in quant.named_parameters() if k.rpartition(".weight.")[0] not in layers}
    assert set(params) == {k for k in dense_params if k.removesuffix(".weight") not in layers}
    assert any("norm" in k for k in params) and "lm_head.weight" in params and "model.embed_tokens.weight" in params
    for k, p in params.items():  # embeddings, norms, head: the dtype given, the checkpoint's values
        assert p.dtype == torch.bfloat16 and torch.equal(p, dense_params[k]), k
    for name in layers:
        w = quant.get_submodule(name).weight
        assert w.dtype == torch.bfloat16 and w.dequantize().dtype == torch.bfloat16
        # quantized from the weight cast to bfloat16, as transformers does
        assert_same_tensors(quant.get_submodule(name).state_dict(),
                            NF4Linear(quantize_nf4(dense.get_submodule(name).weight.detach())).state_dict())


def test_bnb_checkpoint_saved_by_transformers_loads_as_it_is(bnb, tmp_path):
    hf = hf_4bit(TINY_MISTRAL)
    hf.save_pretrained(tmp_path / "bnb")
    stored = load_file(tmp_path / "bnb" / "model.safetensors")
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.uint8
    ids = tiny_ids(vocab=1088)
    expected = logits(hf, ids)
    for quantize in (None, "nf4"):
        ours = mt.load_model(tmp_path / "bnb", dtype=torch.float32, quantize=quantize)
        assert len(mt.quant.nf4_weights(ours)) == 4 * 7
        assert_same_tensors(quantized_state(ours), {k: v for k, v in stored.items() if k in quantized_state(ours)})
        assert torch.equal(logits(ours, ids), expected), quantize


def test_our_quantized_save_loads_in_transformers_and_back(bnb, tmp_path):
    import bitsandbytes
    import transformers
    ours = mt.load_model(TINY_MISTRAL, dtype=torch.float32, quantize="nf4")
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] is True and qc["bnb_4bit_compute_dtype"] == "float32"
    stored = load_file(tmp_path / "ours" / "model.safetensors")
    assert_same_tensors({k: v for k, v in stored.items() if k in quantized_state(ours)}, quantized_state(ours))

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu").eval()
    exact_cpu_path(hf)
    assert isinstance(hf.model.layers[0].self_attn.q_proj, bitsandbytes.nn.Linear4bit)
    assert sum(isinstance(m, bitsandbytes.nn.Linear4bit) for m in hf.modules()) == 4 * 7
    ids = tiny_ids(vocab=1088)
    assert torch.equal(logits(hf, ids), logits(ours, ids))

    back = mt.load_model(tmp_path / "ours")
    assert_same_tensors(quantized_state(back), quantized_state(ours))
    assert torch.equal(logits(back, ids), logits(ours, ids))


def test_fp4_checkpoint_is_refused_naming_it(bnb, tmp_path):
    hf = hf_4bit(family_folder("llama", tmp_path / "dense"), quant_type="fp4")
    hf.save_pretrained(tmp_path / "fp4")
    config = json.loads((tmp_path / "fp4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "fp4"
    for quantize in (None, "nf4"):
        with pytest.raises(UserError, match="fp4") as refused:
            mt.load_model(tmp_path / "fp4", quantize=quantize)
        assert "\n" not in str(refused.value)
        assert "model.layers.0." in str(refused.value) or "model.layers.1." in str(refused.value)


def test_quantize_argument_and_family_are_checked(tmp_path):
    with pytest.raises(UserError, match="int8"):
        mt.load_model(TINY_MISTRAL, quantize="int8")
    save_hf(tiny_gpt2_config(), tmp_path / "gpt2")
    with pytest.raises(UserError, match="GPT-2") as refused:
        mt.load_model(tmp_path / "gpt2", quantize="nf4")
    assert "\n" not in str(refused.value)
    with pytest.raises(UserError, match="GPT-2"):
        quantize_model(mt.load_model(tmp_path / "gpt2"))


def _shorter(t):
    return t.reshape(-1)[:-1].clone()


def _longer(t):
    return torch.cat([t.reshape(-1), t.reshape(-1)[:1]])


def _transposed_state(blob: torch.Tensor) -> torch.Tensor:
    """The quant state's JSON with its shape reversed: the values of another weight than the layer's."""
    state = json.loads(bytes(blob.tolist()))
    state["shape"] = state["shape"][::-1]
    return torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


DAMAGE = {  # (the entry changed, how); the error must name that entry
    "absmax": ("model.layers.1.self_attn.k_proj.weight.absmax", _shorter),
    "nested_absmax": ("model.layers.2.mlp.down_proj.weight.nested_absmax", _longer),
    "bytes": ("model.layers.0.mlp.up_proj.weight", _shorter),
    "quant_state": ("model.layers.3.self_attn.o_proj.weight.quant_state.bitsandbytes__nf4",
                    lambda t: torch.tensor(list(b"{not json"), dtype=torch.uint8)),
    "quant_map": ("model.layers.0.self_attn.q_proj.weight.quant_map", lambda t: t.flip(0).clone()),
    "absmax_dtype": ("model.layers.1.mlp.gate_proj.weight.absmax", lambda t: t.float()),  # not the 8-bit codes
    "shape": ("model.layers.0.self_attn.k_proj.weight.quant_state.bitsandbytes__nf4", _transposed_state),
    "extra_layer": ("model.layers.9.mlp.up_proj.weight", None),  # a layer the model lacks, stored in 4 bits
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_bnb_entry_is_one_line_naming_the_tensor(damage, tmp_path):
    mt.load_model(TINY_MISTRAL, dtype=torch.float32, quantize="nf4").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    key, change = DAMAGE[damage]
    if change is None:  # a copy of layer 0's up_proj entries under the key
        for k in [k for k in tensors if k.startswith("model.layers.0.mlp.up_proj.weight")]:
            tensors[k.replace("model.layers.0.mlp.up_proj.weight", key)] = tensors[k].clone()
    else:
        tensors[key] = change(tensors[key])
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for quantize in (None, "nf4"):
        with pytest.raises(UserError) as refused:
            mt.load_model(tmp_path, quantize=quantize)
        message = str(refused.value)
        assert "\n" not in message and key.split(".quant_state.")[0] in message, message  # the tensor, or its weight


def test_bytes_stored_as_another_dtype_load_as_stored(tmp_path):
    """transformers with bnb_4bit_quant_storage=torch.bfloat16 (the FSDP-QLoRA recipe) stores the packed bytes as
    (n / 4, 1) bfloat16: the same bytes, read as they are."""
    model = mt.load_model(TINY_MISTRAL, dtype=torch.float32, quantize="nf4")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for name in mt.quant.nf4_weights(model):
        tensors[name] = tensors[name].view(-1).view(torch.bfloat16)[:, None].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = mt.load_model(tmp_path, dtype=torch.float32)
    assert_same_tensors(quantized_state(loaded), quantized_state(model))


def test_a_non_finite_weight_is_refused_naming_it(tmp_path):
    with pytest.raises(UserError, match="holds 32 NaN or infinite values"):
        quantize_nf4(torch.tensor([1.0, float("nan"), 2.0, float("inf")]).repeat(16))
    save_hf(tiny_mistral_config(), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError) as refused:
        mt.load_model(tmp_path, quantize="nf4")
    message = str(refused.value)
    assert "model.layers.1.mlp.down_proj.weight" in message and "NaN" in message and "\n" not in message


def test_triton_dequantize_keeps_a_nan_a_nan(monkeypatch):
    """bf16 rounding on the bits adds 0x7FFF: a NaN with a full mantissa (a GPU's 0x7FFFFFFF) would carry into
    -0.0 without the kernel's NaN guard. A NaN block maximum (a damaged checkpoint) gives NaNs, as torch's cast."""
    monkeypatch.setenv("MINITUNE_KERNELS", "triton")
    q = quantize_nf4(torch.randn(4096, device=DEVICE), double_quant=False)
    absmax = q.absmax.clone()
    absmax[3] = torch.tensor(0x7FFFFFFF, dtype=torch.int32, device=DEVICE).view(torch.float32)
    values = nf4_dequantize_triton(q.codes, absmax, q.quant_map, 4096, 64, torch.bfloat16)
    reference = nf4_dequantize_reference(q.codes, absmax, q.quant_map, 4096, 64, torch.bfloat16)
    assert torch.equal(values.isnan(), reference.isnan()) and values[3 * 64:4 * 64].isnan().any()
    assert torch.equal(values.nan_to_num(), reference.nan_to_num())


# ---------------------------------------------------------------- checkpoint resume


def test_checkpoint_of_lora_over_nf4_round_trips(tmp_path):
    model = mt.load_model(TINY_MISTRAL, dtype=torch.float32, quantize="nf4")
    apply_lora(model, r=4, alpha=8, target_modules=("q_proj", "v_proj", "gate_proj"), verbose=False)
    randomize_lora(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tiny_ids(vocab=1088)
    model(ids).logsumexp(-1).mean().backward()
    opt.step()
    path = mt.checkpoint.save_checkpoint(tmp_path, 1, model, opt, state={"epoch": 0})

    fresh = mt.load_model(TINY_MISTRAL, dtype=torch.float32, quantize="nf4")
    apply_lora(fresh, r=4, alpha=8, target_modules=("q_proj", "v_proj", "gate_proj"), verbose=False)
    with torch.no_grad():  # the load must fill the 4-bit state too, not find it already right
        for w in mt.quant.nf4_weights(fresh).values():
            w.codes.zero_()
            w.absmax.zero_()
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    assert mt.checkpoint.load_checkpoint(path, fresh, fresh_opt)["state"] == {"epoch": 0}
    assert_same_tensors(fresh.state_dict(), model.state_dict())  # NF4 buffers and adapters
    assert all(w.offset is not None and torch.equal(w.offset, mt.quant.nf4_weights(model)[k].offset)
               for k, w in mt.quant.nf4_weights(fresh).items())
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    saved_state = opt.state_dict()["state"]
    loaded_state = fresh_opt.state_dict()["state"]
    assert saved_state.keys() == loaded_state.keys()
    for i in saved_state:
        for k in saved_state[i]:
            assert torch.equal(saved_state[i][k], loaded_state[i][k])
    # and the two continue the same
    for m, o in ((model, opt), (fresh, fresh_opt)):
        o.zero_grad()
        m(ids).logsumexp(-1).mean().backward()
        o.step()
    assert torch.equal(logits(fresh, ids), logits(model, ids))

