"""Training step: minitune against transformers, same weights and data: a causal-LM step and the SFT example's;
and the DPO example's LoRA step with each of its three reference models, against each other.

    python benchmarks/bench_train.py --out benchmarks/out      # CPU: about 5 minutes on 2 cores
    python benchmarks/bench_train.py --out benchmarks/out      # on a GPU: the ~1B Mistral configs and the 7B LoRA/QLoRA ones
    python benchmarks/bench_train.py --configs qlora-mistral-small --out /tmp/bench_qlora   # QLoRA against bitsandbytes, CPU
    python benchmarks/bench_train.py --configs sft-tiny-mistral --out /tmp/bench_sft    # the SFT step alone
    python benchmarks/bench_train.py --configs dpo-lora-mistral-small --out /tmp/bench_dpo  # the DPO references
    python benchmarks/bench_train.py --configs packed-mistral-small --out /tmp/bench_packed  # packed, realistic lengths

Five kinds of config, all full optimizer steps of each library on the same weights and data:

- random token batches (gpt2-small, mistral-small; mistral-1b on a GPU): a random transformers model
  is built from the config with a fixed seed and saved (config.json + model.safetensors) to a
  temporary folder; every run trains on those weights (in --dtype) and the same batch of random ids:

    minitune:      loss = minitune.losses.causal_lm_loss(model, ids, labels=ids)
    transformers:  loss = model(input_ids=ids, labels=ids).loss
    both:          loss.backward(); AdamW.step() (lr LR); zero_grad()

- LoRA (lora-mistral-small; lora-mistral-1b and lora-mistral-7b on a GPU): the random-token step of the named
  base config with LoRA r=16, alpha 32 on every linear layer but the head, AdamW over the adapters only:

    minitune:      minitune.lora.apply_lora(model, ...); causal_lm_loss(model, ids, labels=ids)
    transformers:  peft.get_peft_model(model, LoraConfig(...)); model(input_ids=ids, labels=ids).loss

  QLoRA (qlora-mistral-small on the CPU, qlora-mistral-7b on a GPU): the same over a base whose decoder-block
  linear layers are 4-bit NF4 (block size 64, double quantization), quantized from the same checkpoint as it
  loads; embeddings, norms and head in --dtype, the adapters float32 in both (peft's autocast_adapter_dtype):

    minitune:      minitune.load_model(folder, dtype, device, quantize="nf4"), then as LoRA
    transformers:  from_pretrained(folder, dtype=dtype, device_map=device, quantization_config=BitsAndBytesConfig(
                       load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=dtype)), then as LoRA (bitsandbytes' CPU backend on the CPU)

  peft.prepare_model_for_kbit_training is not called: it casts every parameter that is not 4-bit (embeddings,
  norms, head) to float32, which minitune keeps in --dtype; both hold the same tensors in the same dtypes
  (the JSON records them per library). The 7B configs and qlora-mistral-small train with activation
  checkpointing, one decoder layer per checkpoint, non-reentrant, in both (`model.gradient_checkpointing =
  True`; transformers' activation_checkpointing_enable / gradient_checkpointing_enable(use_reentrant=False));
  --grad-checkpointing on|off overrides a config's choice (lora-mistral-small with `on` is qlora-mistral-small
  without the quantization, but for its MLP width); `offload` is `on` with minitune's checkpoints kept in pinned
  CPU memory (`model.offload_checkpoints`; transformers has no such option and checkpoints as with `on`).
  qlora-mistral-small's base, mistral-small-704, is mistral-small with intermediate size 704 instead of 688:
  bitsandbytes 0.50.2's CPU dequantize_4bit gets the values of a weight wrong when its rows are not a whole
  number of 64-value blocks (down_proj's 688), which would make transformers' CPU QLoRA train another model
  than the checkpoint's.
  Mistral-7B's shape (mistral-7b: vocab 32000, hidden 4096, intermediate 14336, 32 layers, 32/8 heads,
  rope_theta 10000, max positions 32768) with random weights: a seeded transformers model built on the
  device itself in --dtype (seconds, where the CPU would take minutes), saved once (14.5 GB in bf16) and loaded
  by both libraries; --work keeps it for the next run (gpu_run.sh's qlora and lora steps share it).
  sliding_window is None rather than Mistral-7B-v0.1's 4096: at 2048 tokens the window never bites, so the
  maths is the same, and without it neither library builds an attention mask, whatever its rules for
  skipping one: both call SDPA with is_causal=True (the flash kernel on a GPU). 2 x 2048 tokens a step; the
  7B configs time transformers against minitune only (no minitune-torch model: the time budget of one GPU
  run; bench_kernels.py's nf4_dequantize rows show the Triton kernel against the PyTorch reference).

- packed (issue 20; packed-mistral-small on the CPU, packed-mistral-1b full fine-tuning in 8 x 2048, and
  packed-lora- and packed-qlora-mistral-7b in 2 x 4096 with checkpointing on a GPU): one step of examples of
  realistic lengths (see PACKED), best-fit decreasing into the rows. minitune trains the collated rows (segment
  ids, positions from 0 per example; on a GPU in bf16 variable-length flash attention within cu_seqlens, no mask);
  transformers the same rows with a block-causal 4-D mask (its padding-free layout needs flash-attn to keep the
  examples apart); on a GPU also transformers patched by Liger Kernel (RMSNorm, SwiGLU, RoPE, the fused linear
  cross-entropy), when its wheel is there. The report adds MFU (step_flops / time / PEAK_TFLOPS) and judges
  PACKED_GOALS on a GPU.

- the SFT step of examples/finetune_mistral.py (sft-tiny-mistral: the bundled tiny-mistral folder
  itself; sft-mistral-1b on a GPU: mistral-1b's random checkpoint, written in float32): the first
  SFT_STEPS optimizer steps of the example's data order over its bundled chats (its parse_args
  defaults, load_examples, micro_batches, collated: right-padded, labels -100 off the assistant turns;
  tokenized by tiny-mistral's tokenizer, whose ids are valid in the 32000 vocab too), step r of a run
  training on step r % SFT_STEPS's micro-batches. float32 weights, compute under the example's
  autocast (bf16 on a GPU, float32 on the CPU); both use the example's make_optimizer and
  make_scheduler settings (AdamW lr 1e-3, cosine with warmup), so their parameter groups and
  learning rates are the same:

    minitune:      the example's train_step(model, batches, optimizer, scheduler, autocast, max_grad_norm)
    transformers:  per micro-batch model(input_ids, attention_mask, labels, num_items_in_batch=n).loss
                   .backward(), n = the target tokens of the whole accumulated batch (transformers then
                   sums over the targets and divides by n, the example's normalisation); then
                   clip_grad_norm_, optimizer.step(), scheduler.step(), zero_grad()

- the LoRA DPO step of examples/dpo.py (dpo-lora-mistral-small; dpo-lora-mistral-1b on a GPU): not
  minitune against transformers but the example's three reference models against each other, the
  "libraries" being its --reference modes. The named CONFIGS entry's random checkpoint, written in
  float32 (the example's master weights), is the SFT model: policy and reference. Data: the bundled
  preference pairs (examples/data/preference/train.jsonl) encoded by the example's load_pairs with
  tiny-mistral's tokenizer (its ids are valid in the 32000 vocab; chat prompts, max length 256: 29-89
  tokens a row), the first DPO_STEPS optimizer steps of its data order (micro_batches) collated by
  collate_preferences (chosen and rejected rows of a micro-batch in one forward), step r of a run on
  step r % DPO_STEPS's micro-batches; the example's parse_args defaults (loss type, beta, its RPO term,
  make_optimizer's AdamW, make_scheduler's schedule, clipping; the JSON and table name them) with LoRA
  r=16, alpha 32 on every linear layer but the head (--lora-targets all-linear), and its autocast (bf16
  on a GPU). Each mode loads the policy the same way, then does what the example does between loading
  and training, in its order (the memory children take their baseline right after loading):

    copy:           Reference("copy", model), a frozen deep copy of the base model, made before apply_lora
    lora-disabled:  Reference("lora-disabled", model): the reference forward is the policy's with the
                    adapters switched off (mt.lora.disable_lora), through the same weights
    precomputed:    precompute_logps(model, ...) over the measured steps' pairs (the example runs it over
                    the whole training set; the same batch size, so the same per-batch memory), attached
                    to the examples (attach_logps); the step reads them from the batch, no reference forward
    all three:      apply_lora_args (seeded, so every mode's A is the same), then per step the example's
                    dpo_step(model, reference, micro_batches, optimizer, scheduler, autocast, args)

  The CPU config trains 1 micro-batch of 4 pairs a step (8 rows of at most 89 tokens: a step takes
  about 1 s on 2 cores, so the run about 2 minutes); the GPU's 2 micro-batches of 32 pairs (the
  example's default is 1 of 16): more rows per forward, so that the activations, not just the
  weights, are the size of a real run's, and gradient accumulation is in the step. LoRA's B starts at zero, so at step
  1 the policy is the reference and every mode's DPO loss is ln 2 = 0.693147 (the table says whether
  they agree); the "loss" dpo_step returns also holds RPO's rpo_alpha x NLL term when the example's
  --rpo-alpha is not 0, so the losses recorded for DPO configs are that loss - rpo_alpha x its nll_loss,
  and the whole loss is kept beside them (total_losses). Speed: the paired rounds below, ratios to the
  copy reference; the precompute pass is one-off and not in the step's time. Memory: the copy holds a
  second set of the base weights; lora-disabled runs a second forward through the same weights;
  precomputed runs no reference forward at all. Besides the peak, the memory children record what the
  set-up (reference, LoRA, optimizer) holds before the first step (setup_increase_bytes).

Speed: ONE process loads every library's model (each with its own optimizer), runs --warmup rounds,
then --steps timed rounds; a round is one step of each library, back to back, the order rotated
each round (with two libraries: A B, B A, A B, ...), so a slow patch of a noisy machine hits both,
and both train on the same batches in a round. Each step ends with loss.item() (and on a GPU a
synchronize), so its time is the step's.
- ms / step: each library's median over the timed rounds; tokens per second: the median over the
  rounds of the step's non-padding tokens (the example's `tokens`; batch x seq for random ids) / its time;
- the paired ratio: in each round, minitune's step time / transformers' step time; its median over
  the rounds (the machine's drift cancels within a round) decides the goal, and its spread
  (interquartile range, min-max) shows the noise; "vs transformers" is 1 / that median;
- the first step's loss of each library (for SFT the mean over the step's targets): the same weights
  and data give the same loss, which shows that both train the same model the same way.
Memory: one fresh process per library (so the peak is its own), --mem-warmup + --mem-steps steps:
GPU: torch.cuda.max_memory_allocated over the steps (all of it, and the increase over the weights);
CPU: the peak RSS increase over the steps (VmHWM after resetting it through /proc/self/clear_refs)
above the RSS after loading the model (and the peak RSS itself, torch's libraries included); the
optimizer's state is in it. For DPO the window starts right after loading the policy, so it holds
what each reference mode adds (the copy's weights, the precompute pass), LoRA and the optimizer too.

On the CPU, small GPT-2 and Mistral configs in float32 and sft-tiny-mistral; on a GPU, a ~1B
Mistral-architecture config in bf16 and its SFT step (float32 weights, bf16 autocast), plus minitune
with MINITUNE_KERNELS=torch (its PyTorch paths instead of the Triton kernels; its own model and
optimizer, the variable set around its steps only), so the kernels' share is visible.
Writes <out>/bench_train.json and <out>/bench_train.md (after each stage, so a run cut short keeps
what it measured), which state whether "a minitune training step is at least as fast as
transformers' on the same config" holds (the goal is the CPU's; a GPU run reports it for
information; DPO configs have no speed goal). MB is 10**6 bytes.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # minitune from this checkout, installed or not

from bench_load import child_env, count_values, proc_status, reset_peak  # benchmarks/ is on sys.path

SEED = 0
LR = 1e-4
# name: (transformers config class, its arguments, batch, sequence length, device type)
CONFIGS = {
    "gpt2-small": ("GPT2Config", {"vocab_size": 50257, "n_embd": 256, "n_layer": 4, "n_head": 4,
                                  "n_positions": 1024, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
                   4, 256, "cpu"),
    "mistral-small": ("MistralConfig", {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 688,
                                        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
                                        "max_position_embeddings": 1024, "sliding_window": None,
                                        "tie_word_embeddings": False},
                      4, 256, "cpu"),
    # mistral-small with rows of a whole number of NF4 blocks (704 = 11 x 64): bitsandbytes 0.50.2's CPU
    # dequantize_4bit is wrong for a weight whose last dimension is not a multiple of the block size (688 is not:
    # down_proj's values come out wrong), so qlora-mistral-small trains this base
    "mistral-small-704": ("MistralConfig", {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 704,
                                            "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
                                            "max_position_embeddings": 1024, "sliding_window": None,
                                            "tie_word_embeddings": False},
                          4, 256, "cpu"),
    "mistral-1b": ("MistralConfig", {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
                                     "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                                     "max_position_embeddings": 4096, "sliding_window": None, "rms_norm_eps": 1e-5,
                                     "tie_word_embeddings": False},
                   8, 1024, "cuda"),
    # Mistral-7B(-v0.1)'s shape; sliding_window None: see the docstring (at 2048 tokens a 4096 window never bites)
    "mistral-7b": ("MistralConfig", {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                     "max_position_embeddings": 32768, "rope_theta": 10000.0, "sliding_window": None,
                                     "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
                   2, 2048, "cuda"),
}
# Bases too big to run alone (full fine-tuning of 7B with AdamW, two models in one process) or to write on the CPU:
# only LoRA/QLoRA configs train them; their random checkpoint is built on the device; only transformers and
# minitune are timed (no minitune-torch), so that a config fits one GPU run.
BIG_BASES = {"mistral-7b"}
BASES_ONLY = BIG_BASES | {"mistral-small-704"}  # not in the default runs: bases of LoRA configs
# SFT configs, name: (weights: None for the bundled tiny-mistral folder, else the CONFIGS entry whose random
# checkpoint is written in float32; examples per micro-batch, micro-batches per optimizer step, device type).
# Two micro-batches (the example's default is one) so that the step exercises gradient accumulation and its
# normalisation by the targets of the whole accumulated batch, where the two libraries could differ.
SFT_CONFIGS = {
    "sft-tiny-mistral": (None, 16, 2, "cpu"),
    "sft-mistral-1b": ("mistral-1b", 16, 2, "cuda"),
}
SFT_STEPS = 4  # distinct optimizer steps of the example's data, trained on in turn
EXAMPLE = ROOT / "examples" / "finetune_mistral.py"
TINY_MISTRAL = ROOT / "examples" / "assets" / "tiny-mistral"  # the example's default --model and tokenizer
# LoRA configs, name: (the CONFIGS entry whose random checkpoint and token batch it trains, rank, quantize (None or
# "nf4": QLoRA), activation checkpointing, device type). Adapters on every linear layer but the head, alpha = 2r:
# minitune's apply_lora against peft's get_peft_model on transformers' model; B starts at zero in both, so the
# first-step losses are the base model's (for QLoRA, the quantized base's).
LORA_CONFIGS = {
    "lora-mistral-small": ("mistral-small", 16, None, False, "cpu"),
    "qlora-mistral-small": ("mistral-small-704", 16, "nf4", True, "cpu"),
    "lora-mistral-1b": ("mistral-1b", 16, None, False, "cuda"),
    "lora-mistral-7b": ("mistral-7b", 16, None, True, "cuda"),
    "qlora-mistral-7b": ("mistral-7b", 16, "nf4", True, "cuda"),
    # packed (PACKED below): realistic-length examples laid end to end; r = 0: full fine-tuning
    "packed-mistral-small": ("mistral-small", 0, None, False, "cpu"),
    "packed-mistral-1b": ("mistral-1b", 0, None, False, "cuda"),
    "packed-lora-mistral-7b": ("mistral-7b", 16, None, True, "cuda"),
    "packed-qlora-mistral-7b": ("mistral-7b", 16, "nf4", True, "cuda"),
}
# Packed configs, name: (rows, tokens per row). One step's examples have lengths drawn from a log-normal
# distribution (median PACKED_MEDIAN tokens, sigma PACKED_SIGMA; 16 to a row's length), random ids, the first
# third of each without loss (a prompt), kept while best-fit decreasing fits them all in the rows (one that
# would not is set aside; PACKED_MISSES of those in a row end the drawing). minitune trains the rows (collate:
# segment ids, positions from 0 per example, cu_seqlens: variable-length attention on a GPU); transformers the
# same rows with a (rows, 1, T, T) block-causal mask and the same positions (sdpa takes a 4-D mask as it is).
# Its padding-free layout (DataCollatorWithFlattening: one (1, N) row, positions restarting, no mask) is not
# used: with sdpa, transformers 5.25 lets each example attend to the ones before it (measured: 0.28 in the
# logits of a second example of a tiny Mistral); it keeps them apart only under flash-attn, not installed here.
# The same tokens and targets: the first-step losses agree.
PACKED = {"packed-mistral-small": (2, 1024), "packed-mistral-1b": (8, 2048), "packed-lora-mistral-7b": (2, 4096),
          "packed-qlora-mistral-7b": (2, 4096)}
PACKED_MEDIAN, PACKED_SIGMA = 600, 0.9
PACKED_MISSES = 50  # draws in a row that fit nowhere: the rows are full
PEAK_TFLOPS = 989.0  # bf16 dense peak of an H100 or H200 (SXM), for MFU
# issue 20's GPU goals per packed config: minitune's tokens/s at least `vs_transformers` x transformers' (+ PEFT,
# + bitsandbytes) and `vs_liger` x transformers + Liger's, its peak at most `peak_ratio` x transformers', its MFU
# at least `mfu`
PACKED_GOALS = {"packed-mistral-1b": {"vs_transformers": 1.5, "mfu": 0.45},
                "packed-lora-mistral-7b": {"vs_transformers": 1.5, "vs_liger": 1.2, "peak_ratio": 0.8},
                "packed-qlora-mistral-7b": {"vs_transformers": 1.8}}
NF4_BLOCKSIZE = 64  # QLoRA's: bitsandbytes' default, and minitune's
QLORA_PEAK_RATIO, QLORA_PEAK_BYTES = 0.65, 10e9  # GPU goals of a QLoRA step: peak vs transformers + PEFT + bnb, and alone
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# DPO configs, name: (the CONFIGS entry whose random checkpoint, written in float32, is the SFT model; LoRA rank
# (alpha 2r, every linear layer but the head); pairs per micro-batch, micro-batches per optimizer step, device).
DPO_CONFIGS = {
    "dpo-lora-mistral-small": ("mistral-small", 16, 4, 1, "cpu"),
    "dpo-lora-mistral-1b": ("mistral-1b", 16, 32, 2, "cuda"),
}
DPO_STEPS = 4  # distinct optimizer steps of the DPO example's data, trained on in turn
DPO_EXAMPLE = ROOT / "examples" / "dpo.py"
# The DPO configs' "libraries": the example's --reference modes; the first is what the others' times are divided by.
DPO_REFERENCES = ("copy", "lora-disabled", "precomputed")
ALL_CONFIGS = {**CONFIGS, **SFT_CONFIGS, **LORA_CONFIGS, **DPO_CONFIGS}  # each entry's last field is its device type
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}  # first-step losses "agree" within this
LIBRARIES = ("transformers", "minitune", "minitune-torch")  # minitune-torch: minitune with MINITUNE_KERNELS=torch


# ---------------------------------------------------------------- one library's model and step (child processes)

@contextmanager
def kernels_env(library: str):
    """MINITUNE_KERNELS=torch while minitune-torch runs (minitune reads it at each kernel call); Liger's RoPE in
    transformers' Mistral while transformers-liger runs; else nothing."""
    if library == "transformers-liger":
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        from transformers.models.mistral import modeling_mistral
        plain, modeling_mistral.apply_rotary_pos_emb = modeling_mistral.apply_rotary_pos_emb, liger_rotary_pos_emb
        try:
            yield
        finally:
            modeling_mistral.apply_rotary_pos_emb = plain
        return
    if library != "minitune-torch":
        yield
        return
    old = os.environ.get("MINITUNE_KERNELS")
    os.environ["MINITUNE_KERNELS"] = "torch"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINITUNE_KERNELS", None)
        else:
            os.environ["MINITUNE_KERNELS"] = old


