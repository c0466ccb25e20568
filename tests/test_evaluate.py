"""minitune.evaluate for the model comparison: strided perplexity, multiple choice, bootstrap intervals, folds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import minitune as mt
from minitune.evaluate import (
    bootstrap_ci,
    choice_logprobs,
    cross_validate,
    grid,
    kfold_indices,
    mean_std,
    multiple_choice_scores,
    random_configs,
    search,
    strided_perplexity,
)
from minitune.losses import causal_lm_loss
from tests.conftest import save_hf, tiny_mistral_config

TINY = Path(__file__).resolve().parents[1] / "examples" / "assets" / "tiny-mistral"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m")
    save_hf(tiny_mistral_config(max_position_embeddings=64), folder)
    return mt.load_model(folder).eval()


def token_logprob(model, ids: torch.Tensor, begin: int, t: int) -> float:
    """log p(ids[t] | ids[begin:t]) from the full logits of that window alone."""
    logits = model(ids[begin:t].unsqueeze(0))[0, -1].float()
    return logits.log_softmax(-1)[ids[t]].item()


def test_perplexity_of_a_short_text_is_exp_of_the_mean_loss(model):
    ids = torch.randint(3, 101, (20,))
    result = strided_perplexity(model, ids, max_length=32, stride=32)
    loss = causal_lm_loss(model, ids.unsqueeze(0)).item()
    assert result["windows"] == 1 and result["tokens"] == 19
    assert result["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


@pytest.mark.parametrize("max_length,stride", [(8, 3), (8, 8), (10, 1), (7, 5)])
def test_the_strided_windows_score_each_token_with_the_protocols_context(model, max_length, stride):
    """Worked out token by token: windows start every `stride` tokens and span max_length; a token is scored by
    the first window that reaches it, with that window's tokens before it as context; a token at a window's
    first position (stride = max_length) is not scored."""
    n = 23
    ids = torch.randint(3, 101, (n,))
    starts, scored_to, total, count = [], 0, 0.0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        starts.append(begin)
        for t in range(max(scored_to, begin + 1), end):
            total += -token_logprob(model, ids, begin, t)
            count += 1
        scored_to = end
        if end == n:
            break
    # batches of 3: full ones, a partial one, and the last window shorter than the others in its batch
    result = strided_perplexity(model, ids, max_length, stride, batch_size=3)
    assert result["windows"] == len(starts) and result["tokens"] == count
    assert count == (n - len(starts) if stride == max_length else n - 1)
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)
    assert sum(result["window_tokens"]) == count and sum(result["window_nll"]) == pytest.approx(total, rel=1e-5)
    one_by_one = strided_perplexity(model, ids, max_length, stride, batch_size=1)
    assert one_by_one["window_tokens"] == result["window_tokens"]
    assert one_by_one["window_nll"] == pytest.approx(result["window_nll"], rel=1e-5)


def test_no_window_that_scores_nothing(model):
    # disjoint windows of 8 over 17 tokens: [0, 8) and [8, 16) score 7 each; [16, 17) would score none
    result = strided_perplexity(model, torch.randint(3, 101, (17,)), 8, 8)
    assert result["windows"] == 2 and result["window_tokens"] == [7, 7] and result["tokens"] == 14


def test_strided_perplexity_refuses_bad_windows(model):
    with pytest.raises(ValueError, match=r"stride=9 must be in \(0, max_length=8\]"):
        strided_perplexity(model, torch.arange(3, 20), 8, 9)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        strided_perplexity(model, torch.tensor([5]), 8, 4)


def test_multiple_choice_worked_by_hand():
    # log-likelihoods -3, -5, -4 for choices of 1, 6 and 2 characters: acc takes the first (-3); per character
    # they are -3, -0.83 and -2, so acc_norm takes the second
    choices = ["a", "bbbbbb", "cc"]
    assert multiple_choice_scores([-3.0, -5.0, -4.0], choices, answer=0) == {"acc": 1.0, "acc_norm": 0.0}
    assert multiple_choice_scores([-3.0, -5.0, -4.0], choices, answer=1) == {"acc": 0.0, "acc_norm": 1.0}


def test_choice_logprobs_equal_the_full_logits_computation():
    tok, model = mt.load_tokenizer(TINY), mt.load_model(TINY).eval()
    context, choices = "Where does Teo live? Answer:", [" Stonebridge", " Oakvale", " in the valley by the river"]
    got = choice_logprobs(model, tok, context, choices)
    prefix = tok.encode(context)
    for choice, value in zip(choices, got, strict=True):
        ids = torch.tensor(prefix + tok.encode(choice, add_special_tokens=False))
        want = sum(token_logprob(model, ids, 0, t) for t in range(len(prefix), len(ids)))
        assert value == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_whole_answers_score_their_end_token_too():
    tok, model = mt.load_tokenizer(TINY), mt.load_model(TINY).eval()
    context = "Where does Teo live?"
    with_eos = choice_logprobs(model, tok, context, [" Stonebridge"], end=[tok.eos_token_id])[0]
    ids = torch.tensor(tok.encode(context) + tok.encode(" Stonebridge", add_special_tokens=False) + [tok.eos_token_id])
    eos = token_logprob(model, ids, 0, len(ids) - 1)
    assert with_eos == pytest.approx(choice_logprobs(model, tok, context, [" Stonebridge"])[0] + eos, rel=1e-5)


def test_multiple_choice_in_batches_equals_one_question_at_a_time():
    tok, model = mt.load_tokenizer(TINY), mt.load_model(TINY).eval()
    questions = mt.evaluate.read_multiple_choice(TINY.parents[1] / "data" / "eval" / "multiple_choice" / "test.jsonl")
    questions = questions[:5] + questions[-5:]  # two-choice and many-choice questions in the same batches
    batched = mt.evaluate.multiple_choice(model, tok, questions, batch_size=7)
    for i, q in enumerate(questions):
        choices = [" " + c for c in q["choices"]]
        assert q["context"] == f"Question: {q['question']}\nAnswer:"
        one = multiple_choice_scores(choice_logprobs(model, tok, q["context"], choices), q["choices"], q["answer"])
        assert one == {"acc": batched["acc"][i], "acc_norm": batched["acc_norm"][i]}


def test_answer_tokens_are_the_templates_assistant_turn():
    tok = mt.load_tokenizer(TINY)
    chat = [{"role": "user", "content": "Where does Teo live?"}]
    context, ids = mt.evaluate.answer_tokens(tok, chat, "Stonebridge")
    answered = tok.encode(tok.apply_chat_template([*chat, {"role": "assistant", "content": "Stonebridge"}]))
    assert context == tok.encode(mt.evaluate.prompt_text(tok, chat)) and context + ids == answered
    assert ids[-2:] == [tok.eos_token_id, tok.encode("\n", add_special_tokens=False)[-1]]  # the turn's end
    context, ids = mt.evaluate.answer_tokens(tok, "Q: x\nA:", " Stonebridge")
    assert context + ids == tok.encode("Q: x\nA: Stonebridge") + [tok.eos_token_id]


def test_answer_tokens_are_cut_from_the_whole_text_on_a_real_tokenizer(fixtures_dir):
    # Mistral's tokenizer encodes "Paris" after "\n" differently from "Paris" alone (no word-start marker):
    # the answer's tokens must be those of the whole conversation, as training encodes it
    from minitune.tokenizer import ZEPHYR_CHAT_TEMPLATE
    from tests.conftest import with_template
    tok = with_template(mt.load_tokenizer(fixtures_dir / "mistral-7b-v0.1"), ZEPHYR_CHAT_TEMPLATE)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    context, ids = mt.evaluate.answer_tokens(tok, chat, "Paris")
    assert context + ids == tok.encode(tok.apply_chat_template([*chat, {"role": "assistant", "content": "Paris"}]))
    assert ids[-2] == tok.eos_token_id


def test_bootstrap_interval_covers_the_mean_and_narrows_with_confidence():
    values = [1.0] * 30 + [0.0] * 20
    mean, low, high = bootstrap_ci(values, confidence=0.95, seed=1)
    assert mean == 0.6 and low < mean < high
    assert 0.4 < low and high < 0.8  # about ±1.96 * sqrt(0.24 / 50) = ±0.136
    _, low90, high90 = bootstrap_ci(values, confidence=0.90, seed=1)
    assert low < low90 and high90 < high
    assert bootstrap_ci(values, seed=1) == bootstrap_ci(values, seed=1)  # seeded: repeatable
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_ci([])


def test_bootstrap_with_weights_is_an_interval_for_a_ratio():
    # per-window summed NLL over per-window tokens: the estimate is sum / sum, not the mean of the ratios
    nll, tokens = [10.0, 30.0, 4.0, 20.0], [5, 10, 4, 10]
    estimate, low, high = bootstrap_ci(nll, weights=tokens, seed=0)
    assert estimate == pytest.approx(64 / 29)
    assert 1.0 <= low < estimate < high <= 3.0  # every resample lies between the windows' extremes (1 and 3)
    assert bootstrap_ci([1.0, 2.0], weights=[1, 1]) == bootstrap_ci([1.0, 2.0])
    with pytest.raises(ValueError, match="2 positive numbers"):
        bootstrap_ci([1.0, 2.0], weights=[1, 0])


def test_mean_std_by_hand():
    assert mean_std([2.0, 4.0, 9.0]) == pytest.approx((5.0, math.sqrt((9 + 1 + 16) / 2)))
    assert mean_std([0.7]) == (0.7, 0.0)


def test_cross_validate_fits_each_fold_on_the_rest_and_summarises():
    items = list(range(10))
    seen = []

    def fit(train, val, fold):
        seen.append((fold, sorted(train), sorted(val)))
        return {"share": len(val) / 10, "first": float(min(val))}

    result = cross_validate(items, 3, fit, seed=5)
    assert [f for f, _, _ in seen] == [0, 1, 2]
    assert sorted(i for _, _, val in seen for i in val) == items  # every item validated on exactly once
    assert all(sorted(train + val) == items for _, train, val in seen)
    assert [(train, val) for _, train, val in seen] == kfold_indices(10, 3, seed=5)
    shares = [len(val) / 10 for _, _, val in seen]
    assert result["folds"][0]["share"] == shares[0]
    assert (result["mean"]["share"], result["std"]["share"]) == pytest.approx(mean_std(shares))


def test_grid_random_configs_and_search_rank_by_the_cross_validated_mean():
    space = {"lr": [1e-3, 3e-3], "lora_r": [4, 8, 16]}
    configs = grid(space)
    assert len(configs) == 6 and configs[0] == {"lr": 1e-3, "lora_r": 4} and configs[-1] == {"lr": 3e-3, "lora_r": 16}
    drawn = random_configs(space, 4, seed=1)
    assert len(drawn) == 4 and all(c in configs for c in drawn) and len({str(c) for c in drawn}) == 4
    assert random_configs(space, 10) == configs
    with pytest.raises(ValueError, match="'lr' has no values"):
        grid({"lr": []})

    def evaluate_config(config):  # a fake loss, lowest at lr 3e-3, rank 8
        return {"mean": {"loss": abs(config["lr"] - 3e-3) * 100 + abs(config["lora_r"] - 8)}, "std": {}, "folds": []}

    ranked = search(configs, evaluate_config, "loss", higher_is_better=False)
    assert ranked[0]["config"] == {"lr": 3e-3, "lora_r": 8}
    assert [r["mean"]["loss"] for r in ranked] == sorted(r["mean"]["loss"] for r in ranked)
    assert search(configs, evaluate_config, "loss")[0]["config"] == {"lr": 1e-3, "lora_r": 16}
    with pytest.raises(ValueError, match="metric 'acc' is not among"):
        search(configs, evaluate_config, "acc")
    diverged = {"lr": 1e-2, "lora_r": 8}  # a configuration whose loss is NaN ranks last, whichever the direction
    nan = search([diverged, *configs], lambda c: {"mean": {"loss": math.nan if c["lr"] == 1e-2 else 1.0}}, "loss")
    assert nan[-1]["config"] == diverged
    nan = search([diverged, *configs], lambda c: {"mean": {"loss": math.nan if c["lr"] == 1e-2 else 1.0}}, "loss",
                 higher_is_better=False)
    assert nan[-1]["config"] == diverged


@pytest.mark.parametrize("n,k", [(10, 5), (11, 3), (7, 7)])
def test_kfold_folds_are_disjoint_cover_the_data_and_balance(n, k):
    splits = kfold_indices(n, k, seed=3)
    assert len(splits) == k
    validation = [v for _, v in splits]
    assert sorted(i for fold in validation for i in fold) == list(range(n))  # disjoint and covering
    assert max(map(len, validation)) - min(map(len, validation)) <= 1
    for train, val in splits:
        assert sorted(train + val) == list(range(n)) and not set(train) & set(val)
    assert kfold_indices(n, k, seed=3) == splits and (k == n or kfold_indices(n, k, seed=4) != splits)
    with pytest.raises(ValueError, match="need 2 <= k <= n"):
        kfold_indices(3, 4)


def test_multiple_choice_files_in_the_bundled_hellaswag_and_arc_layouts(tmp_path):
    import json
    records = [
        {"question": "Which is bigger, 0 or 5?", "choices": ["5", "0"], "answer": 0},
        {"activity_label": "Sitting", "ctx_a": "A man sits down.", "ctx_b": "he", "ctx": "A man sits down. he",
         "endings": [" runs.", "reads a book [header] quietly. ", " sings.", "eats."], "label": "1"},
        {"question": "What is ice?", "choices": {"text": ["gas", "solid"], "label": ["A", "B"]}, "answerKey": "B"},
        {"question": {"stem": "Sun is a?", "choices": [{"text": "star", "label": "1"}, {"text": "moon", "label": "2"}]},
         "answerKey": "1"},
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert mt.evaluate.read_multiple_choice(path) == [
        {"question": "Which is bigger, 0 or 5?", "choices": ["5", "0"], "answer": 0,
         "context": "Question: Which is bigger, 0 or 5?\nAnswer:"},
        {"question": "Sitting: A man sits down. He", "answer": 1, "context": "Sitting: A man sits down. He",
         "choices": ["runs.", "reads a book quietly.", "sings.", "eats."]},
        {"question": "What is ice?", "choices": ["gas", "solid"], "answer": 1,
         "context": "Question: What is ice?\nAnswer:"},
        {"question": "Sun is a?", "choices": ["star", "moon"], "answer": 0, "context": "Question: Sun is a?\nAnswer:"},
    ]
    bundled = Path(__file__).resolve().parents[1] / "examples" / "data" / "eval" / "multiple_choice" / "test.jsonl"
    assert len(mt.evaluate.read_multiple_choice(bundled)) > 50
    for bad, match in (({"question": "q", "choices": ["a"], "answer": 3}, "answer 3 is not an index"),
                       ({"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "C"},
                        "answerKey 'C' is not one of the labels"),
                       ({"prompt": "q"}, "not a multiple-choice record"),
                       ({"ctx": "q", "endings": ["a"], "label": ""}, "no label")):
        path.write_text(json.dumps(records[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=f"{path}:2: .*{match}"):
            mt.evaluate.read_multiple_choice(path)


def test_best_of_n_keeps_the_argmax_of_the_scorer():
    tok, model = mt.load_tokenizer(TINY), mt.load_model(TINY).eval()
    prompt = [{"role": "user", "content": "Where does Teo live?"}]
    candidates = mt.evaluate.sample_candidates(model, tok, prompt, n=4, max_new_tokens=6, seed=0)
    assert len(candidates) == 4 and candidates == mt.evaluate.sample_candidates(model, tok, prompt, 4, 6, seed=0)
    candidates = [*candidates, "Stonebridge", ""]  # "": an answer that stops at once is scored by its EOS
    scores = mt.evaluate.loglik_scores(model, tok, prompt, candidates)
    best = mt.evaluate.best_of(candidates, scores)
    assert best == candidates[int(torch.tensor(scores).argmax())]
    # against itself every implicit reward is 0: the first candidate is kept
    rewards = mt.evaluate.implicit_reward_scores(model, model, tok, prompt, candidates)
    assert rewards == [0.0] * 6 and mt.evaluate.best_of(candidates, rewards) == candidates[0]
    assert mt.evaluate.best_of(["a", "b", "c"], [0.1, 0.7, 0.7]) == "b"
    with pytest.raises(ValueError, match="2 candidates and 1 scores"):
        mt.evaluate.best_of(["a", "b"], [1.0])
