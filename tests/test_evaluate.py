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
    opening = mt.evaluate.prompt_text(tok, chat)  # "...<|assistant|>\n": its newline goes with the answer (lm-eval)
    assert opening.endswith("\n") and context == tok.encode(opening.rstrip()) and context + ids == answered
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


# ---------------------------------------------------------------- lm-evaluation-harness's split, paired statistics


def test_encode_pair_moves_the_contexts_trailing_whitespace_into_the_continuation():
    """lm-evaluation-harness's rule on the bundled tokenizer (byte-level BPE: a space belongs to the next word's
    token). Cut after "Answer: " itself, "kettle kettle kettle" kept two of its three tokens and "19" none."""
    tok = mt.load_tokenizer(TINY)
    context = "Question: Where?\nAnswer: "
    ctx, cont = mt.evaluate.encode_pair(tok, context, "kettle kettle kettle")
    assert ctx == tok.encode("Question: Where?\nAnswer:") and [tok.decode([t]) for t in cont] == [" kettle"] * 3
    for context, continuation, expected in (("Answer: ", "19", [" 19"]), ("Answer:", " 19", [" 19"]),
                                            ("Answer:  ", "19", [" ", " 19"]), ("Answer:\n", "19", ["\n", "19"]),
                                            ("Answer:", "19", ["19"])):
        ctx, cont = mt.evaluate.encode_pair(tok, context, continuation)
        assert ctx == tok.encode("Answer:"), repr(context)
        assert [tok.decode([t]) for t in cont] == expected, (context, continuation)
        assert ctx + cont == tok.encode(context + continuation)


def test_encode_pair_on_the_real_gpt2_and_mistral_tokenizers(fixtures_dir):
    """Token ids pinned by hand: GPT-2 "Answer" 33706, ":" 25, " 19" 678, "19" 1129, " " 220, "\\n" 198; Mistral (BOS
    1) "▁Answer" 26307, ":" 28747, "▁" 28705, "1" 28740, "9" 28774, "▁▁" 259, "\\n" 13."""
    gpt2 = mt.load_tokenizer(fixtures_dir / "gpt2")
    mistral = mt.load_tokenizer(fixtures_dir / "mistral-7b-v0.1")
    cases = {  # (context, continuation): (GPT-2's split, Mistral's split)
        ("Answer: ", "19"): (([33706, 25], [678]), ([1, 26307, 28747], [28705, 28740, 28774])),
        ("Answer:", " 19"): (([33706, 25], [678]), ([1, 26307, 28747], [28705, 28740, 28774])),
        ("Answer:  ", "19"): (([33706, 25], [220, 678]), ([1, 26307, 28747], [259, 28740, 28774])),
        ("Answer:\n", "19"): (([33706, 25], [198, 1129]), ([1, 26307, 28747], [13, 28740, 28774])),
        ("Answer:", "19"): (([33706, 25], [1129]), ([1, 26307, 28747], [28740, 28774])),
    }
    for (context, continuation), (for_gpt2, for_mistral) in cases.items():
        assert mt.evaluate.encode_pair(gpt2, context, continuation) == for_gpt2, (context, continuation)
        assert mt.evaluate.encode_pair(mistral, context, continuation) == for_mistral, (context, continuation)