def load_example(path: Path = EXAMPLE):
    """examples/finetune_mistral.py (or another example) as a module (examples/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Data:
    """What every library of a child process trains on: `steps[i]` is step i's batch, `tokens[i]` its tokens.

    Random configs: one batch of random ids, every step, in --dtype. SFT configs: the example's first
    SFT_STEPS optimizer steps (lists of collated micro-batches), float32 weights, its autocast and args.
    DPO configs: the same for the DPO example's preference pairs (DPO_STEPS steps)."""

    def __init__(self, name: str, dtype_name: str, device, folder: str | None = None, grad_ckpt: str = "config"):
        import torch
        self.sft, self.dpo = name in SFT_CONFIGS, name in DPO_CONFIGS
        if self.dpo:
            self.init_dpo(name, dtype_name, device, folder)
            return
        self.lora_r, self.quantize, self.grad_ckpt = (LORA_CONFIGS[name][1:4] if name in LORA_CONFIGS else
                                                      (0, None, False))
        self.grad_ckpt = {"config": self.grad_ckpt, "on": True, "off": False, "offload": "offload"}[grad_ckpt]
        self.big = name in LORA_CONFIGS and LORA_CONFIGS[name][0] in BIG_BASES  # loaded straight onto the device
        if name in PACKED:
            self.init_packed(name, CONFIGS[LORA_CONFIGS[name][0]][1]["vocab_size"], device)
            self.weights_dtype = getattr(torch, dtype_name)
            return
        if not self.sft:
            _, config_args, batch, seq, _ = CONFIGS[LORA_CONFIGS[name][0] if self.lora_r else name]
            gen = torch.Generator().manual_seed(SEED)
            self.steps = [torch.randint(0, config_args["vocab_size"], (batch, seq), generator=gen).to(device)]
            self.tokens, self.weights_dtype, self.describe = [batch * seq], getattr(torch, dtype_name), {}
            return
        import minitune
        from minitune.data import collate, pad_id
        from minitune.train import autocast
        _, batch, accum, _ = SFT_CONFIGS[name]
        self.example = ex = load_example()
        self.args = args = ex.parse_args(["--batch-size", str(batch), "--grad-accum", str(accum),
                                          "--device", device.type, "--dtype", dtype_name])
        tok = minitune.load_tokenizer(args.model)
        train, _, _ = ex.load_examples(args, tok)
        self.total_steps = ex.total_steps(args, len(train), world=1)
        self.steps = [[ex.to_device(collate(b, pad_id(tok)), device)
                       for b in ex.micro_batches(train, step, batch, accum, args.seed, 0, 1)]
                      for step in range(SFT_STEPS)]
        self.tokens = [sum(int(b["attention_mask"].ne(0).sum()) for b in step) for step in self.steps]
        self.autocast = lambda: autocast(device, args.dtype)
        self.weights_dtype = torch.float32  # the example's float32 master weights
        self.describe = {"micro_batches": [[list(b["input_ids"].shape) for b in step] for step in self.steps],
                         "tokens": self.tokens, "targets": [sum(int((b["labels"][:, 1:] != -100).sum())
                                                                for b in step) for step in self.steps],
                         "example_args": {k: getattr(args, k) for k in ("lr", "weight_decay", "schedule", "warmup",
                                                                        "max_grad_norm", "max_length", "seed")},
                         "total_steps": self.total_steps}

    def init_packed(self, name: str, vocab: int, device) -> None:
        """One step of a packed config (see PACKED): `steps` minitune's rows, `hf_steps` transformers' flat row."""
        import torch

        from minitune.data import collate, pack, packing_efficiency
        from minitune.models.common import attention_bias
        rows, row_len = PACKED[name]
        gen = torch.Generator().manual_seed(SEED)
        examples, packed, misses = [], [], 0
        while misses < PACKED_MISSES:  # each drawn example kept if best-fit decreasing still fits all in the rows
            n = int(torch.empty(1).log_normal_(math.log(PACKED_MEDIAN), PACKED_SIGMA, generator=gen).clamp(16, row_len))
            ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
            candidate = examples + [{"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]}]
            if len(rows_of := pack(candidate, row_len)) <= rows:
                examples, packed, misses = candidate, rows_of, 0
            else:
                misses += 1
        batch = collate(packed, pad_id=0)
        self.steps = [{k: v.to(device) for k, v in batch.items()}]
        real = batch["attention_mask"] != 0  # (rows, T)
        T = batch["input_ids"].size(1)
        hf = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "labels": batch["labels"],
              "attention_mask": attention_bias(batch["attention_mask"], T, 0, None, "cpu")}  # (rows, 1, T, T)
        self.hf_steps = [{k: v.to(device) for k, v in hf.items()}]
        lengths = [row["attention_mask"].count(s) for row in packed for s in range(1, row["attention_mask"][-1] + 1)]
        self.tokens = [int(real.sum())]
        self.describe = {"rows": rows, "row_len": row_len, "examples": len(lengths), "tokens": self.tokens[0],
                         "slots_filled": packing_efficiency(packed, row_len), "example_lengths": lengths,
                         "targets": int((batch["labels"][:, 1:] != -100).sum())}

    def init_dpo(self, name: str, dtype_name: str, device, folder: str) -> None:
        """The DPO example's args (its defaults, LoRA on), pairs and first DPO_STEPS steps; the pairs of each
        micro-batch are kept (`step_pairs`) for the precomputed reference."""
        import torch

        import minitune
        from minitune.data import collate_preferences, pad_id
        from minitune.train import autocast
        _, r, batch, accum, _ = DPO_CONFIGS[name]
        self.example = ex = load_example(DPO_EXAMPLE)
        # --model named (the trainers load it): the example refuses its default, runs/sft/final, where it is absent
        self.args = args = ex.parse_args([
            "--model", folder, "--batch-size", str(batch), "--grad-accum", str(accum), "--device", device.type,
            "--dtype", dtype_name, "--lora-r", str(r), "--lora-alpha", str(2 * r), "--lora-targets", "all-linear"])
        tok = minitune.load_tokenizer(str(TINY_MISTRAL))  # its ids are valid in the 32000 vocab too
        self.pad_id = pad_id(tok)
        train, _, _ = ex.load_pairs(args, tok)
        self.total_steps = ex.total_steps(args, len(train), world=1)
        self.step_pairs = [ex.micro_batches(train, step, batch, accum, args.seed, 0, 1) for step in range(DPO_STEPS)]
        self.steps = [[ex.to_device(collate_preferences(b, self.pad_id), device) for b in step]
                      for step in self.step_pairs]
        self.tokens = [sum(int(b["attention_mask"].ne(0).sum()) for b in step) for step in self.steps]
        self.autocast = lambda: autocast(device, args.dtype)
        self.weights_dtype = torch.float32  # the example's float32 master weights
        self.describe = {"micro_batches": [[list(b["input_ids"].shape) for b in step] for step in self.steps],
                         "tokens": self.tokens, "pairs": len(train),
                         "example_args": {k: getattr(args, k) for k in (
                             "lr", "weight_decay", "schedule", "warmup", "max_grad_norm", "max_length", "seed", "beta",
                             "loss_type", "label_smoothing", "average_logps", "rpo_alpha", "lora_r", "lora_alpha",
                             "lora_dropout", "lora_targets", "dtype", "grad_checkpointing")},
                         "total_steps": self.total_steps}


def transformers_sft_step(model, batches: list[dict], optimizer, scheduler, autocast, max_grad_norm: float) -> dict:
    """The example's train_step done the transformers way; {"loss": the mean over the step's targets}.

    num_items_in_batch=n makes transformers' causal-LM loss sum over the micro-batch's targets and divide
    by n (transformers/loss/loss_utils.py, fixed_cross_entropy); n counts the targets as the example does."""
    import torch
    n_targets = max(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches), 1)
    loss_sum = 0.0
    for b in batches:
        with autocast():  # the forward only, as the example
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                         num_items_in_batch=n_targets).loss
        loss.backward()
        loss_sum += loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm).item()  # .item(): the example's sync
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum.item()}


