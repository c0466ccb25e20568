"""LoRA: the layer's math, merge/unmerge, disable, parameter counts, and PEFT round trips both ways."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import minitune as mt
from minitune.lora import LoRALinear, apply_lora, disable_lora, load_adapter, merge_lora, save_adapter, unmerge_lora
from tests.conftest import save_hf, tiny_gpt2_config, tiny_mistral_config

CONFIGS = {"mistral": tiny_mistral_config, "gpt2": tiny_gpt2_config}
TARGETS = {"mistral": ("q_proj", "v_proj", "down_proj"), "gpt2": ("c_attn", "c_fc")}


def ids(batch=2, length=9):
    return torch.randint(3, 101, (batch, length))


def randomize(model: nn.Module) -> None:
    """B starts at zero (LoRA is a no-op at init): give A and B values, as training would."""
    with torch.no_grad():
        for _, layer in mt.lora.lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.05)
            layer.lora_A.weight.normal_(0, 0.05)


@torch.no_grad()
def base_and_adapted(model: nn.Module, family: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits before and after LoRA is applied (randomised, so that the adapter changes them)."""
    base = model(x)
    apply_lora(model, r=4, alpha=8, target_modules=TARGETS[family], verbose=False)
    randomize(model)
    return base, model(x)


@pytest.fixture(params=list(CONFIGS))
def pair(request, tmp_path):
    """(family, transformers model, the same weights loaded by minitune), float32, eval mode."""
    family = request.param
    hf = save_hf(CONFIGS[family](), tmp_path / "base")
    return family, hf, mt.load_model(tmp_path / "base").eval(), tmp_path


def test_the_layer_is_w_plus_scaled_b_a():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, r=2, alpha=3)
    assert layer.weight is base.weight and layer.bias is base.bias and not layer.weight.requires_grad
    assert torch.all(layer.lora_B.weight == 0)  # starts as the base layer
    bound = 1 / math.sqrt(6)  # kaiming_uniform(a=sqrt(5)) on fan_in 6: nn.Linear's own init
    assert layer.lora_A.weight.abs().max() <= bound
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 6)
    want = x @ base.weight.T + base.bias + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * 1.5
    torch.testing.assert_close(layer(x), want)
    assert LoRALinear(nn.Linear(6, 5), r=4, alpha=8, use_rslora=True).scaling == pytest.approx(8 / 2)


def test_apply_lora_trains_only_lora_and_counts_parameters(pair, capsys):
    family, _, model, _ = pair
    total_before = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    apply_lora(model, r=4, alpha=8, target_modules=TARGETS[family])
    layers = dict(mt.lora.lora_layers(model))
    expected = sum(4 * (m.in_features + m.out_features) for m in layers.values())
    trainable, total = mt.lora.parameter_counts(model)
    assert trainable == expected and total == total_before + expected
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    assert f"{trainable:,} trainable of {total:,}" in capsys.readouterr().out
    n_layers = 2
    assert len(layers) == n_layers * len(TARGETS[family])
    if family == "gpt2":
        assert "transformer.h.0.attn.c_attn" in layers  # the fused q/k/v projection


def test_targets_by_name_pattern_and_all_linear(pair):
    family, _, model, _ = pair
    names = mt.lora.target_names(model, "all-linear")
    assert "lm_head" not in names and len(names) == (7 if family == "mistral" else 4) * 2
    if family == "mistral":
        assert mt.lora.target_names(model, ["model.layers.1.*_proj"]) == [
            f"model.layers.1.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    with pytest.raises(ValueError, match="matches no linear layer"):
        mt.lora.target_names(model, ["qproj"])
    with pytest.raises(ValueError, match="lm_head is not supported"):
        mt.lora.target_names(model, ["lm_head"])


def test_merge_gives_the_unmerged_logits_and_unmerge_restores_the_base(pair):
    family, _, model, _ = pair
    x = ids()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=4, alpha=8, target_modules=TARGETS[family], verbose=False)
    randomize(model)
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        merged = model(x)
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    for k, v in base_weights.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)