def test_real_hellaswag_and_arc_records_give_lm_evals_contexts_and_continuations(tmp_path, fixtures_dir):
    """HellaSwag's first validation record and an ARC-Easy record as the hub ships them: the context lm-eval builds
    (HellaSwag: "activity_label: ctx_a Ctx_b", cleaned; ARC: "Question: ...\\nAnswer:"), and each choice scored as
    " " + choice, its tokens those of the whole text."""
    import json
    hellaswag = {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
                 "ctx_b": "he",
                 "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": "3",
                 "source_id": "activitynet~v_-JhWjGDPHMY",
                 "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                             "is holding a rubik's cube.", "starts pulling up roofing on a roof."]}
    arc = {"id": "Mercury_7220990", "answerKey": "B",
           "question": "Which factor will most likely cause a person to develop a fever?",
           "choices": {"text": ["a leg muscle relaxing after exercise", "a bacterial population in the bloodstream",
                                "several viral particles on the skin", "carbohydrates being digested in the stomach"],
                       "label": ["A", "B", "C", "D"]}}
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps(hellaswag) + "\n" + json.dumps(arc) + "\n")
    h, a = mt.evaluate.read_multiple_choice(path)
    assert h["context"] == "Roof shingle removal: A man is sitting on a roof. He" and h["answer"] == 3
    assert h["choices"] == hellaswag["endings"]
    assert a["context"] == "Question: Which factor will most likely cause a person to develop a fever?\nAnswer:"
    assert a["choices"] == arc["choices"]["text"] and a["answer"] == 1
    gpt2 = mt.load_tokenizer(fixtures_dir / "gpt2")
    for record in (h, a):
        for choice in record["choices"]:
            ctx, cont = mt.evaluate.encode_pair(gpt2, record["context"], " " + choice)
            assert gpt2.decode(ctx) == record["context"] and gpt2.decode(cont) == " " + choice
            assert ctx + cont == gpt2.encode(record["context"] + " " + choice)
    ctx, cont = mt.evaluate.encode_pair(gpt2, h["context"], " " + h["choices"][3])
    assert [gpt2.decode([t]) for t in cont] == [" starts", " pulling", " up", " roof", "ing", " on", " a", " roof", "."]


def test_paired_bootstrap_by_hand():
    """Five items, A's and B's scores differing by (1, 0, 0, 1, 0): the difference is 0.4. Both bootstraps draw the
    same items (one seed); the paired interval is that of the per-item differences' mean, which an unpaired
    comparison of the two intervals cannot see: here every item B gets right A gets right too."""
    a, b = [1, 1, 0, 1, 0], [0, 1, 0, 0, 0]
    difference, low, high = mt.evaluate.paired_bootstrap_ci(a, b, seed=3)
    assert difference == pytest.approx(0.4)
    assert (difference, low, high) == pytest.approx(bootstrap_ci([1, 0, 0, 1, 0], seed=3))
    assert low >= 0  # no resample can make B ahead: A is never worse on an item
    # weights and a transform: two windows' summed NLL over their tokens, through exp (a perplexity)
    difference, low, high = mt.evaluate.paired_bootstrap_ci([4.0, 2.0], [2.0, 2.0], weights=[2, 2], transform=torch.exp)
    assert difference == pytest.approx(math.exp(6 / 4) - math.exp(4 / 4))
    # every resample draws (4, 4), (2, 2) or both windows: its difference lies between 0 and e^2 - e
    assert 0.0 <= low <= high <= math.exp(2.0) - math.exp(1.0)
    assert mt.evaluate.paired_bootstrap_ci([0.5] * 4, [0.5] * 4) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="pairing needs the same items"):
        mt.evaluate.paired_bootstrap_ci([1, 0], [1, 0, 1])


def test_mcnemar_against_hand_worked_values():
    # 180 disagreements, 121 of them won by A: chi-square (121 - 59)^2 / 180 = 3844 / 180 = 21.36
    test = mt.evaluate.mcnemar([1] * 121 + [0] * 59 + [1] * 40, [0] * 121 + [1] * 59 + [1] * 40)
    assert (test["only_a"], test["only_b"]) == (121, 59) and test["statistic"] == pytest.approx(21.3556, abs=1e-4)
    assert test["p_value"] < 1e-5
    # 10 disagreements, 2 won by A: p = 2 (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * 56 / 1024
    test = mt.evaluate.mcnemar([1, 1] + [0] * 8 + [1] * 5, [0, 0] + [1] * 8 + [1] * 5)
    assert test == {"only_a": 2, "only_b": 8, "statistic": 3.6, "p_value": 0.109375}
    assert mt.evaluate.mcnemar([1, 0, 1], [1, 0, 1]) == {"only_a": 0, "only_b": 0, "statistic": 0.0, "p_value": 1.0}
    assert mt.evaluate.mcnemar([1] * 5, [0] * 5)["p_value"] == 2 / 32  # the most extreme split of 5
    with pytest.raises(ValueError, match="0 or 1"):
        mt.evaluate.mcnemar([0.5], [1])
    assert mt.evaluate.is_right_or_wrong([0, 1.0], [1]) and not mt.evaluate.is_right_or_wrong([0.5], [1])