def transformers_4bit(folder: str, dtype, device):
    """transformers' model with bitsandbytes' NF4 (double quantization, compute in `dtype`), quantized on `device` as
    it loads; the embeddings, norms and head stay in `dtype` (bitsandbytes skips the head)."""
    import transformers
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=config,
                                                             device_map={"": device_index(device)})


def device_index(device):
    """A device_map entry for transformers: "cpu", or the CUDA device's index."""
    import torch
    if device.type == "cpu":
        return "cpu"
    return device.index if device.index is not None else torch.cuda.current_device()


def have_liger() -> bool:
    import importlib.util
    return importlib.util.find_spec("liger_kernel") is not None


def checkpoint_layers(library: str, model, offload: bool = False) -> None:
    """Activation checkpointing, one decoder layer per checkpoint, non-reentrant, in either library; offload:
    minitune keeps the checkpoints in CPU memory (transformers cannot, and checkpoints as it otherwise would)."""
    if not library.startswith("transformers"):
        model.gradient_checkpointing, model.offload_checkpoints = True, offload
        return
    model.config.use_cache = False  # as transformers would under checkpointing (with a warning)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def with_liger(model) -> None:
    """Liger Kernel on transformers' Mistral, its defaults (RMSNorm, SwiGLU, the fused linear cross-entropy, RoPE): on
    this instance, before LoRA. Its RoPE replaces a module-level function, so it is swapped in only around this
    library's steps (kernels_env); its RMSNorm and SwiGLU classes replace transformers' for models made after this
    one, so the plain transformers model is made first (LIBRARIES order)."""
    from liger_kernel.transformers import apply_liger_kernel_to_mistral
    apply_liger_kernel_to_mistral(rope=False, model=model)


def with_lora(library: str, model, r: int):
    """LoRA r (alpha 2r) on LORA_TARGETS, the rest frozen: peft on transformers' model, mt.lora on ours."""
    if library.startswith("transformers"):
        import peft
        config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        return peft.get_peft_model(model, config)
    import minitune
    return minitune.lora.apply_lora(model, r=r, alpha=2 * r, target_modules=LORA_TARGETS, verbose=False)


