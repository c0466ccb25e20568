"""Nothing lost, nothing silent: the examples as a user drives them with bad or unusual input. A finished run
is never replaced unasked, inputs are checked before any work, a user error is one line and exit status 2,
Ctrl-C says where to resume. The list of cases with their outcomes is in tests/README.md."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minitune as mt
from minitune.errors import UserError
from minitune.plot import have_matplotlib
from minitune.train import Interrupted, run_main
from tests.conftest import example_module, example_stops, first_lines, read_metrics, run_example

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "assets" / "tiny-mistral"
SFT = ["--batch-size", "4", "--eval-every", "100", "--exact-match-samples", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    chats = ROOT / "examples" / "data" / "sft" / "train.jsonl"
    return first_lines(chats, 8, tmp_path_factory.mktemp("data") / "small.jsonl")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data) -> tuple[Path, list[str]]:
    """A finished SFT run with no checkpoint (2 steps, --save-every 100): (its folder, its flags)."""
    out = tmp_path_factory.mktemp("finished")
    flags = [*SFT, "--data", str(data), "--val-data", str(data), "--val-data", str(data), "--max-steps", "2", "--save-every", "100"]
    run_example("finetune_mistral.py", out, *flags)
    return out, flags


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stderr_of(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


# ---------------------------------------------------------------- data loss


def test_a_finished_run_is_not_replaced_by_a_new_one(finished):
    out, flags = finished
    before = snapshot(out)
    message = example_stops("finetune_mistral.py", out, *flags, "--lr", "5e-4")
    written = "final, metrics.jsonl, training.png" if have_matplotlib() else "final, metrics.jsonl"
    assert message == (f"--out {out} holds an earlier run ({written}): pass --resume auto to continue it, --overwrite "
                       "to start again (deleting them), or another --out")
    assert snapshot(out) == before


def test_resume_auto_on_a_finished_run_without_checkpoints_is_refused(finished):
    out, flags = finished
    before = snapshot(out)
    assert "but no checkpoint to continue from: pass --overwrite" in example_stops(
        "finetune_mistral.py", out, *flags, "--resume", "auto")
    assert snapshot(out) == before


def test_overwrite_starts_again_and_keeps_the_folders_other_files(finished, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(finished[0], out)
    (out / "notes.txt").write_text("mine")
    metrics = run_example("finetune_mistral.py", out, *finished[1], "--max-steps", "1", "--overwrite")
    assert [m["step"] for m in metrics] == [0, 1]
    assert (out / "notes.txt").read_text() == "mine"


def test_resuming_another_runs_checkpoint_into_a_finished_run_is_refused(finished, tmp_path, data):
    other = tmp_path / "other"
    run_example("finetune_mistral.py", other, *finished[1], "--max-steps", "2", "--save-every", "1")
    out, flags = finished
    before = snapshot(out)
    message = example_stops("finetune_mistral.py", out, *flags, "--resume", str(other / "checkpoints" / "step-1"))
    assert "holds an earlier run (final, metrics.jsonl" in message
    assert snapshot(out) == before


def test_overwrite_and_resume_together_are_refused(finished, capsys):
    with pytest.raises(SystemExit) as stop:
        example_module("finetune_mistral.py").parse_args(["--overwrite", "--resume", "auto"])
    assert stop.value.code == 2
    assert stderr_of(capsys)[-1].endswith("--overwrite starts the run again and --resume continues it: pass one of "
                                          "them (see --help)")


def test_dpo_refuses_an_out_that_holds_its_own_model(finished):
    out, _ = finished
    before = snapshot(out)
    message = example_stops("dpo.py", out, "--model", str(out / "final"), "--device", "cpu", "--overwrite")
    assert message == (f"--out {out} holds the --model {out / 'final'} this run starts from: choose another --out, "
                       "so that nothing the run writes or --overwrite deletes can touch it")
    assert snapshot(out) == before


def test_an_out_that_is_a_file_is_refused(tmp_path, data):
    (tmp_path / "out").write_text("")
    assert "is a file; pass a folder" in example_stops("finetune_mistral.py", tmp_path / "out", *SFT, "--data",
                                                       str(data), "--max-steps", "1")


def test_cross_validate_checks_every_search_value_before_training(tmp_path, capsys):
    cv = example_module("cross_validate.py")
    with pytest.raises(SystemExit) as stop:
        cv.main(["--search", "lr=1e-3,-1", "--out", str(tmp_path / "cv")])
    assert stop.value.code == 2 and "argument --lr: must be above 0.0, not -1.0" in stderr_of(capsys)[-1]
    assert not (tmp_path / "cv").exists()  # no fold trained


def test_cross_validate_keeps_each_scored_configuration_and_resumes_from_them(tmp_path, monkeypatch):
    cv = example_module("cross_validate.py")
    fitted = []

    def fit_fold(args, extra, config, train, val, fold):  # a stand-in: the score is the lr itself
        if len(fitted) == 6:  # the third configuration's first fold: the user presses Ctrl-C
            raise KeyboardInterrupt
        fitted.append((config["lr"], fold))
        return {"val_loss": config["lr"]}

    monkeypatch.setattr(cv, "fit_fold", fit_fold)
    flags = ["--search", "lr=1,2,3", "--samples", "0", "--subset", "12", "--out", str(tmp_path / "cv")]
    with pytest.raises(Interrupted, match=r"interrupted with 2 of 3 configurations scored in .*search.jsonl: the same "
                                          "command with --resume auto goes on from them"):
        cv.main(flags)
    assert [json.loads(line)["config"] for line in (tmp_path / "cv" / "search.jsonl").read_text().splitlines()] == [
        {"lr": 1}, {"lr": 2}]
    assert "holds an earlier run (search.jsonl)" in str(pytest.raises(UserError, cv.main, flags).value)
    fitted.clear()
    results = cv.main([*flags, "--resume", "auto"])
    assert fitted == [(3, 0), (3, 1), (3, 2)]  # only the configuration not yet scored
    assert [r["config"]["lr"] for r in results] == [1, 2, 3]


def test_a_resumed_metrics_log_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n')

    def killed(self, *args, **kwargs):
        Path.write_bytes(self, b"")  # the file is created empty, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        mt.train.MetricsLog(path, [{"step": 0}])
    monkeypatch.undo()
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n'


def test_the_main_job_pretraining_and_comparison_refuse_earlier_results(tmp_path):
    (tmp_path / "runs" / "sft").mkdir(parents=True)
    (tmp_path / "runs" / "sft" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match=r"runs/sft hold an earlier main job: pass --overwrite"):
        example_module("reproduce.py").main(["--runs", str(tmp_path / "runs"), "--sections", "sft"])
    assert (tmp_path / "runs" / "sft" / "metrics.jsonl").exists()
    shutil.copytree(TINY, tmp_path / "assets" / "tiny-mistral")
    with pytest.raises(UserError, match=r"tiny-mistral hold an earlier pre-training: pass --overwrite"):
        example_module("pretrain_tiny.py").main(["--out", str(tmp_path / "assets"), "--models", "tiny-mistral",
                                                 "--log-dir", str(tmp_path / "logs")])
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "results.json").write_text("{}")
    with pytest.raises(UserError, match=r"holds an earlier run \(results.json\)"):
        example_module("compare_models.py").main(["--out", str(tmp_path / "compare"), "--models", str(TINY),
                                                  "--device", "cpu"])


# ---------------------------------------------------------------- silent


def test_a_one_step_run_trains_at_the_peak_rate_and_says_its_warmup_was_cut(tmp_path, data, capsys):
    metrics = run_example("finetune_mistral.py", tmp_path / "one", *SFT, "--data", str(data), "--val-data", str(data), "--max-steps", "1")
    assert metrics[1]["lr"] == 1e-3
    assert "--warmup 20 is not shorter than the run (1 steps): warming up over 0 steps" in capsys.readouterr().err
    before, after = load_file(TINY / "model.safetensors"), load_file(tmp_path / "one" / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_run_shorter_than_its_warmup_reaches_the_peak_rate(tmp_path, data):
    metrics = run_example("finetune_mistral.py", tmp_path / "three", *SFT, "--data", str(data), "--val-data", str(data), "--max-steps", "3")
    assert [m["lr"] for m in metrics[1:]] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])


def test_resume_auto_with_another_model_of_the_same_architecture_is_refused(tmp_path, data):
    other = tmp_path / "other-mistral"
    shutil.copytree(TINY, other)
    model = mt.load_model(other)
    with torch.no_grad():
        model.model.norm.weight.add_(0.01)
    model.save_pretrained(other)
    flags = [*SFT, "--data", str(data), "--val-data", str(data), "--max-steps", "2", "--save-every", "1"]
    out = tmp_path / "run"
    run_example("finetune_mistral.py", out, *flags)
    (out / "final").rename(tmp_path / "was-final")  # as if killed after its step-1 save
    message = example_stops("finetune_mistral.py", out, *flags, "--resume", "auto", "--model", str(other))
    assert "the run started from other weights than --model" in message and str(other) in message


# ---------------------------------------------------------------- checked before any work


def test_a_tokenizer_bigger_than_the_model_is_refused_before_training(tmp_path, data):
    grown = tmp_path / "grown"
    shutil.copytree(TINY, grown)
    tok = mt.load_tokenizer(grown)
    rows = mt.load_model(grown).input_embeddings().num_embeddings
    tok.add_tokens([f"<extra_{i}>" for i in range(rows - len(tok) + 1)])
    tok.save_pretrained(grown)
    message = example_stops("finetune_mistral.py", tmp_path / "out", *SFT, "--model", str(grown), "--data", str(data),
                            "--val-data", str(data), "--max-steps", "1")
    assert f"has {rows + 1} tokens, added ones included, but the model's embedding has {rows} rows" in message
    assert "model.resize_token_embeddings(len(tok))" in message
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_cuda_device_without_cuda_is_one_line_before_any_work(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as stop:
        example_module("finetune_mistral.py").parse_args(["--device", "cuda", "--out", str(tmp_path / "c")])
    assert stop.value.code == 2
    why = "was built without CUDA" if torch.version.cuda is None else "sees no CUDA GPU"  # a CUDA build on a CPU box
    assert stderr_of(capsys) == [f"{Path(sys.argv[0]).name}: error: --device cuda: this torch {torch.__version__} "
                                 f"{why}: pass --device cpu (see --help)"]
    with pytest.raises(SystemExit):
        example_module("finetune_mistral.py").parse_args(["--device", "tpu7"])
    assert "not a device torch knows" in stderr_of(capsys)[-1]


@pytest.mark.parametrize("script", ["finetune_mistral.py", "dpo.py", "finetune_gpt.py"])
def test_a_missing_or_folder_data_path_is_one_line(script, tmp_path, capsys):
    example = example_module(script)
    for path, says in ((tmp_path / "nope.jsonl", "no such file"), (tmp_path, "is a folder, not a JSONL file")):
        with pytest.raises(SystemExit) as stop:
            example.parse_args(["--model", str(TINY), "--data", str(path)])
        assert stop.value.code == 2 and stderr_of(capsys)[-1].endswith(f"--data {path}: {says} (see --help)")
    with pytest.raises(SystemExit):
        example.parse_args(["--model", str(TINY), "--val-data", str(tmp_path / "v.jsonl")])
    assert f"--val-data {tmp_path / 'v.jsonl'}: no such file" in stderr_of(capsys)[-1]


def test_finetune_gpt_refuses_resume_it_cannot_do(capsys):
    with pytest.raises(SystemExit):
        example_module("finetune_gpt.py").parse_args(["--resume", "auto"])
    assert "this example saves no checkpoints to resume from" in stderr_of(capsys)[-1]


# ---------------------------------------------------------------- one line, exit 2; Ctrl-C


def test_run_main_prints_user_errors_in_one_line_and_keeps_bugs_tracebacks(capsys):
    def bad_input(argv):
        raise UserError("data.jsonl:3: missing field 'completion'")

    def bug(argv):
        raise KeyError("a bug")

    with pytest.raises(SystemExit) as stop:
        run_main(bad_input)
    assert stop.value.code == 2
    assert stderr_of(capsys) == [f"{Path(sys.argv[0]).name}: error: data.jsonl:3: missing field 'completion'"]
    with pytest.raises(SystemExit) as stop:
        run_main(lambda argv: open("/nonexistent/x.jsonl"))
    assert stop.value.code == 2 and "No such file or directory: '/nonexistent/x.jsonl'" in stderr_of(capsys)[0]
    with pytest.raises(KeyError):
        run_main(bug)
    with pytest.raises(ConnectionResetError):  # an OSError, but not one a user can fix by a flag: a traceback
        run_main(lambda argv: (_ for _ in ()).throw(ConnectionResetError("peer")))
    with pytest.raises(SystemExit) as stop:  # Ctrl-C outside a training loop
        run_main(lambda argv: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert stop.value.code == 130 and stderr_of(capsys) == [f"{Path(sys.argv[0]).name}: interrupted"]


def test_a_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        example_module("finetune_mistral.py").parse_args(["--lr", "-1"])
    assert stop.value.code == 2
    assert stderr_of(capsys) == [f"{Path(sys.argv[0]).name}: error: argument --lr: must be above 0.0, not -1.0 "
                                 "(see --help)"]


def test_a_non_finite_loss_is_a_user_error(tmp_path, data):
    with pytest.raises(UserError, match="stopped before updating the weights"):
        example_module("finetune_mistral.py").main(["--out", str(tmp_path / "nf"), *SFT, "--data", str(data), "--val-data", str(data),
                                                    "--max-steps", "4", "--lr", "1e6", "--warmup", "0"])


def test_ctrl_c_says_where_to_resume_and_a_resumed_run_says_from_which_step(tmp_path, data, monkeypatch, capsys):
    sft = example_module("finetune_mistral.py")
    flags = ["--out", str(tmp_path / "c"), *SFT, "--data", str(data), "--val-data", str(data), "--max-steps", "4", "--save-every", "2"]
    step = sft.train_step

    def pressed_in_step_3(model, batches, optimizer, scheduler, *args):
        if scheduler.last_epoch == 2:
            raise KeyboardInterrupt
        return step(model, batches, optimizer, scheduler, *args)

    monkeypatch.setattr(sft, "train_step", pressed_in_step_3)
    with pytest.raises(SystemExit) as stop:
        run_main(sft.main, flags)
    assert stop.value.code == 130
    assert stderr_of(capsys)[-1] == (f"{Path(sys.argv[0]).name}: interrupted in step 3 of 4; the last checkpoint is "
                                     f"{tmp_path / 'c' / 'checkpoints' / 'step-2'}: the same command with --resume "
                                     "auto continues from it")
    monkeypatch.undo()
    sft.main([*flags, "--resume", "auto"])
    err = stderr_of(capsys)
    assert f"resuming from step 2 of 4 ({tmp_path / 'c' / 'checkpoints' / 'step-2'})" in err
    assert err[-1].startswith(f"finished: {tmp_path / 'c' / 'final'}, {tmp_path / 'c' / 'metrics.jsonl'}")
    assert [m["step"] for m in read_metrics(tmp_path / "c")] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_ctrl_c_in_a_real_run_exits_130_with_one_line(tmp_path, data):
    """As a user presses it: SIGINT to the process once its first checkpoint is on disk."""
    out = tmp_path / "sigint"
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "finetune_mistral.py"), "--out", str(out), *SFT,
                             "--data", str(data), "--val-data", str(data), "--max-steps", "1000", "--save-every", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while mt.checkpoint.latest_checkpoint(out) is None and time.monotonic() < deadline:  # any: older ones are pruned
        time.sleep(0.2)
    assert time.monotonic() < deadline, "no checkpoint was written"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "interrupted in step" in stderr.splitlines()[-1] and "--resume auto continues from it" in stderr


# ---------------------------------------------------------------- files


def test_saved_weights_follow_the_umask_like_every_other_file(tmp_path):
    mode = 0o666 & ~_umask()
    model = mt.load_model(TINY)
    model.save_pretrained(tmp_path / "m")
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint = mt.checkpoint.save_checkpoint(tmp_path / "r", 1, model, optimizer)
    mt.reference.save_logps(tmp_path / "logps.safetensors", torch.zeros(2, 2), "key")
    mt.lora.apply_lora(model, r=2)
    mt.lora.save_adapter(model, tmp_path / "adapter")
    written = [tmp_path / "m" / "model.safetensors", tmp_path / "m" / "config.json", checkpoint / "model.safetensors",
               tmp_path / "logps.safetensors", tmp_path / "adapter" / "adapter_model.safetensors"]
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in written} == {str(p): oct(mode) for p in written}


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_import_minitune_leaves_torch_distributed_checkpoint_for_when_it_is_used():
    code = "import sys, minitune; print('torch.distributed.checkpoint' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
