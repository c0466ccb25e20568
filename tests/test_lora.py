"""LoRA: the layer's math, merge/unmerge, disable, parameter counts, and PEFT round trips both ways."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import minitune as mt
from minitune.errors import UserError
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
    with pytest.raises(UserError, match="matches no linear layer"):
        mt.lora.target_names(model, ["qproj"])
    with pytest.raises(UserError, match="lm_head is not supported"):
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
    with pytest.raises(UserError, match=r"adapter_model.safetensors: .*lora_A.weight has shape \(4, 64\)"):
        load_adapter(mt.load_model(tmp_path / "base"), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UserError, match=r"adapter_config.json: \{'use_dora': True\} are not supported"):
        load_adapter(mt.load_model(tmp_path / "base"), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(UserError, match=r"adapter_config.json: not UTF-8 text"):
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


# ---------------------------------------------------------------- all or nothing: a refused call changes nothing


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    """A tiny Mistral on disk, saved once for the tests below; each loads its own copy."""
    folder = tmp_path_factory.mktemp("mistral")
    save_hf(tiny_mistral_config(), folder)
    return folder


def as_it_is(model: nn.Module) -> tuple:
    """What a refused call must leave as it was: the state-dict keys, the very module objects at every path,
    every parameter's requires_grad and the LoRA settings."""
    return (list(model.state_dict()), dict(model.named_modules()),
            {name: p.requires_grad for name, p in model.named_parameters()}, getattr(model, "lora_config", None))


def refused(call, match: str) -> str:
    """The message of the UserError `call` raises, checked to be one line that matches `match`."""
    with pytest.raises(UserError, match=match) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.parametrize("targets, match", [
    (["q_proj", "typo_proj"], r"target_modules: 'typo_proj' matches no linear layer; the model's are q_proj, "
                              r"k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head, at paths like "
                              r"model\.layers\.0\.self_attn\.q_proj"),
    (["q_proj", "model.layers.9.*"], r"'model\.layers\.9\.\*' matches no linear layer"),
    (["all-linear", "q_proj"], r"'all-linear' means every linear layer but the head; give it alone"),
    ([], r"target_modules=\[\]: expected 'all-linear', a module name"),
    (["lm_head"], r"LoRA on lm_head is not supported"),
], ids=["typo", "pattern-matching-nothing", "all-linear-in-a-list", "empty-list", "lm_head"])
def test_a_target_that_is_wrong_raises_and_leaves_the_model_as_it_was(mistral_dir, targets, match):
    model = mt.load_model(mistral_dir)
    before = as_it_is(model)
    refused(lambda: apply_lora(model, r=4, target_modules=targets, verbose=False), match)
    assert as_it_is(model) == before and not list(mt.lora.lora_layers(model))


@pytest.mark.parametrize("settings, match", [
    (dict(r=0), r"apply_lora: r=0; the LoRA rank must be a whole number >= 1"),
    (dict(r=2.5), r"apply_lora: r=2\.5; the LoRA rank"),
    (dict(alpha=0), r"apply_lora: alpha=0; LoRA's scale numerator must be a positive number"),
    (dict(alpha=float("nan")), r"apply_lora: alpha=nan"),
    (dict(dropout=1.0), r"apply_lora: dropout=1\.0; the LoRA dropout must be in \[0, 1\)"),
], ids=["r=0", "r=2.5", "alpha=0", "alpha=nan", "dropout=1"])
def test_a_bad_setting_raises_before_the_model_changes(mistral_dir, settings, match):
    model = mt.load_model(mistral_dir)
    before = as_it_is(model)
    refused(lambda: apply_lora(model, **{"r": 4, **settings}, target_modules="all-linear", verbose=False), match)
    assert as_it_is(model) == before