class Trainer:
    """One library's model (loaded from the checkpoint), its optimizer and its step: step() is one timed step."""

    def __init__(self, library: str, folder: str, data: Data, device):
        import torch
        self.library, self.data, self.on_gpu, self.done = library, data, device.type == "cuda", 0
        self.steps = data.steps
        quantize = getattr(data, "quantize", None)
        if library.startswith("transformers"):
            import transformers
            transformers.logging.set_verbosity_error()
            if quantize:
                self.model = transformers_4bit(folder, data.weights_dtype, device)
            elif getattr(data, "big", False) and device.type == "cuda":  # not through 14.5 GB of host memory
                self.model = transformers.AutoModelForCausalLM.from_pretrained(
                    folder, dtype=data.weights_dtype, device_map={"": device_index(device)})
            else:
                self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=data.weights_dtype).to(device)
            self.compute_loss = lambda model, ids: model(input_ids=ids, labels=ids).loss
            if library == "transformers-liger":
                with_liger(self.model)
            if hasattr(data, "hf_steps"):  # packed: the same rows, a block-causal 4-D mask
                self.steps = data.hf_steps
                self.compute_loss = lambda model, b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                                           position_ids=b["position_ids"], labels=b["labels"]).loss
        else:
            import minitune
            from minitune.losses import causal_lm_loss
            self.model = minitune.load_model(folder, dtype=data.weights_dtype, device=device, quantize=quantize)
            self.compute_loss = lambda model, ids: causal_lm_loss(model, ids, labels=ids)
            if hasattr(data, "hf_steps"):  # packed rows: segments, positions, and on a GPU their bounds
                self.compute_loss = lambda model, b: causal_lm_loss(model, b["input_ids"], b["labels"],
                                                                    b["attention_mask"], b["position_ids"],
                                                                    cu_seqlens=b["cu_seqlens"])
        self.model.train()
        if getattr(data, "grad_ckpt", False):
            checkpoint_layers(library, self.model, offload=data.grad_ckpt == "offload")
        if data.sft:
            from minitune.optim import make_optimizer, make_scheduler
            a = data.args
            self.optimizer = make_optimizer(self.model, lr=a.lr, weight_decay=a.weight_decay)
            self.scheduler = make_scheduler(self.optimizer, a.schedule, min(a.warmup, data.total_steps),
                                            data.total_steps)
        else:
            if data.lora_r:
                self.model = with_lora(library, self.model, data.lora_r)
            self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=LR)

    def prepare(self) -> None:
        """What follows the load before training (DPOTrainer's reference, LoRA and optimizer); here, nothing."""

    def run_step(self, batch) -> float:
        """One optimizer step on this batch (random ids, or an SFT step's micro-batches); its loss."""
        if self.data.sft:
            step = transformers_sft_step if self.library == "transformers" else self.data.example.train_step
            return step(self.model, batch, self.optimizer, self.scheduler, self.data.autocast,
                        self.data.args.max_grad_norm)["loss"]
        loss = self.compute_loss(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def step(self) -> tuple[float, float, int]:
        """(seconds, loss, non-padding tokens) of the next step: forward, backward, optimizer step, zero_grad."""
        import torch
        i = self.done % len(self.data.steps)
        self.done += 1
        with kernels_env(self.library):
            if self.on_gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            value = self.run_step(self.steps[i])
            if self.on_gpu:
                torch.cuda.synchronize()
            return time.perf_counter() - t0, value, self.data.tokens[i]

    def info(self) -> dict:
        params = {id(p): p for p in self.model.parameters()}.values()
        out = {"params": count_values(self.model), "trainable_params": sum(p.numel() for p in params if p.requires_grad),
               "dtypes": tensor_dtypes(self.model)}
        with kernels_env(self.library):
            out["MINITUNE_KERNELS"] = os.environ.get("MINITUNE_KERNELS", "auto")
            if self.library.startswith("transformers"):
                out["attn_implementation"] = self.model.config._attn_implementation
            else:
                from minitune import kernels
                out["backend"] = kernels.backend(next(self.model.parameters()))  # triton or torch
        return out


def tensor_dtypes(model) -> dict:
    """The dtypes of the model's tensors by role, to show that both libraries hold the same things in the same
    dtypes: the decoder-block linear weights (uint8: packed 4-bit), LoRA's adapters, norms, embeddings, head."""
    def role(name: str) -> str:
        if "lora_" in name:
            return "lora"
        if "norm" in name:
            return "norm"
        if "embed_tokens" in name or ".wte." in name or ".wpe." in name:
            return "embedding"
        if "lm_head" in name:
            return "head"
        return "linear" if ".layers." in name or ".h." in name else "other"
    out: dict[str, set] = {}
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if name.endswith(("weight", "codes")) and not name.endswith(("quant_map", "absmax")):
            out.setdefault(role(name), set()).add(str(t.dtype).removeprefix("torch."))
    return {k: sorted(v) for k, v in sorted(out.items())}


def tensor_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (a shared tensor counted once)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


class DPOTrainer(Trainer):
    """One reference mode (the "library") of the DPO example's LoRA step. __init__ loads the policy as the
    example does (float32, train mode, dropout off); prepare() does the rest of the example's set-up in its
    order: the precomputed log-probabilities, the Reference (the copy before LoRA), LoRA, the optimizer and
    schedule."""

    def __init__(self, library: str, folder: str, data: Data, device):
        import minitune
        self.library, self.data, self.device, self.on_gpu, self.done = library, data, device, device.type == "cuda", 0
        self.steps, self.extra, self.total_losses = data.steps, {}, []
        self.model = minitune.load_model(folder, dtype=data.weights_dtype, device=device).train()
        self.model.gradient_checkpointing = data.args.grad_checkpointing
        if hasattr(data.example, "disable_dropout"):  # the example's next line, where it has it (p = 0: no memory)
            data.example.disable_dropout(self.model)
        self.extra["base_weights_bytes"] = tensor_bytes(self.model)

    def prepare(self) -> None:
        import torch

        from minitune.data import collate_preferences
        from minitune.optim import make_optimizer, make_scheduler
        ex, args, data = self.data.example, self.data.args, self.data
        if self.library == "precomputed":  # the step's pairs in micro-batch order: the same batches, the same padding
            if self.on_gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            pairs = [pair for step in data.step_pairs for b in step for pair in b]
            logps = ex.precompute_logps(self.model, pairs, data.pad_id, args.batch_size, args.average_logps,
                                        data.autocast)
            attached = iter(ex.attach_logps(pairs, logps))
            self.steps = [[ex.to_device(collate_preferences([next(attached) for _ in b], data.pad_id), self.device)
                           for b in step] for step in data.step_pairs]
            if self.on_gpu:
                torch.cuda.synchronize()
            self.extra.update(precompute_seconds=time.perf_counter() - t0, precompute_pairs=len(pairs))
        self.reference = ex.Reference(self.library, self.model)  # "copy": the deep copy, before LoRA
        if self.reference.mode == "copy":
            self.extra["reference_bytes"] = tensor_bytes(self.reference.model)
        torch.manual_seed(args.seed)  # the same LoRA A in every mode (B is zero)
        ex.apply_lora_args(self.model, args)
        self.optimizer = make_optimizer(self.model, lr=args.lr, weight_decay=args.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, args.schedule, min(args.warmup, data.total_steps),
                                        data.total_steps)

    def run_step(self, batches) -> float:
        """The example's dpo_step; its DPO loss: the returned loss less the RPO term (rpo_alpha x nll_loss)."""
        args = self.data.args
        metrics = self.data.example.dpo_step(self.model, self.reference, batches, self.optimizer, self.scheduler,
                                             self.data.autocast, args)
        self.total_losses.append(metrics["loss"])
        if args.rpo_alpha and "nll_loss" not in metrics:
            raise RuntimeError("dpo_step returned no nll_loss with --rpo-alpha set: its DPO term cannot be told apart")
        return metrics["loss"] - args.rpo_alpha * metrics.get("nll_loss", 0.0)

    def info(self) -> dict:
        from minitune.lora import parameter_counts
        trainable, _ = parameter_counts(self.model)
        return {**super().info(), "trainable_params": trainable, **self.extra, "rpo_alpha": self.data.args.rpo_alpha,
                "total_losses": self.total_losses}


def make_trainer(library: str, folder: str, data: Data, device) -> Trainer:
    return (DPOTrainer if data.dpo else Trainer)(library, folder, data, device)


def child_paired(libraries: list[str], folder: str, name: str, steps: int, warmup: int, dtype_name: str,
                 device_name: str, grad_ckpt: str = "config") -> dict:
    """Speed: every library in this one process, one step of each per round, the order rotated each round."""
    import torch
    device = torch.device(device_name)
    data = Data(name, dtype_name, device, folder, grad_ckpt)
    trainers = [make_trainer(library, folder, data, device) for library in libraries]
    for t in trainers:
        t.prepare()
    losses = {t.library: [] for t in trainers}
    rounds = []
    for r in range(warmup + steps):
        shift = (r - warmup) % len(trainers)  # timed round 0 starts with the first library
        order = trainers[shift:] + trainers[:shift]
        seconds = {}
        for t in order:
            seconds[t.library], loss, tokens = t.step()
            losses[t.library].append(loss)
        if r >= warmup:  # every library trained on the same batch this round: one token count
            rounds.append({"order": [t.library for t in order], "seconds": seconds, "tokens": tokens})
    per_library = {}
    for t in trainers:
        timed = [rd["seconds"][t.library] for rd in rounds]
        per_library[t.library] = {**t.info(), "losses": losses[t.library], "step_seconds": timed,
                                  "median_step_s": statistics.median(timed),
                                  "tokens_per_s": statistics.median(rd["tokens"] / s for rd, s in
                                                                    zip(rounds, timed, strict=True))}
    return {"libraries": per_library, "rounds": rounds, "data": data.describe}


def child_memory(library: str, folder: str, name: str, steps: int, warmup: int, dtype_name: str,
                 device_name: str, grad_ckpt: str = "config") -> dict:
    """Memory: this library alone in a fresh process; the peak over its steps."""
    import torch
    device = torch.device(device_name)
    on_gpu = device.type == "cuda"
    trainer = make_trainer(library, folder, Data(name, dtype_name, device, folder, grad_ckpt), device)
    if on_gpu:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = proc_status()["VmRSS"]
        peak_reset = reset_peak()
    trainer.prepare()  # inside the measurement: a DPO reference's own cost (the copy's weights) is in it
    if isinstance(trainer, DPOTrainer):  # what the set-up holds before the first step (low noise, unlike a peak)
        if on_gpu:
            torch.cuda.synchronize()
        setup = (torch.cuda.memory_allocated() if on_gpu else proc_status()["VmRSS"]) - base
    seconds, losses, _ = zip(*(trainer.step() for _ in range(warmup + steps)), strict=True)
    result = {"library": library, **trainer.info(), "losses": list(losses), "step_seconds": list(seconds)}
    if isinstance(trainer, DPOTrainer):
        result["setup_increase_bytes"] = setup
    if on_gpu:
        result.update(peak_bytes=torch.cuda.max_memory_allocated(), peak_increase_bytes=
                      torch.cuda.max_memory_allocated() - base, weights_bytes=base, peak_source="max_memory_allocated")
    else:
        import resource
        peak = proc_status()["VmHWM"] if peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result.update(peak_increase_bytes=peak - base, baseline_rss_bytes=base, peak_rss_bytes=peak,
                      peak_source="VmHWM after clear_refs" if peak_reset else "ru_maxrss")
    return result


# ---------------------------------------------------------------- the parent: checkpoints, children, report

def write_checkpoint(config_class: str, config_args: dict, folder: str, dtype_name: str, device_name: str = "cpu") -> None:
    """A random transformers model of this config (seeded), built on `device_name` (a 7B model's random init takes
    seconds on a GPU, minutes on the CPU), saved in the Hugging Face layout."""
    import torch
    import transformers
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(SEED)
    config = getattr(transformers, config_class)(**config_args)
    with torch.device(device_name):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype_name))
    model.to("cpu").save_pretrained(folder)  # from host memory: what safetensors writes best