def test_disable_gives_the_base_logits_merged_or_not(pair):
    family, _, model, _ = pair
    x = ids()
    base, adapted = base_and_adapted(model, family, x)
    assert not torch.allclose(adapted, base, atol=1e-4)
    with torch.no_grad():
        with disable_lora(model):
            torch.testing.assert_close(model(x), base)
        torch.testing.assert_close(model(x), adapted)
        with disable_lora(model):
            with disable_lora(model):  # nested, as a DPO helper inside a disabled block would
                torch.testing.assert_close(model(x), base)
            torch.testing.assert_close(model(x), base)  # still the base model after the inner block
            with pytest.raises(RuntimeError, match="merge inside disable_lora"):
                merge_lora(model)
        merge_lora(model)
        with disable_lora(model):
            torch.testing.assert_close(model(x), base, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_lora_and_flow_through_checkpointing(pair):
    family, _, model, _ = pair
    apply_lora(model, r=4, alpha=8, target_modules=TARGETS[family], verbose=False)
    randomize(model)
    model.train()
    x = ids()
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        model(x, labels=x).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == {n for n, p in model.named_parameters() if "lora_" in n}
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_an_adapter_saved_here_loads_in_peft_with_the_same_logits(pair):
    peft = pytest.importorskip("peft")
    family, hf, model, tmp_path = pair
    apply_lora(model, r=4, alpha=8, target_modules=TARGETS[family], use_rslora=family == "gpt2", verbose=False)
    randomize(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (family == "gpt2") and config["r"] == 4
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(input_ids=x).logits, atol=1e-5, rtol=1e-5)
        merged = theirs.merge_and_unload()  # PEFT's merge (Conv1D's transpose included) agrees too
        torch.testing.assert_close(model(x), merged(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_an_adapter_peft_saved_loads_here_with_the_same_logits(pair):
    peft = pytest.importorskip("peft")
    family, hf, model, tmp_path = pair
    targets = list(TARGETS[family])
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, fan_in_fan_out=family == "gpt2",
                             task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    theirs.save_pretrained(tmp_path / "peft")
    load_adapter(model, tmp_path / "peft")
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs.eval()(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    assert {n.rpartition(".")[2] for n, _ in mt.lora.lora_layers(model)} == set(targets)


def test_saving_the_full_model_writes_merged_or_base_weights_never_lora(pair):
    import transformers
    family, _, model, tmp_path = pair
    x = ids()
    base, adapted = base_and_adapted(model, family, x)
    mt.lora.save_merged(model, tmp_path / "merged")
    mt.lora.save_model(model, tmp_path / "old-name", merged=True)  # save_merged's former name still works
    mt.lora.save_model(model, tmp_path / "plain", merged=False)
    assert not any(layer.merged for _, layer in mt.lora.lora_layers(model))  # left as it was
    from safetensors import safe_open
    for folder, want in (("merged", adapted), ("old-name", adapted), ("plain", base)):
        with safe_open(tmp_path / folder / "model.safetensors", "pt") as f:
            assert not [k for k in f.keys() if "lora" in k]
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=x).logits, want, atol=1e-5, rtol=1e-5)


def test_load_adapter_errors_name_the_file(tmp_path, pair):
    family, _, model, _ = pair
    with pytest.raises(FileNotFoundError, match="adapter_config.json: not found"):
        load_adapter(model, tmp_path / "nowhere")
    other = mt.load_model(tmp_path / "base")
    apply_lora(other, r=4, alpha=8, target_modules=TARGETS[family], verbose=False)
    save_adapter(other, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: .*lora_A.weight has shape \(4, 64\)"):
        load_adapter(mt.load_model(tmp_path / "base"), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match=r"adapter_config.json: \{'use_dora': True\} are not supported"):
        load_adapter(mt.load_model(tmp_path / "base"), tmp_path / "a")


@pytest.mark.slow
def test_lora_under_fsdp2_with_checkpointing_matches_one_process():
    """Two gloo processes, each block and the root fully_shard-ed: the same loss and LoRA gradients as one."""
    import os
    from tests.conftest import TORCHRUN
    import subprocess
    import sys
    from pathlib import Path

    worker = str(Path(__file__).with_name("fsdp_lora_worker.py"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def result(*launcher: str, mode: str) -> dict:
        proc = subprocess.run([*launcher, worker, mode], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    one = result(sys.executable, mode="one")
    two = result(*TORCHRUN, mode="fsdp")
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["grads"].keys() == one["grads"].keys() and all("lora_" in n for n in one["grads"])
    for name, norm in one["grads"].items():
        assert two["grads"][name] == pytest.approx(norm, rel=1e-4), name