def test_a_second_apply_on_other_layers_extends_and_every_adapter_trains(mistral_dir):
    model = mt.load_model(mistral_dir)
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj"], verbose=False)
    apply_lora(model, r=2, alpha=4, target_modules=["v_proj", "model.layers.*.mlp.down_proj"], verbose=False)
    layers = dict(mt.lora.lora_layers(model))
    assert sorted(layers) == sorted(f"model.layers.{i}.{m}" for i in range(2)
                                    for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    assert layers["model.layers.0.self_attn.q_proj"].r == 4 and layers["model.layers.0.mlp.down_proj"].r == 2
    assert all(("lora_" in name) == p.requires_grad for name, p in model.named_parameters())  # the base is frozen
    randomize(model)
    x = ids()
    model(x, labels=x).backward()
    got_grads = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got_grads == {name for name, _ in model.named_parameters() if "lora_" in name}  # old and new adapters


BOTH_Q = r"model\.layers\.0\.self_attn\.q_proj, model\.layers\.1\.self_attn\.q_proj"


@pytest.mark.parametrize("targets, reached", [
    ("all-linear", rf"2 layer\(s\) that already have LoRA \({BOTH_Q}\)"),
    (["v_proj", "q_proj"], rf"2 layer\(s\) that already have LoRA \({BOTH_Q}\)"),
    (["model.layers.0.self_attn.*"], r"1 layer\(s\) that already have LoRA \(model\.layers\.0\.self_attn\.q_proj\)"),
], ids=["all-linear", "q_proj-again", "pattern-over-a-q_proj"])
def test_a_second_apply_reaching_lora_layers_refuses_and_leaves_the_model_as_it_was(mistral_dir, targets, reached):
    model = mt.load_model(mistral_dir)
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj"], verbose=False)
    before = as_it_is(model)
    refused(lambda: apply_lora(model, r=4, target_modules=targets, verbose=False),
            f"reaches {reached}: target other layers, or save_merged the model")
    assert as_it_is(model) == before
    # an adapter's own layers are never a target: lora_A and lora_B are no "linear layer" to a name or pattern
    refused(lambda: apply_lora(model, r=4, target_modules=["*.lora_A"], verbose=False),
            r"'\*\.lora_A' matches no linear layer")
    assert as_it_is(model) == before


@pytest.fixture
def adapter(mistral_dir, tmp_path):
    """A saved adapter (r=4 on q_proj, v_proj, down_proj) of the tiny Mistral: its folder."""
    model = mt.load_model(mistral_dir)
    apply_lora(model, r=4, alpha=8, target_modules=TARGETS["mistral"], verbose=False)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_adapter(folder, config=None, tensors=None) -> None:
    """Rewrite an adapter's config (dict.update) or its tensors (a function of the dict of them)."""
    from safetensors.torch import load_file, save_file
    if config:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors:
        save_file(tensors(load_file(folder / "adapter_model.safetensors")), folder / "adapter_model.safetensors")


Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("damage, match", [
    (dict(config={"r": 2}), r"adapter_model\.safetensors: base_model\.model\.model\.layers\.0\.self_attn\.q_proj\."
                            r"lora_A\.weight has shape \(4, 64\), the model's layer needs \(2, 64\) \(r=2 from "
                            r"adapter_config\.json"),
    (dict(config={"r": 0}), r"adapter_config\.json: r=0; the LoRA rank must be"),
    (dict(config={"lora_dropout": -0.5}), r"adapter_config\.json: lora_dropout=-0\.5; the LoRA dropout must be"),
    (dict(tensors=lambda t: {k: v for k, v in t.items() if k != Q0_A}), r"adapter_model\.safetensors: missing "
                                                                        + Q0_A.replace(".", r"\.")),
    (dict(tensors=lambda t: {**t, "base_model.model.lm_head.weight": torch.zeros(101, 64)}),
     r"adapter_model\.safetensors: unexpected tensors \['base_model\.model\.lm_head\.weight'\]"),
    (dict(tensors=lambda t: {**t, Q0_A.replace("layers.0", "layers.7"): t[Q0_A].clone()}),
     r"the model has no linear layer LoRA can go on at model\.layers\.7\.self_attn\.q_proj"),
], ids=["r-tampered", "r=0", "dropout<0", "lora_A-missing", "extra-tensor", "layer-the-model-lacks"])
def test_an_adapter_that_does_not_fit_leaves_the_model_as_it_was(mistral_dir, adapter, damage, match):
    edit_adapter(adapter, **damage)
    model = mt.load_model(mistral_dir)
    before = as_it_is(model)
    refused(lambda: load_adapter(model, adapter), match)
    assert as_it_is(model) == before and not list(mt.lora.lora_layers(model))


def test_an_adapter_of_another_hidden_size_leaves_the_model_as_it_was(mistral_dir, tmp_path):
    save_hf(tiny_mistral_config(hidden_size=32), tmp_path / "narrow")
    other = mt.load_model(tmp_path / "narrow")
    apply_lora(other, r=4, alpha=8, target_modules=TARGETS["mistral"], verbose=False)
    save_adapter(other, tmp_path / "narrow-adapter")
    model = mt.load_model(mistral_dir)
    before = as_it_is(model)
    refused(lambda: load_adapter(model, tmp_path / "narrow-adapter"),
            r"q_proj\.lora_A\.weight has shape \(4, 32\), the model's layer needs \(4, 64\)")
    assert as_it_is(model) == before and not list(mt.lora.lora_layers(model))


def test_loading_an_adapter_onto_a_model_with_lora_refuses_up_front(mistral_dir, adapter):
    model = mt.load_model(mistral_dir)
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj"], verbose=False)
    before = as_it_is(model)
    refused(lambda: load_adapter(model, adapter),
            rf"adapter: the model already has LoRA layers \(2: {BOTH_Q}\): load the adapter onto the base model, "
            r"or save_merged this model")
    assert as_it_is(model) == before