def config_entry(name: str) -> dict:
    """What a config trains, for the JSON and the table."""
    if name in SFT_CONFIGS:
        weights, batch, accum, _ = SFT_CONFIGS[name]
        return {"kind": "sft", "weights": weights or str(TINY_MISTRAL.relative_to(ROOT)), "batch": batch,
                "grad_accum": accum, "sft_steps": SFT_STEPS, "example": str(EXAMPLE.relative_to(ROOT))}
    if name in LORA_CONFIGS:
        base, r, quantize, grad_ckpt, _ = LORA_CONFIGS[name]
        entry = {**config_entry(base), "kind": "lora", "base": base, "lora_r": r, "lora_alpha": 2 * r,
                 "lora_targets": LORA_TARGETS, "quantize": quantize, "gradient_checkpointing": grad_ckpt}
        if quantize:
            entry["quantization"] = {"quant_type": "nf4", "blocksize": NF4_BLOCKSIZE, "double_quant": True,
                                     "compute_dtype": "--dtype", "prepare_model_for_kbit_training": False}
        if name in PACKED:
            entry.update(kind="packed", rows=PACKED[name][0], row_len=PACKED[name][1],
                         lengths={"distribution": "log-normal", "median": PACKED_MEDIAN, "sigma": PACKED_SIGMA})
        return entry
    if name in DPO_CONFIGS:
        base, r, batch, accum, _ = DPO_CONFIGS[name]
        return {"kind": "dpo", "weights": f"{base} (random, float32)", "base": base,
                "config_args": CONFIGS[base][1], "lora_r": r, "lora_alpha": 2 * r, "lora_targets": "all-linear",
                "batch": batch, "grad_accum": accum, "dpo_steps": DPO_STEPS,
                "example": str(DPO_EXAMPLE.relative_to(ROOT)), "tokenizer": str(TINY_MISTRAL.relative_to(ROOT))}
    config_class, config_args, batch, seq, _ = CONFIGS[name]
    return {"kind": "random", "config_class": config_class, "config_args": config_args, "batch": batch, "seq": seq}


def prepare_weights(name: str, tmp: str, args) -> str:
    """The checkpoint folder a config trains: the bundled tiny-mistral, or a random one written to tmp
    (in --dtype; in float32 for an SFT or DPO config: the examples' master weights). With --work, the random
    checkpoint is kept in <work>/<base>-<dtype> and reused by later configs and runs while its spec is the same.
    It is written by a child process, so that this one never holds the model (nor, on a GPU, a CUDA context)."""
    base, dtype = ((SFT_CONFIGS[name][0], "float32") if name in SFT_CONFIGS else
                   (DPO_CONFIGS[name][0], "float32") if name in DPO_CONFIGS else
                   (LORA_CONFIGS[name][0] if name in LORA_CONFIGS else name, args.dtype))
    if base is None:
        print(f"{name}: the bundled {TINY_MISTRAL.relative_to(ROOT)}", flush=True)
        return str(TINY_MISTRAL)
    config_class, config_args = CONFIGS[base][:2]
    build_on = args.device if base in BIG_BASES else "cpu"  # the small ones as before: the same weights
    spec = {"config_class": config_class, "config_args": config_args, "dtype": dtype, "seed": SEED,
            "built_on": torch_device_type(build_on)}
    folder = Path(args.work) / f"{base}-{dtype}" if args.work else Path(tmp)
    marker = folder / "bench_complete.json"
    if args.work and marker.exists() and json.loads(marker.read_text()).get("spec") == spec:
        print(f"{name}: reusing the random {config_class} checkpoint in {folder}", flush=True)
        return str(folder)
    marker.unlink(missing_ok=True)
    for stale in (*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")):
        stale.unlink()  # another spec's shards: none may survive the new write
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "write", "--dir", str(folder), "--name", base,
           "--dtype", dtype, "--device", build_on]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=child_env(), timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"writing the {base} checkpoint failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}")
    if args.work:
        marker.write_text(json.dumps({"spec": spec}, indent=2) + "\n")
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"{name}: wrote a random {config_class} checkpoint ({dtype}, {size / 1e9:.2f} GB, built on {build_on}) "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    return str(folder)


def torch_device_type(name: str) -> str:
    return name.split(":")[0]


