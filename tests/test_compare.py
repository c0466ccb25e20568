"""examples/compare_models.py and examples/cross_validate.py on small budgets: the protocol's outputs, the
pipeline's choice, the folds the search trains on, and the errors a user can act on."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import example_module

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "assets" / "tiny-mistral")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    compare = example_module("compare_models.py")
    # as sampler, scorer and reference of itself, the model's implicit rewards are all 0, so best of n by them
    # keeps each prompt's first sample
    result = compare.main(["--models", TINY, "--pipeline", TINY, TINY, TINY, "--limit", "6", "--n", "3",
                           "--resamples", "200", "--device", "cpu", "--out", str(out)])
    return out, result


def test_every_metric_has_an_interval_around_its_value_and_items(compared):
    out, result = compared
    assert result["format"] == "chat"  # tiny-mistral has a chat template
    metrics = result["results"][TINY]
    assert sorted(metrics) == ["instruction/exact_match", "knowledge/acc", "knowledge/acc_norm",
                               "language/bits_per_byte", "language/ppl", "preference/prefers_chosen",
                               "preference/rule_score"]
    for name, (value, low, high, items) in metrics.items():
        assert low <= value <= high, name
        assert items == 6 or name.startswith("language/"), name
    assert 1 < metrics["language/ppl"][0] < 100
    # bits per byte is the same NLL per token, over the text's bytes: a fixed ratio to log2(ppl)
    ratio = metrics["language/bits_per_byte"][0] / math.log2(metrics["language/ppl"][0])
    assert ratio == pytest.approx(metrics["language/bits_per_byte"][1] / math.log2(metrics["language/ppl"][1]))
    assert 0.1 < ratio < 1  # more than one byte per token
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert len(rows) == 7  # one model x seven metrics
    row = next(r for r in rows if r["metric"] == "acc")
    assert float(row["value"]) == metrics["knowledge/acc"][0] and row["task"] == "knowledge"
    table = (out / "comparison.md").read_text()
    assert "| knowledge | acc_norm | 6 |" in table and "ppl (lower is better)" in table
    assert json.loads((out / "results.json").read_text())["prompt_format"] == "chat"
    pytest.importorskip("matplotlib")
    for name in ("comparison", "comparison_instruction", "comparison_knowledge", "comparison_preference",
                 "comparison_language"):
        assert (out / f"{name}.png").stat().st_size > 5_000, name


def test_the_pipeline_keeps_the_scorers_argmax(compared):
    out, result = compared
    pipeline = result["pipeline"]
    picked = ["sampler, one sample", "best of n by the scorer's log-likelihood", "best of n by the implicit reward"]
    ceiling = "any of the 3 samples (a perfect scorer)"
    assert set(pipeline) == {*picked, "sampler alone (greedy)", "scorer alone (greedy)", ceiling}
    assert all(pipeline[way][0] <= pipeline[ceiling][0] for way in picked)  # no scorer keeps what was not sampled
    assert pipeline["best of n by the implicit reward"] == pipeline["sampler, one sample"]  # all rewards 0: the first
    assert pipeline["sampler alone (greedy)"] == pipeline["scorer alone (greedy)"]
    assert all(v[3] == 6 for v in pipeline.values())
    assert "| best of n by the implicit reward |" in (out / "pipeline.md").read_text()


def test_models_without_a_chat_template_are_asked_in_plain_text(tmp_path):
    compare = example_module("compare_models.py")
    base = tmp_path / "base"
    shutil.copytree(TINY, base)
    (base / "chat_template.jinja").unlink()
    config = json.loads((base / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    tok = compare.mt.load_tokenizer(base)
    assert not tok.chat_template
    assert compare.ask(tok, "Where does Teo live?", "text") == "Question: Where does Teo live?\nAnswer:"
    context, ids = compare.said(tok, "Where?", "Stonebridge", "text")
    assert tok.decode(ids, skip_special_tokens=False) == " Stonebridge</s>"
    assert context == tok.encode("Question: Where?\nAnswer:")
    result = compare.main(["--models", TINY, str(base), "--pipeline", "none", "--limit", "3", "--resamples", "50",
                           "--device", "cpu", "--out", str(tmp_path / "out")])
    assert result["format"] == "text" and result["pipeline"] == {}
    # the same weights, asked the same way: the same numbers
    assert result["results"][TINY] == result["results"][str(base)]
    with pytest.raises(compare.UserError, match="base: its tokenizer has no chat template.*--prompt-format text"):
        compare.main(["--models", TINY, str(base), "--prompt-format", "chat", "--out", str(tmp_path / "chat")])


def test_the_pipeline_keeps_the_argmax_of_another_scorer(tmp_path):
    """A scorer other than the sampler (tiny-mistral with its weights perturbed): each kept answer is the
    candidate to which the scorer, asked independently here, gives the highest log-likelihood."""
    from safetensors.torch import load_file, save_file
    compare = example_module("compare_models.py")
    scorer = tmp_path / "scorer"
    shutil.copytree(TINY, scorer)
    weights = load_file(scorer / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in weights.items()},
              scorer / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    compare.main(["--models", TINY, "--pipeline", TINY, str(scorer), "--limit", "4", "--n", "3", "--resamples", "50",
                  "--device", "cpu", "--out", str(out)])
    tok, model = compare.mt.load_tokenizer(scorer), compare.mt.load_model(scorer).eval()
    rows = [json.loads(line) for line in (out / "pipeline.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        chat = [{"role": "user", "content": row["prompt"]}]
        scores = compare.E.loglik_scores(model, tok, chat, row["candidates"])
        assert scores == pytest.approx(row["best of n by the scorer's log-likelihood"], abs=1e-4)
        assert row["kept"]["best of n by the scorer's log-likelihood"] == \
            row["candidates"][max(range(3), key=scores.__getitem__)]


def test_compare_refuses_a_malformed_pipeline_and_a_model_named_twice():
    compare = example_module("compare_models.py")
    with pytest.raises(SystemExit):
        compare.parse_args(["--models", TINY, "--pipeline", TINY])
    with pytest.raises(SystemExit):
        compare.parse_args(["--models", TINY, TINY])


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("cv")
    cv = example_module("cross_validate.py")
    results = cv.main(["--subset", "12", "--k", "3", "--search", "lr=1e-3,3e-3", "--samples", "0",
                       "--max-steps", "2", "--batch-size", "4", "--exact-match-samples", "2", "--device", "cpu",
                       "--out", str(out)])
    return out, results


def test_the_search_trains_each_configuration_on_every_fold(searched):
    out, results = searched
    assert [r["config"] for r in sorted(results, key=lambda r: r["config"]["lr"])] == [{"lr": 1e-3}, {"lr": 3e-3}]
    losses = [r["mean"]["val_loss"] for r in results]
    assert losses == sorted(losses)  # val_loss: lower first
    for r in results:
        assert len(r["folds"]) == 3
        folder = out / "runs" / f"lr={r['config']['lr']}"
        val = [[json.loads(line) for line in (folder / f"fold{i}" / "val.jsonl").read_text().splitlines()]
               for i in range(3)]
        train = [[json.loads(line) for line in (folder / f"fold{i}" / "train.jsonl").read_text().splitlines()]
                 for i in range(3)]
        assert [len(v) for v in val] == [4, 4, 4] and all(len(t) == 8 for t in train)
        every = sorted(json.dumps(x) for v in val for x in v)
        assert len(set(every)) == 12  # the validation folds are disjoint and cover the subset
        for t, v in zip(train, val, strict=True):
            assert sorted(json.dumps(x) for x in t + v) == every
        metrics = [json.loads(line) for line in (folder / "fold0" / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["step"] == 2 and metrics[-1]["val_loss"] == r["folds"][0]["val_loss"]
        assert not (folder / "fold0" / "final").exists()  # the numbers are kept, not the models
    text = (out / "search.md").read_text()
    assert "3-fold cross-validation" in text and "| lr=0.001 |" in text and " ± " in text
    assert len(list(csv.DictReader((out / "search.csv").open()))) == 2


def test_the_search_names_the_flags_it_can_set():
    cv = example_module("cross_validate.py")
    with pytest.raises(SystemExit, match="2"):
        cv.parse_args(["--search", "bogus=1,2"])
    with pytest.raises(SystemExit):
        cv.parse_args(["--search", "lr"])
    args, extra = cv.parse_args(["--search", "warmup=0,5", "--epochs", "3"])
    assert args.space == {"warmup": [0, 5]} and "--warmup" not in extra and extra[-2:] == ["--epochs", "3"]


@pytest.mark.filterwarnings("ignore:decode. dropped ids")  # a random model may pick an embedding row no token uses
def test_llama_and_qwen3_models_compare_on_the_same_protocol(tmp_path):
    from tests.conftest import tiny_family_folder

    compare = example_module("compare_models.py")
    models = [str(tiny_family_folder(family, tmp_path / family)) for family in ("llama", "qwen3")]
    result = compare.main(["--models", *models, "--pipeline", "none", "--limit", "3", "--resamples", "50",
                           "--device", "cpu", "--out", str(tmp_path / "out")])
    assert result["format"] == "chat" and set(result["results"]) == set(models)
    assert all(0 <= v[0] <= 1 for m in models for k, v in result["results"][m].items() if "exact_match" in k)


def test_verdicts_come_from_the_paired_interval():
    verdict = example_module("compare_models.py").verdict
    assert verdict("A", "B", 0.01, 0.2) == "A ahead of B"
    assert verdict("A", "B", -0.3, -0.05) == "B ahead of A"
    assert verdict("A", "B", -0.1, 0.2) == "no difference shown"
    assert verdict("A", "B", 0.0, 0.2) == "no difference shown"  # an interval that touches 0 shows nothing
    assert verdict("A", "B", -5.0, -1.0, lower_is_better=True) == "A ahead of B"  # a perplexity fell
    assert verdict("A", "B", 1.0, 5.0, lower_is_better=True) == "B ahead of A"


def test_two_models_are_compared_item_by_item(tmp_path):
    """A model against its own copy: every paired difference is 0 with an interval of zero width, McNemar's test
    finds no disagreement (p = 1), no verdict; items.jsonl holds every score behind the table."""
    twin = tmp_path / "twin"
    shutil.copytree(TINY, twin)
    compare = example_module("compare_models.py")
    result = compare.main(["--models", TINY, str(twin), "--pipeline", "none", "--limit", "5", "--resamples", "100",
                           "--device", "cpu", "--out", str(tmp_path / "out")])
    rows = result["paired"]
    assert len(rows) == 7 and {(r["a"], r["b"]) for r in rows} == {(str(twin), TINY)}
    for row in rows:
        assert (row["difference"], row["low"], row["high"]) == (0.0, 0.0, 0.0), row
        assert row["verdict"] == "no difference shown"
    tests = {r["metric"]: r["mcnemar"] for r in rows}
    assert tests["instruction/exact_match"] == {"only_a": 0, "only_b": 0, "statistic": 0.0, "p_value": 1.0}
    assert tests["language/ppl"] is None  # not right or wrong: no McNemar
    ties = tests["preference/prefers_chosen"]  # a tie counts one half: right or wrong only without ties
    assert ties is None or ties["p_value"] == 1.0
    report = (tmp_path / "out" / "comparison.md").read_text()
    assert ("| twin − tiny-mistral | knowledge | acc | 0.000 [0.000, 0.000] | 1 (0 / 0) | no difference shown |"
            in report)
    items = [json.loads(line) for line in (tmp_path / "out" / "items.jsonl").read_text().splitlines()]
    for name in (TINY, str(twin)):
        for metric, (value, *_rest, n) in result["results"][name].items():
            mine = [i for i in items if i["model"] == name and i["metric"] == metric]
            assert len(mine) == n, metric
            if "weight" not in mine[0]:  # a mean; perplexity is exp(sum / sum) of the windows
                assert value == pytest.approx(sum(i["value"] for i in mine) / n), metric
    nll = [i for i in items if i["model"] == TINY and i["metric"] == "language/ppl"]
    assert result["results"][TINY]["language/ppl"][0] == pytest.approx(
        math.exp(sum(i["value"] for i in nll) / sum(i["weight"] for i in nll)))
    pytest.importorskip("matplotlib")
    assert (tmp_path / "out" / "comparison_paired.png").stat().st_size > 5_000


def test_a_pair_of_models_with_other_tokenizers_is_not_paired_on_the_texts_windows(tmp_path):
    """tiny-gpt2 and tiny-mistral cut the text into different windows: no paired perplexity, but every item-level
    metric is paired."""
    gpt2 = str(ROOT / "examples" / "assets" / "tiny-gpt2")
    compare = example_module("compare_models.py")
    result = compare.main(["--models", TINY, gpt2, "--pipeline", "none", "--limit", "3", "--resamples", "50",
                           "--prompt-format", "text", "--device", "cpu", "--out", str(tmp_path / "out")])
    by_metric = {r["metric"]: r for r in result["paired"]}
    for metric in ("language/ppl", "language/bits_per_byte"):
        assert by_metric[metric]["difference"] is None and by_metric[metric]["verdict"].startswith("not paired")
    assert by_metric["knowledge/acc"]["difference"] is not None
