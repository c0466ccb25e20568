"""On a GPU: the CUDA attention paths (flash with shared KV heads, memory-efficient with masks), bf16, and a training
forward and backward that never wait for the GPU.

Skipped without CUDA. bf16 is judged against transformers' own bf16 error: both are compared to a
float32 reference, and minitune's error may not be clearly worse than transformers'.
"""

from __future__ import annotations

import pytest
import torch

import minitune as mt
from tests.conftest import save_hf, tiny_gpt2_config, tiny_mistral_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIGS = {
    "gpt2": lambda: tiny_gpt2_config(n_embd=256, n_head=4, n_positions=256),
    "mistral_gqa_window": lambda: tiny_mistral_config(hidden_size=256, intermediate_size=512, num_attention_heads=8,
                                                      num_key_value_heads=2, sliding_window=48),
}


def _batch(T=96):
    ids = torch.randint(3, 101, (3, T), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :17] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("padded", [False, True])
def test_bf16_on_cuda_is_as_close_to_float32_as_transformers(name, padded, tmp_path):
    import transformers
    save_hf(CONFIGS[name](), tmp_path)
    ids, mask = _batch()
    if not padded:
        mask = torch.ones_like(mask)
    pos = (mask.cumsum(-1) - 1).clamp_min(0).masked_fill(mask == 0, 0)
    real = mask.bool()

    def hf_logits(dtype):
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).cuda().eval()
        with torch.no_grad():
            return hf(ids, attention_mask=mask, position_ids=pos).logits.float()[real]

    ref = hf_logits(torch.float32)
    ours32 = mt.load_model(tmp_path, dtype=torch.float32, device="cuda")
    ours16 = mt.load_model(tmp_path, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        err32 = (ours32(ids, attention_mask=mask).float()[real] - ref).abs().max().item()
        err16 = (ours16(ids, attention_mask=mask).float()[real] - ref).abs().max().item()
    hf_err16 = (hf_logits(torch.bfloat16) - ref).abs().max().item()
    assert err32 <= 2e-3, err32
    assert err16 <= 1.5 * hf_err16 + 1e-3, (err16, hf_err16)


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generation_on_cuda_equals_transformers(name, tmp_path):
    hf = save_hf(CONFIGS[name](), tmp_path).cuda()
    model = mt.load_model(tmp_path, device="cuda")
    ids, mask = _batch(T=20)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=60, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(mt.generate(model, ids, 60, attention_mask=mask), want)


def test_training_step_on_cuda_in_bf16(tmp_path):
    save_hf(CONFIGS["mistral_gqa_window"](), tmp_path)
    model = mt.load_model(tmp_path, dtype=torch.bfloat16, device="cuda").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, mask = _batch()
    losses = []
    for _ in range(5):
        logits = model(ids, attention_mask=mask)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("offload", [False, True], ids=["checkpoints", "offloaded-checkpoints"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_bf16_training_forward_and_backward_never_wait_for_the_gpu(packed, offload, tmp_path):
    """set_sync_debug_mode("error"): any host sync (a .item(), a bool() of a CUDA tensor) raises."""
    save_hf(CONFIGS["mistral_gqa_window"](), tmp_path)
    model = mt.load_model(tmp_path, dtype=torch.bfloat16, device="cuda").train()
    model.gradient_checkpointing, model.offload_checkpoints = True, offload  # offloaded: copies in stream order
    examples = [{"input_ids": torch.randint(3, 101, (n,)).tolist()} for n in (70, 40, 90, 30)]
    for example in examples:
        example["labels"] = example["input_ids"]
    batch = mt.data.collate(mt.data.pack(examples, 160) if packed else examples, pad_id=0)
    batch = {k: v.cuda() for k, v in batch.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch.get("position_ids"), labels=batch["labels"], reduction="sum")
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_variable_length_flash_attention_gives_the_masked_loss(packed, tmp_path):
    """cu_seqlens on a GPU in bf16: varlen_attn, no mask (GQA, a sliding window that bites); the masked path's loss
    and gradients within bf16's rounding."""
    from minitune.models.common import varlen_attn
    if varlen_attn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    save_hf(CONFIGS["mistral_gqa_window"](), tmp_path)
    model = mt.load_model(tmp_path, dtype=torch.bfloat16, device="cuda").train()
    examples = [{"input_ids": torch.randint(3, 101, (n,)).tolist()} for n in (70, 40, 90, 30, 55)]
    for example in examples:
        example["labels"] = example["input_ids"]
    batch = mt.data.collate(mt.data.pack(examples, 160) if packed else examples, pad_id=0)
    batch = {k: v.cuda() for k, v in batch.items()}
    results = []
    for cu_seqlens in (None, batch["cu_seqlens"]):
        model.zero_grad()
        loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch.get("position_ids"),
                     labels=batch["labels"], cu_seqlens=cu_seqlens)
        loss.backward()
        results.append((loss.detach().float(), [p.grad.float() for p in model.parameters()]))
    (masked, masked_grads), (varlen, varlen_grads) = results
    torch.testing.assert_close(varlen, masked, rtol=2e-2, atol=2e-2)
    for a, b in zip(varlen_grads, masked_grads):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


def test_full_fine_tuning_under_autocast_takes_the_variable_length_path(tmp_path):
    """float32 weights under bf16 autocast (the examples' full fine-tuning): q and k come out of RoPE in float32
    (float32 cos), and varlen_attn, a custom op autocast does not cast, needs them in bf16."""
    save_hf(CONFIGS["mistral_gqa_window"](), tmp_path)
    model = mt.load_model(tmp_path, dtype=torch.float32, device="cuda").train()
    examples = [{"input_ids": torch.randint(3, 101, (n,)).tolist()} for n in (70, 40, 90, 30)]
    for example in examples:
        example["labels"] = example["input_ids"]
    batch = {k: v.cuda() for k, v in mt.data.collate(mt.data.pack(examples, 160), pad_id=0).items()}
    losses = []
    for cu_seqlens in (None, batch["cu_seqlens"]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses.append(model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                position_ids=batch["position_ids"], labels=batch["labels"], cu_seqlens=cu_seqlens))
        losses[-1].backward()
    torch.testing.assert_close(losses[1].float(), losses[0].float(), rtol=2e-2, atol=2e-2)


def test_offloaded_checkpoints_leave_the_gpu_and_change_no_gradient(tmp_path):
    """model.offload_checkpoints: the blocks' checkpointed inputs wait in pinned CPU memory. After the forward the
    GPU holds every block's input less (a full fine-tune's peak comes later, in the backward, where the growing
    gradients hide the difference), and the gradients are those of checkpoints kept on the GPU (up to the attention
    backward's atomic additions, which make two runs of either differ in the last bits)."""
    layers, batch, T, hidden = 8, 4, 512, 256
    save_hf(tiny_mistral_config(hidden_size=hidden, intermediate_size=512, num_hidden_layers=layers,
                                num_attention_heads=8, num_key_value_heads=2), tmp_path)
    model = mt.load_model(tmp_path, dtype=torch.bfloat16, device="cuda").train()
    model.gradient_checkpointing = True
    ids = torch.randint(3, 101, (batch, T), device="cuda")
    model(ids, labels=ids).backward()  # a first step: one-time allocations (workspaces) out of the way
    held, grads = [], []
    for offload in (False, True):
        model.offload_checkpoints = offload
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(ids, labels=ids)
        torch.cuda.synchronize()
        held.append(torch.cuda.memory_allocated() - before)  # what the forward left for the backward
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    checkpoint_bytes = batch * T * hidden * 2  # one block's (B, T, C) bf16 input
    assert (layers - 1) * checkpoint_bytes <= held[0] - held[1] <= (layers + 1) * checkpoint_bytes, held
    for kept, offloaded in zip(*grads, strict=True):
        assert (kept.float() - offloaded.float()).norm() <= 1e-2 * kept.float().norm()