def run_child(mode: str, libraries: list[str], folder: str, name: str, steps: int, warmup: int, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--libraries", ",".join(libraries),
           "--dir", folder, "--name", name, "--steps", str(steps), "--warmup", str(warmup), "--dtype", args.dtype,
           "--device", args.device, "--grad-checkpointing", args.grad_checkpointing]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=child_env(), timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def spread(values: list[float]) -> dict:
    """Median, quartiles (inclusive method) and range of per-round ratios."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": min(values), "max": max(values),
            "n": len(values)}


def dpo_losses(entry: dict, rows: dict, tolerance: float, echo: bool = True) -> None:
    """A DPO config's first-step DPO losses, from the timing process and from each memory process: every one
    should be ln 2 (LoRA's B is zero, so the policy is the reference), and so they agree with each other;
    the whole first-step losses (with RPO's term) too; and the largest spread between the modes at any later
    step of the timing process (they train the same model on the same batches)."""
    import math

    def firsts(key: str) -> dict:
        return {f"{library} ({source})": losses[0] for library, r in rows.items()
                for source, losses in (("timing", r.get(key)), ("memory", r.get("memory", {}).get(key))) if losses}

    def spread_all_steps(key: str) -> float | None:
        timed = [r[key] for r in rows.values() if r.get(key)]
        return max(max(step) - min(step) for step in zip(*timed, strict=True)) if len(timed) == len(rows) else None

    first, totals = firsts("losses"), firsts("total_losses")
    if not first:
        return
    entry["first_losses"] = first
    entry["first_loss_max_dev_ln2"] = dev = max(abs(v - math.log(2)) for v in first.values())
    entry["first_loss_spread"] = max(first.values()) - min(first.values())
    entry["losses_agree"] = dev <= tolerance * math.log(2)
    entry["rpo_alpha"] = next((r["rpo_alpha"] for r in rows.values() if "rpo_alpha" in r), None)
    if totals:
        entry["first_total_losses"] = totals
        entry["first_total_loss_spread"] = max(totals.values()) - min(totals.values())
    for key, out in (("losses", "loss_spread_all_steps"), ("total_losses", "total_loss_spread_all_steps")):
        if (value := spread_all_steps(key)) is not None:
            entry[out] = value
    if not echo:
        return
    print(f"  first-step DPO losses (ln 2 = {math.log(2):.6f}): "
          + ", ".join(f"{k} {v:.6f}" for k, v in first.items())
          + f"; max |loss - ln 2| {dev:.2e}: {'agree' if entry['losses_agree'] else 'DIFFER'}", flush=True)


def bench_config(name: str, args, save) -> dict:
    """Timing in one process (all libraries interleaved), then memory in one fresh process per library."""
    libraries = list(LIBRARIES if args.device.startswith("cuda") else LIBRARIES[:2])
    if name in LORA_CONFIGS and LORA_CONFIGS[name][0] in BIG_BASES:
        libraries = list(LIBRARIES[:2])  # one GPU run's time: no minitune-torch model
    if name in PACKED and args.device.startswith("cuda") and have_liger():  # issue 20: Liger at its best too
        libraries = ["transformers", "transformers-liger", "minitune"]
    if name in DPO_CONFIGS:
        libraries = list(DPO_REFERENCES)
    entry = {"config": name, **config_entry(name), "runs": [{"library": library} for library in libraries]}
    if name in LORA_CONFIGS and args.grad_checkpointing != "config":
        entry["gradient_checkpointing"] = {"on": True, "off": False, "offload": "offload"}[args.grad_checkpointing]
    save(entry)
    rows = {r["library"]: r for r in entry["runs"]}
    with tempfile.TemporaryDirectory(prefix="minitune-bench-train-") as tmp:
        folder = prepare_weights(name, tmp, args)

        # an SFT or DPO config's warm-up sees each of its batches (their shapes) once, so no timed step is a first
        distinct = {"sft": SFT_STEPS, "dpo": DPO_STEPS}.get(entry["kind"])
        warmup = entry["warmup"] = max(args.warmup, distinct) if distinct else args.warmup
        t0 = time.perf_counter()
        try:
            paired = run_child("paired", libraries, folder, name, args.steps, warmup, args)
            entry["rounds"] = paired["rounds"]
            if paired["data"]:
                entry["data"] = paired["data"]
            for library, r in paired["libraries"].items():
                rows[library].update(r)
            print(f"  timing, {len(libraries)} libraries interleaved in one process, {warmup} + {args.steps} "
                  f"rounds: {time.perf_counter() - t0:.1f} s", flush=True)
            for library in libraries:
                r = rows[library]
                print(f"  {library:15s} {r['median_step_s'] * 1e3:8.1f} ms/step {r['tokens_per_s']:9.0f} tokens/s  "
                      f"first loss {r['losses'][0]:.6f}", flush=True)
        except Exception as e:  # noqa: BLE001  the memory runs still give their numbers
            entry["timing_error"] = f"{type(e).__name__}: {e}"
            print(f"  timing: {entry['timing_error']}", flush=True)
        if "rounds" in entry:
            base = [rd["seconds"][libraries[0]] for rd in entry["rounds"]]  # transformers; for DPO, copy
            for library in libraries[1:]:
                ratios = [rd["seconds"][library] / b for rd, b in zip(entry["rounds"], base, strict=True)]
                rows[library].update(time_ratios=ratios, time_ratio=spread(ratios))
                rows[library]["speed_ratio"] = 1 / rows[library]["time_ratio"]["median"]
                s = rows[library]["time_ratio"]
                print(f"  {library} / {libraries[0]} step time, per round: median {s['median']:.3f} "
                      f"[IQR {s['q1']:.3f}-{s['q3']:.3f}, range {s['min']:.3f}-{s['max']:.3f}]", flush=True)
        if "rounds" in entry and entry["kind"] == "dpo":
            dpo_losses(entry, rows, LOSS_RTOL[args.dtype])
        elif "rounds" in entry:
            ours, theirs = rows["minitune"]["losses"][0], rows["transformers"]["losses"][0]
            entry["first_loss_diff"] = diff = abs(ours - theirs)
            entry["losses_agree"] = diff <= LOSS_RTOL[args.dtype] * abs(theirs)
            ratio = rows["minitune"]["time_ratio"]
            entry["time_ratio"] = ratio["median"]
            entry["speed_ratio"] = 1 / ratio["median"]
            entry["at_least_as_fast"] = ratio["median"] <= 1.0
            entry["iqr_straddles_1"] = ratio["q1"] <= 1.0 <= ratio["q3"]
            print(f"  first-step loss: transformers {theirs:.6f}, minitune {ours:.6f} "
                  f"(|diff| {diff:.2e}: {'agree' if entry['losses_agree'] else 'DIFFER'})", flush=True)
        save(entry)

        for library in libraries:
            try:
                r = run_child("memory", [library], folder, name, args.mem_steps, args.mem_warmup, args)
                rows[library]["memory"] = r
                for key in ("peak_bytes", "peak_increase_bytes", "weights_bytes", "baseline_rss_bytes", "peak_source",
                            "peak_rss_bytes", "setup_increase_bytes"):
                    if key in r:
                        rows[library][key] = r[key]
                for key in ("params", "backend", "attn_implementation", "MINITUNE_KERNELS", "dtypes", "trainable_params"):
                    rows[library].setdefault(key, r.get(key))
                for key in ("trainable_params", "base_weights_bytes", "reference_bytes", "precompute_pairs"):  # DPO
                    if key in r:
                        rows[library].setdefault(key, r[key])
                peak = r.get("peak_bytes", r.get("peak_rss_bytes"))
                print(f"  {library:15s} memory (fresh process, {args.mem_warmup} + {args.mem_steps} steps): "
                      f"peak +{r['peak_increase_bytes'] / 1e6:.0f} MB"
                      + (f" (peak {peak / 1e6:.0f} MB)" if peak else "") + f", first loss {r['losses'][0]:.6f}",
                      flush=True)
            except Exception as e:  # noqa: BLE001  keep the other libraries' numbers
                rows[library]["memory_error"] = f"{type(e).__name__}: {e}"
                print(f"  {library} memory: {rows[library]['memory_error']}", flush=True)
            if entry["kind"] == "dpo":
                dpo_losses(entry, rows, LOSS_RTOL[args.dtype], echo=library == libraries[-1])
            save(entry)
    if name in PACKED_GOALS and args.device.startswith("cuda"):
        entry["packed_goals"] = packed_goals(name, entry, rows)
        save(entry)
    if entry.get("quantize") and all("peak_bytes" in rows[lib] for lib in ("minitune", "transformers")):
        ours, theirs = rows["minitune"]["peak_bytes"], rows["transformers"]["peak_bytes"]  # GPU: weights included
        entry["peak_ratio"] = ours / theirs
        entry["qlora_memory_goal_met"] = ours <= QLORA_PEAK_RATIO * theirs and ours <= QLORA_PEAK_BYTES
        entry["qlora_peak_parts"] = {lib: peak_parts(rows[lib]) for lib in ("minitune", "transformers")}
        save(entry)
    return entry


def peak_parts(row: dict) -> dict:
    """A GPU peak in three parts: the weights as loaded (base, embeddings, head and adapters), what AdamW's
    adapters need beyond them (their float32 gradients and two moments), and the rest: activations and workspace."""
    adapter_state = 3 * 4 * row["trainable_params"]
    return {"weights": row["weights_bytes"], "adapter_state": adapter_state,
            "activations_and_workspace": row["peak_bytes"] - row["weights_bytes"] - adapter_state}


def packed_goals(name: str, entry: dict, rows: dict) -> list[dict]:
    """issue 20's goals for a packed config on a GPU, each {"goal", "met" (None: not measured), "detail"}."""
    want, ours, out = PACKED_GOALS[name], rows["minitune"], []
    if "vs_transformers" in want:
        speed = ours.get("speed_ratio")
        out.append({"goal": f"tokens/s at least {want['vs_transformers']}x transformers'",
                    "met": None if speed is None else speed >= want["vs_transformers"],
                    "detail": "not measured" if speed is None else f"{speed:.2f}x"})
    if "vs_liger" in want:
        liger = rows.get("transformers-liger", {})
        if "time_ratios" in ours and "time_ratios" in liger:
            speed = 1 / statistics.median(m / l for m, l in zip(ours["time_ratios"], liger["time_ratios"]))
            out.append({"goal": f"tokens/s at least {want['vs_liger']}x transformers + Liger's",
                        "met": speed >= want["vs_liger"], "detail": f"{speed:.2f}x (per-round median)"})
        else:
            out.append({"goal": f"tokens/s at least {want['vs_liger']}x transformers + Liger's", "met": None,
                        "detail": "Liger Kernel not installed" if not have_liger() else "not measured"})
    if "peak_ratio" in want:
        if "peak_bytes" in ours and "peak_bytes" in rows["transformers"]:
            ratio = ours["peak_bytes"] / rows["transformers"]["peak_bytes"]
            out.append({"goal": f"peak at most {want['peak_ratio']}x transformers'", "met": ratio <= want["peak_ratio"],
                        "detail": f"{ratio:.2f}x"})
        else:
            out.append({"goal": f"peak at most {want['peak_ratio']}x transformers'", "met": None,
                        "detail": "not measured"})
    if "mfu" in want:
        flops = step_flops(entry)
        if flops and "median_step_s" in ours:
            mfu = flops / ours["median_step_s"] / (PEAK_TFLOPS * 1e12)
            out.append({"goal": f"MFU at least {want['mfu']:.0%}", "met": mfu >= want["mfu"], "detail": f"{mfu:.1%}"})
        else:
            out.append({"goal": f"MFU at least {want['mfu']:.0%}", "met": None, "detail": "not measured"})
    return out


def step_flops(e: dict) -> float | None:
    """Model FLOPs of one step of a packed config: the matmuls, 2 per weight and token forward, 2 for the input's
    gradient and (full fine-tuning) 2 for the weight's; causal attention 6 x layers x width x n^2 per example
    (QK^T and PV, half the square, forward and backward). Recomputation under checkpointing is not counted, as MFU
    does not; LoRA's adapters (under 1% of the work) are left out."""
    data = e.get("data")
    if e.get("kind") != "packed" or not data:
        return None
    c = e["config_args"]
    h, layers, heads, kv = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]
    hs = h // heads
    per_layer = h * heads * hs * 2 + h * kv * hs * 2 + 3 * h * c["intermediate_size"]  # q, o; k, v; gate, up, down
    weights = layers * per_layer + h * c["vocab_size"]  # and the head
    per_token = (6 if not e.get("lora_r") else 4) * weights
    attention = 6 * layers * heads * hs * sum(n * n for n in data["example_lengths"])
    return per_token * data["tokens"] + attention


def fmt_spread(s: dict) -> str:
    return f"{s['median']:.3f} [{s['q1']:.3f}–{s['q3']:.3f}] ({s['min']:.3f}–{s['max']:.3f})"


def shape(e: dict) -> str:
    """batch x seq; for SFT, micro-batches x examples x the longest padded micro-batch."""
    if e["kind"] == "packed":
        return f"{e['rows']} x {e['row_len']} packed"
    if e["kind"] != "sft":
        return f"{e['batch']} x {e['seq']}"
    longest = max(padded_lengths(e["data"]), default=0) if "data" in e else "?"
    return f"{e['grad_accum']} x {e['batch']} x ≤{longest}"


def sft_how(e: dict) -> str:
    a = e.get("data", {}).get("example_args")
    settings = (f" (lr {a['lr']:g}, weight decay {a['weight_decay']:g}, {a['schedule']} over "
                f"{e['data']['total_steps']} steps after {a['warmup']} warmup steps, clipping at "
                f"{a['max_grad_norm']:g})" if a else "")
    return (f"SFT configs: the training step of `{e['example']}` on its bundled chats, the first {e['sft_steps']} "
            "optimizer steps of its data order (its `micro_batches`, right-padded by `minitune.data.collate`, the loss "
            "on the assistant turns only) trained on in turn, float32 weights under the example's autocast (bf16 on "
            "a GPU). minitune runs the example's `train_step` (gradient accumulation normalised by the targets of the "
            "whole step, clipping, AdamW step, scheduler step); transformers the same step with "
            "`model(input_ids, attention_mask, labels, num_items_in_batch=<the step's targets>).loss` per micro-batch. "
            f"Both use the example's `make_optimizer` and `make_scheduler`{settings}.")


def span(values) -> str:
    return f"{min(values)}–{max(values)}"


def padded_lengths(d: dict) -> list[int]:
    """The padded length of every micro-batch of a config's measured steps."""
    return [t for step in d["micro_batches"] for _, t in step]


def sft_data_line(e: dict) -> str:
    if "data" not in e:
        return f"- {e['config']}: the timing run failed or has not finished"
    d = e["data"]
    lengths = padded_lengths(d)
    return (f"- {e['config']} ({e['weights']}): {len(d['tokens'])} optimizer steps in turn, each {e['grad_accum']} "
            f"micro-batches of {e['batch']} chats padded to {span(lengths)} tokens; {span(d['tokens'])} non-padding "
            f"tokens and {span(d['targets'])} target tokens per step.")


def dtypes_line(e: dict) -> str | None:
    """A LoRA config's tensor dtypes by role, per library (from the timing process, else a memory process)."""
    parts = []
    for r in e["runs"]:
        d = r.get("dtypes") or r.get("memory", {}).get("dtypes")
        if d:
            parts.append(f"{r['library']}: " + ", ".join(f"{role} {'/'.join(v)}" for role, v in d.items()))
    return f"- {e['config']}: " + "; ".join(parts) if parts else None


def markdown(result: dict) -> str:
    """The report: the minitune-against-transformers configs' table and goals, then the DPO configs' section."""
    from bench_kernels import environment_line
    configs = [e for e in result["configs"] if e["kind"] != "dpo"]
    dpo = [e for e in result["configs"] if e["kind"] == "dpo"]
    title = "# Training step: minitune against transformers" if configs or not dpo else "# DPO step: reference models"
    lines = [title, "", environment_line(result["environment"]), ""]
    if configs:
        lines += transformers_markdown(result, configs)
    if dpo:
        lines += dpo_markdown(result, dpo, heading=bool(configs))
    lines += ["", f"Reproduce: `{result['command']}`", ""]
    return "\n".join(lines)


def transformers_markdown(result: dict, configs: list[dict]) -> list[str]:
    on_cpu = result["environment"]["device_type"] == "cpu"
    sft = [e for e in configs if e["kind"] == "sft"]
    how = ""
    if len(sft) < len(configs):
        how += (f"Random-token configs: one step = forward, backward, AdamW step (lr {LR}), zero_grad; the same "
                "random weights (a seeded transformers model saved and loaded by each) and the same batch of random "
                "token ids. ")
    if any(e["kind"] == "lora" for e in configs):
        how += (f"LoRA configs (lora-*): the same, with LoRA adapters (r and alpha in the config's name and JSON; "
                f"on {', '.join(LORA_TARGETS)}) and AdamW over the adapters only: minitune's mt.lora.apply_lora "
                "against peft.get_peft_model on transformers' model; B starts at zero, so the first-step loss is "
                "the base model's. ")
    if any(e.get("quantize") for e in configs):
        how += ("QLoRA configs (qlora-*): the same over a base whose decoder-block linear layers are NF4 (block size "
                f"{NF4_BLOCKSIZE}, double quantization), quantized from the same checkpoint while loading: minitune's "
                "`load_model(..., quantize=\"nf4\")` against transformers' `from_pretrained(..., quantization_config="
                "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\", bnb_4bit_use_double_quant=True, "
                "bnb_4bit_compute_dtype=<dtype>))`; no `prepare_model_for_kbit_training` (it would cast the "
                "embeddings, norms and head to float32, which both keep in the compute dtype; the adapters are "
                "float32 in both). ")
    if any(e.get("gradient_checkpointing") for e in configs):
        how += ("Configs marked (ckpt): activation checkpointing of every decoder layer, non-reentrant, in both "
                "libraries; (ckpt, offloaded): minitune's checkpoints kept in pinned CPU memory. ")
    if sft:
        how += sft_how(next((e for e in sft if "data" in e), sft[0])) + " "
    sft_warmup = f" ({max(result['warmup'], SFT_STEPS)} for SFT configs: one per distinct step at least)" if sft else ""
    how += ("**Speed**: one process holds every library's model and optimizer; "
            f"warm-up rounds: {result['warmup']}{sft_warmup}, then {result['steps']} timed rounds of one step per "
            "library, back to back, the order rotated each round. ms / step: each library's median over the rounds; "
            "tokens/s: its median over the rounds of the step's non-padding tokens / its time. "
            "Per-round ratio: in each round, the library's step time / transformers' step time, as median "
            "[interquartile range] (min–max) over the rounds; the drift of a noisy machine cancels within a round. "
            "vs transformers: tokens/s relative to transformers = 1 / the median per-round ratio. "
            f"**Memory**: one fresh process per library, {result['mem_warmup']} warm-up + {result['mem_steps']} "
            "steps; ")
    how += ("peak +MB: the RSS increase during the steps over the RSS after loading (weights excluded; gradients, "
            "optimizer state and activations included)." if on_cpu else
            "peak MB: torch.cuda.max_memory_allocated; peak +MB: its increase over the loaded weights.")
    header = ("| config | params | batch x seq | library | kernels backend | ms / step | tokens/s (non-padding) "
              "| vs transformers | per-round ratio | peak MB | peak +MB | first-step loss |")
    lines = [how, "", header, "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in configs:
        for r in e["runs"]:
            params = f"{r['params'] / 1e6:.1f}M" if r.get("params") else "—"
            marks = {True: " (ckpt)", "offload": " (ckpt, offloaded)"}
            name = e["config"] + marks.get(e.get("gradient_checkpointing"), "")
            cells = [name, params, shape(e), r["library"], r.get("backend") or "—"]
            if "median_step_s" in r:
                cells += [f"{r['median_step_s'] * 1e3:.1f}", f"{r['tokens_per_s']:.0f}"]
                if r["library"] == "transformers":
                    cells += ["1.00x", "—"]
                else:
                    cells += [f"{r['speed_ratio']:.2f}x", fmt_spread(r["time_ratio"])]
            else:
                cells += ["—"] * 4
            cells.append(f"{r['peak_bytes'] / 1e6:.0f}" if "peak_bytes" in r else "—")
            cells.append(f"{r['peak_increase_bytes'] / 1e6:.0f}" if "peak_increase_bytes" in r else "—")
            first = r.get("losses") or r.get("memory", {}).get("losses")
            cells.append(f"{first[0]:.6f}" if first else "—")
            lines.append("| " + " | ".join(cells) + " |")
    if sft:
        lines += [""] + [sft_data_line(e) for e in sft]
    dtypes = [dtypes_line(e) for e in configs if e["kind"] == "lora"]
    if any(dtypes):
        lines += ["", "What each library holds, in which dtype (decoder-block linear weights: uint8 = packed 4-bit):",
                  ""] + [d for d in dtypes if d]
    packed = [e for e in configs if e.get("kind") == "packed" and "data" in e]
    if packed:
        lines += ["", "Packed steps (issue 20): what each holds, and the model FLOPs utilisation on a GPU (model FLOPs "
                      f"per step / step time / {PEAK_TFLOPS:g} TFLOPS, the bf16 dense peak of an H100 or H200; see "
                      "step_flops):", ""]
        for e in packed:
            d, flops = e["data"], step_flops(e)
            mfu = [f"{r['library']} {flops / r['median_step_s'] / (PEAK_TFLOPS * 1e12):.1%}"
                   for r in e["runs"] if "median_step_s" in r] if flops and not on_cpu else []
            lines.append(f"- {e['config']}: {d['examples']} examples (lengths {min(d['example_lengths'])} to "
                         f"{max(d['example_lengths'])}, median {statistics.median(d['example_lengths']):.0f}), "
                         f"{d['tokens']} tokens in {d['rows']} rows of {d['row_len']} ({d['slots_filled']:.1%} of the "
                         f"slots filled), {d['targets']} targets; {flops / 1e12:.1f} TFLOP a step"
                         + (f"; MFU: {', '.join(mfu)}" if mfu else ""))
    lines += failed_runs(configs)
    lines += ["", "First-step losses (the same model trained by both; from the timing process):", ""]
    for e in configs:
        if "losses_agree" in e:
            lines.append(f"- {e['config']}: |minitune - transformers| = {e['first_loss_diff']:.2e} -> "
                         f"{'agree' if e['losses_agree'] else '**DIFFER**'} (tolerance {LOSS_RTOL[result['dtype']]:g} "
                         "relative)")
        else:
            lines.append(f"- {e['config']}: not compared (the timing run failed or has not finished)")
    goal = "a minitune training step is at least as fast as transformers' on the same config"
    which = "CPU" if on_cpu else "the CPU goal, reported here for information"
    lines += ["", "## Goals", "", (f"Goal ({which}): {goal}. Decided by the median per-round step-time "
                                        "ratio minitune / transformers (met when <= 1.00)."), ""]
    for e in configs:
        if "at_least_as_fast" in e:
            s = next(r for r in e["runs"] if r["library"] == "minitune")["time_ratio"]
            noise = ("the interquartile range straddles 1.00: within this machine's noise" if e["iqr_straddles_1"]
                     else f"the interquartile range is entirely {'below' if s['q3'] < 1 else 'above'} 1.00")
            lines.append(f"- {e['config']}: minitune / transformers step time, per round: median {s['median']:.3f} "
                         f"[IQR {s['q1']:.3f}–{s['q3']:.3f}, range {s['min']:.3f}–{s['max']:.3f}, {s['n']} rounds] "
                         f"= {e['speed_ratio']:.2f}x transformers' tokens/s ({noise}) -> "
                         f"{'**met**' if e['at_least_as_fast'] else '**NOT met**'}")
        else:
            lines.append(f"- {e['config']}: n/a (the timing run failed or has not finished)")
    for e in configs:
        for g in e.get("packed_goals", []):
            verdict = "n/a" if g["met"] is None else "**met**" if g["met"] else "**NOT met**"
            lines.append(f"- {e['config']} (GPU goal): {g['goal']}: {g['detail']} -> {verdict}")
    for e in configs:
        if "qlora_memory_goal_met" in e:
            ours = next(r for r in e["runs"] if r["library"] == "minitune")["peak_bytes"]
            lines.append(f"- {e['config']} (GPU goal: peak at most {QLORA_PEAK_RATIO}x transformers + PEFT + "
                         f"bitsandbytes' and at most {QLORA_PEAK_BYTES / 1e9:.0f} GB): peak {ours / 1e9:.2f} GB = "
                         f"{e['peak_ratio']:.2f}x theirs -> {'**met**' if e['qlora_memory_goal_met'] else '**NOT met**'}")
            for library, parts in e.get("qlora_peak_parts", {}).items():
                lines.append(f"  - {library}'s peak: weights {parts['weights'] / 1e9:.2f} GB + the adapters' gradients "
                             f"and AdamW moments {parts['adapter_state'] / 1e9:.2f} + activations and workspace "
                             f"{parts['activations_and_workspace'] / 1e9:.2f}")
    verdict = result.get("goal_met")
    lines += ["", f"Overall: {'**met**' if verdict else 'n/a' if verdict is None else '**NOT met**'}."]
    return lines


def failed_runs(configs: list[dict]) -> list[str]:
    errors = [f"- {e['config']} timing: {e['timing_error'][:300]}" for e in configs if "timing_error" in e]
    errors += [f"- {e['config']} {r['library']} memory: {r['memory_error'][:300]}"
               for e in configs for r in e["runs"] if "memory_error" in r]
    return ["", "Failed runs:", "", *errors] if errors else []


def dpo_markdown(result: dict, configs: list[dict], heading: bool) -> list[str]:
    """The DPO configs: one row per reference mode, the first-step losses against ln 2, the copy's extra memory."""
    import math
    on_cpu = result["environment"]["device_type"] == "cpu"
    base = DPO_REFERENCES[0]
    e0 = next((e for e in configs if "data" in e), configs[0])
    a = e0.get("data", {}).get("example_args")
    rpo = (f", plus RPO's {a['rpo_alpha']:g} x the chosen answers' NLL per token" if a and a.get("rpo_alpha") else
           ", no RPO term")
    settings = (f" ({a['loss_type']} loss, beta {a['beta']:g}{rpo}; AdamW lr {a['lr']:g}, {a['schedule']} over "
                f"{e0['data']['total_steps']} steps after {a['warmup']} warmup steps, clipping at "
                f"{a['max_grad_norm']:g}; LoRA r={a['lora_r']}, alpha {a['lora_alpha']:g} on "
                f"{' '.join(a['lora_targets'])} = every linear layer but the head; compute {a['dtype']})" if a else "")
    how = (f"The LoRA DPO step of `{e0['example']}`, one row per reference model (`--reference`): the example's own "
           f"`dpo_step` with its parse_args defaults{settings}, on the first {e0['dpo_steps']} optimizer steps of its "
           "data order over the bundled preference pairs (`load_pairs`, tokenized by tiny-mistral's tokenizer; "
           "`micro_batches`, `collate_preferences`: chosen and rejected rows in one forward), trained on in turn. "
           "The policy is loaded (float32) and LoRA applied the same way in every mode. "
           "**copy** holds a second set of the base weights (`Reference(\"copy\")`, a frozen deep copy made before "
           "LoRA); **lora-disabled** runs a second forward through the same weights with the adapters off; "
           "**precomputed** runs no reference forward at all: its log-probabilities are computed once, before the "
           "steps, and read from the batch. "
           f"**Speed**: one process holds the three, warm-up rounds: {e0.get('warmup', '?')}, then {result['steps']} "
           "timed rounds of one step per mode, back to back, the order rotated each round; ms / step: each mode's "
           "median; tokens/s: the policy's non-padding tokens / step time (median over the rounds); per-round ratio: "
           f"the mode's step time / {base}'s in the same round, median [IQR] (min–max); vs {base}: 1 / that median. "
           "precomputed's one-off pass over the steps' pairs is not in its step time. "
           f"**Memory**: one fresh process per mode, {result['mem_warmup']} warm-up + {result['mem_steps']} steps, "
           "measured from right after loading the policy, so the reference's own cost (the copy's deep copy, the "
           "precompute pass) is inside it, as are LoRA's adapters and AdamW's state; ")
    how += ("peak MB: the process's peak RSS (torch's libraries included); peak +MB: its increase over the RSS "
            "after loading the policy; set-up +MB: the RSS increase once the reference, LoRA and the optimizer are "
            "set up, before the first step (what the mode holds throughout; a CPU peak varies by tens of MB from "
            "run to run, this much less)." if on_cpu else
            "peak MB: torch.cuda.max_memory_allocated; peak +MB: its increase over the memory right after loading "
            "the policy (its float32 weights and the steps' batches); set-up +MB: the increase once the reference, "
            "LoRA and the optimizer are set up, before the first step (what the mode holds throughout).")
    header = (f"| config | params (trainable) | micro-batches x pairs x tokens | reference | ms / step | tokens/s "
              f"| vs {base} | per-round ratio to {base} | peak MB | peak +MB | set-up +MB | first-step DPO loss |")
    lines = (["", "## DPO step: the three reference models", ""] if heading else []) + [
        how, "", header, "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in configs:
        for r in e["runs"]:
            params = (f"{r['params'] / 1e6:.1f}M ({r['trainable_params'] / 1e6:.2f}M)"
                      if r.get("params") and r.get("trainable_params") else "—")
            mode = r["library"] + (" (precompute pass not in the step)" if r["library"] == "precomputed" else "")
            cells = [e["config"], params, dpo_shape(e), mode]
            if "median_step_s" in r:
                cells += [f"{r['median_step_s'] * 1e3:.1f}", f"{r['tokens_per_s']:.0f}"]
                cells += (["1.00x", "—"] if r["library"] == base else
                          [f"{r['speed_ratio']:.2f}x", fmt_spread(r["time_ratio"])])
            else:
                cells += ["—"] * 4
            peak = r.get("peak_bytes", r.get("peak_rss_bytes"))
            cells.append(f"{peak / 1e6:.0f}" if peak else "—")
            cells.append(f"{r['peak_increase_bytes'] / 1e6:.0f}" if "peak_increase_bytes" in r else "—")
            cells.append(f"{r['setup_increase_bytes'] / 1e6:.0f}" if "setup_increase_bytes" in r else "—")
            first = r.get("losses") or r.get("memory", {}).get("losses")
            cells.append(f"{first[0]:.6f}" if first else "—")
            lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [dpo_data_line(e) for e in configs]
    lines += failed_runs(configs)
    tolerance = LOSS_RTOL[result["dtype"]]
    lines += ["", f"First-step DPO losses (LoRA's B is zero, so the policy is the reference: each should be ln 2 = "
              f"{math.log(2):.6f}; from the timing process and from each memory process):", ""]
    for e in configs:
        if "first_losses" not in e:
            lines.append(f"- {e['config']}: not compared (the runs failed or have not finished)")
            continue
        lines.append(f"- {e['config']}: " + ", ".join(f"{k} {v:.6f}" for k, v in e["first_losses"].items())
                     + f"; max |loss − ln 2| = {e['first_loss_max_dev_ln2']:.1e}, max − min = "
                     f"{e['first_loss_spread']:.1e} -> "
                     + ("**agree**" if e["losses_agree"] else "**DIFFER**")
                     + f" (tolerance {tolerance:g} relative to ln 2).")
        if e.get("rpo_alpha") and "first_total_losses" in e:
            totals = e["first_total_losses"].values()
            lines.append(f"  The example's whole loss adds RPO's term ({e['rpo_alpha']:g} x the chosen answers' NLL "
                         f"per token): {min(totals):.6f}–{max(totals):.6f} at step 1 (max − min "
                         f"{e['first_total_loss_spread']:.1e}).")
        if "loss_spread_all_steps" in e:
            lines.append(f"  At every later step of the timing process the three modes' DPO losses stay within "
                         f"{e['loss_spread_all_steps']:.1e} of each other"
                         + (f" (whole losses: {e['total_loss_spread_all_steps']:.1e})"
                            if "total_loss_spread_all_steps" in e else "") + ": they train the same model.")
    lines += ["", "What the reference costs, over lora-disabled's (fresh processes):", ""]
    for e in configs:
        rows = {r["library"]: r for r in e["runs"]}
        if not all("peak_increase_bytes" in rows.get(m, {}) for m in DPO_REFERENCES):
            lines.append(f"- {e['config']}: n/a (a memory run failed or has not finished)")
            continue
        extra = functools.partial(_over_lora_disabled, rows)
        weights = rows["copy"].get("reference_bytes") or rows["copy"].get("base_weights_bytes")
        size = f"; the copy's weights are {weights / 1e6:.0f} MB" if weights else ""
        lines.append(f"- {e['config']}: peak +MB: copy {extra('peak_increase_bytes', 'copy')}, precomputed "
                     f"{extra('peak_increase_bytes', 'precomputed')}; set-up +MB: copy "
                     f"{extra('setup_increase_bytes', 'copy')}, precomputed "
                     f"{extra('setup_increase_bytes', 'precomputed')}{size}.")
    return lines


def _over_lora_disabled(rows: dict, key: str, mode: str) -> str:
    """A memory figure of `mode` less lora-disabled's, in MB (n/a when either is missing)."""
    if key not in rows[mode] or key not in rows["lora-disabled"]:
        return "n/a"
    return f"{(rows[mode][key] - rows['lora-disabled'][key]) / 1e6:+.0f} MB"


def dpo_shape(e: dict) -> str:
    """micro-batches x pairs per micro-batch x the longest padded micro-batch (its rows are 2 x pairs)."""
    longest = max(padded_lengths(e["data"]), default=0) if "data" in e else "?"
    return f"{e['grad_accum']} x {e['batch']} x ≤{longest}"


def dpo_data_line(e: dict) -> str:
    if "data" not in e:
        return f"- {e['config']}: the timing run failed or has not finished"
    d = e["data"]
    lengths = padded_lengths(d)
    precompute = next((r for r in e["runs"] if r.get("precompute_seconds") is not None), None)
    once = (f" precomputed's one-off pass over the {precompute['precompute_pairs']} pairs of these steps took "
            f"{precompute['precompute_seconds']:.2f} s (the example's would cover all {d['pairs']} training pairs)."
            if precompute else "")
    return (f"- {e['config']} ({e['weights']}, LoRA r={e['lora_r']}, alpha {e['lora_alpha']}): {len(d['tokens'])} "
            f"optimizer steps in turn, each {e['grad_accum']} micro-batch{'es' if e['grad_accum'] > 1 else ''} of "
            f"{e['batch']} pairs (2 x {e['batch']} rows) padded to {span(lengths)} tokens; {span(d['tokens'])} "
            f"non-padding tokens per step.{once}")


def main() -> None:
    import torch
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/out", help="where bench_train.json and bench_train.md go")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(LOSS_RTOL), help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--configs", help=f"comma-separated subset of {', '.join(ALL_CONFIGS)} (default: the device's)")
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (one step of each library per round)")
    ap.add_argument("--warmup", type=int, default=2, help="rounds before the timed ones")
    ap.add_argument("--mem-steps", type=int, default=2, help="steps of each fresh memory process, after --mem-warmup")
    ap.add_argument("--mem-warmup", type=int, default=1, help="steps of each memory process before --mem-steps")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per child process")
    ap.add_argument("--grad-checkpointing", choices=["config", "on", "off", "offload"], default="config",
                    help="LoRA configs: activation checkpointing as the config says (default), forced on or off, or "
                         "on with minitune's checkpoints in CPU memory")
    ap.add_argument("--work", help="keep the random checkpoints in this folder and reuse them (default: a temporary "
                                   "folder per config)")
    ap.add_argument("--child", choices=["paired", "memory", "write"], help=argparse.SUPPRESS)
    ap.add_argument("--libraries", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device_type = torch.device(args.device).type
    args.dtype = args.dtype or ("bfloat16" if device_type == "cuda" else "float32")

    if args.child == "write":
        config_class, config_args = CONFIGS[args.name][:2]
        write_checkpoint(config_class, config_args, args.dir, args.dtype, args.device)
        return
    if args.child:
        common = (args.dir, args.name, args.steps, args.warmup, args.dtype, args.device, args.grad_checkpointing)
        libraries = args.libraries.split(",")
        r = child_paired(libraries, *common) if args.child == "paired" else child_memory(libraries[0], *common)
        print("RESULT " + json.dumps(r), flush=True)
        return

    names = args.configs.split(",") if args.configs else [n for n, c in ALL_CONFIGS.items()
                                                          if c[-1] == device_type and n not in BASES_ONLY]
    if bad := [n for n in names if n not in ALL_CONFIGS]:
        ap.error(f"--configs: unknown {bad}; choose from {[n for n in ALL_CONFIGS if n not in BIG_BASES]}")
    if big := [n for n in names if n in BIG_BASES]:
        ap.error(f"--configs: {big} only as the base of a LoRA config (full fine-tuning of two 7B models with AdamW in "
                 f"one process does not fit): {[n for n, c in LORA_CONFIGS.items() if c[0] in BIG_BASES]}")
    if args.steps < 1 or args.warmup < 0 or args.mem_steps < 0 or args.mem_warmup < 0:
        ap.error("--steps must be >= 1, --warmup, --mem-steps and --mem-warmup >= 0")
    if args.mem_steps + args.mem_warmup < 1:
        ap.error("the memory processes need at least one step (--mem-steps + --mem-warmup >= 1)")
    from bench_kernels import environment
    result = {"command": ("python benchmarks/bench_train.py " + " ".join(sys.argv[1:])).strip(),
              "environment": environment(torch.device(args.device), getattr(torch, args.dtype)),
              "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup, "mem_steps": args.mem_steps,
              "mem_warmup": args.mem_warmup, "lr": LR, "configs": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def save(entry: dict | None = None) -> None:
        """Write the JSON and markdown as they stand (after each stage: a run cut short keeps what it has)."""
        if entry is not None and not any(e is entry for e in result["configs"]):
            result["configs"].append(entry)
        verdicts = [e["at_least_as_fast"] for e in result["configs"] if "at_least_as_fast" in e]
        memory = [e["qlora_memory_goal_met"] for e in result["configs"] if "qlora_memory_goal_met" in e]  # GPU
        memory += [g["met"] for e in result["configs"] for g in e.get("packed_goals", []) if g["met"] is not None]
        goals = [n for n in names if n not in DPO_CONFIGS]  # a DPO config compares references: no speed goal
        result["goal_met"] = all(verdicts + memory) if verdicts and len(verdicts) == len(goals) else None
        result["seconds"] = time.perf_counter() - t_start
        (out / "bench_train.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "bench_train.md").write_text(markdown(result))

    for name in names:
        bench_config(name, args, save)
    save()
    print()
    print(markdown(result))
    print(f"wrote {out / 'bench_train.json'} and {out / 'bench_train.md'} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
