"""The bundled data sets under examples/data/ and the scoring functions of minitune.evaluate.

The data sets are written by examples/data/make_data.py from a seed; these tests check that the committed
files are exactly what the script writes, that every record has its format, that no question leaks from a
training split into a validation or test split, that answers are right, and that every preference record is
won by the rule it names. Expectations are derived from the script and the files, never from record counts.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest

from minitune.evaluate import (
    RULES,
    contains_answer,
    exact_match,
    is_refusal,
    normalize_answer,
    preference_accuracy,
    rule_score,
    win_rate,
)
from tests.conftest import example_module

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
SPLITS = ("train", "validation", "test")
QUESTION_SETS = ("sft", "preference", "eval/multiple_choice", "eval/generation")
TEXT_SETS = ("source", "target")
COMMITTED = sorted(p.relative_to(DATA).as_posix() for p in DATA.rglob("*.jsonl"))


make_data = example_module("data/make_data.py")


# ---------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def rows(rel: str) -> tuple[tuple[int, dict], ...]:
    """(line number, record) for each line of a committed file; a bad line fails with file:line."""
    text = (DATA / rel).read_text(encoding="utf-8")
    assert text.endswith("\n"), f"{rel}: does not end with a newline"
    out = []
    for number, line in enumerate(text.split("\n")[:-1], start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            pytest.fail(f"{rel}:{number}: not JSON ({e}): {line[:200]!r}")
        assert isinstance(record, dict), f"{rel}:{number}: a {type(record).__name__}, not a JSON object"
        out.append((number, record))
    return tuple(out)


def records(rel: str) -> list[dict]:
    return [record for _, record in rows(rel)]


def fail_if_any(problems: list[str], what: str, limit: int = 20) -> None:
    """Fail listing the first `limit` problems (each already says file:line) when there are any."""
    if problems:
        shown = "\n  ".join(problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        pytest.fail(f"{len(problems)} {what}:\n  {shown}{more}")


def is_text(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def questions_of(set_name: str, record: dict) -> list[str]:
    """The texts a record asks (or, for source/target, holds): what must not cross from train to test."""
    if set_name in TEXT_SETS:
        return [record["text"]]
    if set_name == "sft":
        return [m["content"] for m in record["messages"] if m["role"] == "user"]
    if set_name == "preference":
        return [record["prompt"]]
    if set_name == "eval/multiple_choice":
        return [record["question"]]
    if set_name == "eval/generation":
        return [record["prompt"]]
    raise AssertionError(f"no questions known for set {set_name!r}")


def questions_in(set_name: str, split: str) -> list[str]:
    return [q for record in records(f"{set_name}/{split}.jsonl") for q in questions_of(set_name, record)]


def sft_pairs(record: dict) -> list[tuple[str, str]]:
    """(user question, assistant answer) for each turn of a chat."""
    turns = [m for m in record["messages"] if m["role"] != "system"]
    return [(u["content"], a["content"]) for u, a in zip(turns[::2], turns[1::2], strict=True)]


@functools.lru_cache(maxsize=None)
def generation_answers() -> dict[str, str]:
    """Every generation prompt of every split and its answer."""
    out: dict[str, str] = {}
    for split in SPLITS:
        for r in records(f"eval/generation/{split}.jsonl"):
            assert out.setdefault(r["prompt"], r["answer"]) == r["answer"], f"two answers to {r['prompt']!r}"
    return out


@functools.lru_cache(maxsize=None)
def world() -> dict[str, dict]:
    return {p["name"]: p for p in records("world.jsonl")}


def with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


REPEATS = {"twice": 2, "three times": 3}
QUESTION_FORMS = (  # (pattern, expected answer from the match): every question of the data sets has one form
    (r"Where does (\w+) live\?", lambda m: world()[m[1]]["town"]),
    (r"What is (\w+)'s job\?", lambda m: world()[m[1]]["job"]),
    (r"What pet does (\w+) keep\?", lambda m: with_article(world()[m[1]]["pet"])),
    (r"What is (\w+)'s favourite colour\?", lambda m: world()[m[1]]["colour"]),
    (r"What is (\d+) plus (\d+)\?", lambda m: str(int(m[1]) + int(m[2]))),
    (r"What is (\d+) minus (\d+)\?", lambda m: str(int(m[1]) - int(m[2]))),
    (r"Which is bigger, (\d+) or (\d+)\?", lambda m: str(max(int(m[1]), int(m[2])))),
    (r"Repeat the word (\w+) (twice|three times)\.", lambda m: " ".join([m[1]] * REPEATS[m[2]])),
)


def expected_answer(question: str) -> str:
    """The right answer, worked out from world.jsonl or by arithmetic; fails on a question of no known form."""
    for pattern, answer in QUESTION_FORMS:
        match = re.fullmatch(pattern, question)
        if match:
            try:
                return answer(match)
            except KeyError:
                raise AssertionError(f"{question!r} asks about {match[1]!r}, who is not in world.jsonl") from None
    raise AssertionError(f"{question!r} has no known form: add it to QUESTION_FORMS")


# ---------------------------------------------------------------- 1. the files are what make_data.py writes


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict]]:
    """The bundled files' records: build()'s defaults are the script's (SEED, STORIES, ...)."""
    return make_data.build()


def test_committed_files_are_exactly_the_built_files(built):
    """No stale file under examples/data/ and none missing: the committed *.jsonl are the ones build() makes."""
    assert COMMITTED, f"no *.jsonl under {DATA}"
    assert set(COMMITTED) == set(built), (f"stale: {sorted(set(COMMITTED) - set(built))}, "
                                          f"missing: {sorted(set(built) - set(COMMITTED))}")


def first_difference(rel: str, committed: bytes, built: bytes) -> str:
    """'file:line: committed ..., built ...' at the first line where two versions of a file differ."""
    old, new = committed.splitlines(), built.splitlines()
    line = next((i for i, (x, y) in enumerate(zip(old, new, strict=False)) if x != y), min(len(old), len(new)))
    shown = [lines[line][:120] if line < len(lines) else b"<end of file>" for lines in (old, new)]
    return f"{rel}:{line + 1}: committed {shown[0]!r}, built {shown[1]!r}"


def test_regeneration_is_byte_for_byte(built, tmp_path):
    """make_data.build() written by write_jsonl reproduces every committed file byte for byte."""
    differ = []
    for rel, recs in built.items():
        make_data.write_jsonl(tmp_path / rel, recs)
        ours, committed = (tmp_path / rel).read_bytes(), (DATA / rel).read_bytes() if (DATA / rel).exists() else b""
        if ours != committed:
            differ.append(first_difference(rel, committed, ours))
    fail_if_any(differ, "files differ from what `python examples/data/make_data.py` writes (rerun it)")


def test_build_is_deterministic_and_depends_on_the_seed(built):
    """The same seed builds the same records; another seed builds different ones in every file."""
    assert make_data.build() == built
    other = make_data.build(seed=make_data.SEED + 1)
    assert set(other) == set(built)
    assert [rel for rel in built if other[rel] == built[rel]] == []


# ---------------------------------------------------------------- 2. formats


def text_problems(r: dict) -> list[str]:
    if set(r) != {"text"}:
        return [f"keys {sorted(r)}, want ['text']"]
    return [] if is_text(r["text"]) else ["text is not a non-empty string"]


def sft_problems(r: dict) -> list[str]:
    if set(r) != {"messages"}:
        return [f"keys {sorted(r)}, want ['messages']"]
    messages = r["messages"]
    if not isinstance(messages, list) or not messages:
        return ["messages is not a non-empty list"]
    problems = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            problems.append(f"message {i} is not an object with exactly role and content: {m!r}")
        elif m["role"] not in ("system", "user", "assistant") or not is_text(m["content"]):
            problems.append(f"message {i}: bad role or empty content: {m!r}")
    if problems:
        return problems
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    want = ["user", "assistant"] * (len(turns) // 2)
    if not turns or turns != want or len(turns) % 2:
        problems.append(f"roles {roles}: want an optional first system, then user/assistant pairs")
    return problems


def preference_problems(r: dict) -> list[str]:
    if set(r) != {"prompt", "chosen", "rejected", "check"}:
        return [f"keys {sorted(r)}, want ['check', 'chosen', 'prompt', 'rejected']"]
    problems = [f"{k} is not a non-empty string" for k in ("prompt", "chosen", "rejected") if not is_text(r[k])]
    check = r["check"]
    want_keys = {"correct": {"rule", "answer"}, "concise": {"rule", "answer", "max_words", "wrong"}, "safe": {"rule"}}
    assert set(want_keys) == set(RULES), "this test knows other rules than minitune.evaluate.RULES"
    if not isinstance(check, dict) or check.get("rule") not in RULES:
        problems.append(f"check {check!r} has no rule of {RULES}")
    elif set(check) != want_keys[check["rule"]]:
        problems.append(f"check {check!r}: want keys {sorted(want_keys[check['rule']])}")
    elif "answer" in check and not is_text(check["answer"]):
        problems.append(f"check {check!r}: answer is not a non-empty string")
    elif "max_words" in check and not (type(check["max_words"]) is int and check["max_words"] > 0):
        problems.append(f"check {check!r}: max_words is not a positive int")
    elif "wrong" in check and not (isinstance(check["wrong"], list) and all(map(is_text, check["wrong"]))):
        problems.append(f"check {check!r}: wrong is not a list of non-empty strings")
    return problems


def multiple_choice_problems(r: dict) -> list[str]:
    if set(r) != {"question", "choices", "answer"}:
        return [f"keys {sorted(r)}, want ['answer', 'choices', 'question']"]
    choices = r["choices"]
    problems = [] if is_text(r["question"]) else ["question is not a non-empty string"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(is_text(c) for c in choices):
        return [*problems, f"choices {choices!r}: want a list of at least two non-empty strings"]
    if len({normalize_answer(c) for c in choices}) != len(choices):
        problems.append(f"choices {choices!r} are not distinct (as exact_match compares them)")
    if type(r["answer"]) is not int or not 0 <= r["answer"] < len(choices):
        problems.append(f"answer {r['answer']!r} is not an index into {len(choices)} choices")
    return problems


def generation_problems(r: dict) -> list[str]:
    if set(r) != {"prompt", "answer"}:
        return [f"keys {sorted(r)}, want ['answer', 'prompt']"]
    return [f"{k} is not a non-empty string" for k in ("prompt", "answer") if not is_text(r[k])]


def world_problems(r: dict) -> list[str]:
    if set(r) != {"name", "she", "town", "job", "pet", "colour"}:
        return [f"keys {sorted(r)}, want ['colour', 'job', 'name', 'pet', 'she', 'town']"]
    problems = [f"{k} is not a non-empty string" for k in ("name", "town", "job", "pet", "colour") if not is_text(r[k])]
    return problems + ([] if isinstance(r["she"], bool) else ["she is not a bool"])


FORMATS = {"source": text_problems, "target": text_problems, "sft": sft_problems, "preference": preference_problems,
           "eval/multiple_choice": multiple_choice_problems, "eval/generation": generation_problems}


def format_of(rel: str):
    if rel == "world.jsonl":
        return world_problems
    set_name, _, file = rel.rpartition("/")
    assert set_name in FORMATS and file in {f"{s}.jsonl" for s in SPLITS}, f"{rel}: a file of no known data set"
    return FORMATS[set_name]


@pytest.mark.parametrize("rel", COMMITTED)
def test_every_record_has_its_format(rel):
    """Each line of each file is a JSON object with exactly the keys and types of its set's format."""
    check = format_of(rel)
    assert rows(rel), f"{rel} is empty"
    fail_if_any([f"{rel}:{n}: {p}" for n, r in rows(rel) for p in check(r)], f"records of the wrong format in {rel}")


def test_every_set_has_three_splits():
    """Each data set has exactly train/validation/test, and world.jsonl is there."""
    for set_name in FORMATS:
        assert {rel for rel in COMMITTED if rel.rpartition("/")[0] == set_name} == {
            f"{set_name}/{s}.jsonl" for s in SPLITS}, set_name
    assert "world.jsonl" in COMMITTED


def test_world_names_are_unique():
    """world.jsonl is the answer key: one record per name."""
    names = [r["name"] for r in records("world.jsonl")]
    assert len(names) == len(set(names)), sorted(n for n in set(names) if names.count(n) > 1)


# ---------------------------------------------------------------- 3. splits are disjoint


def overlaps(named: dict[str, set[str]]) -> list[str]:
    """'a & b: example' for each pair of named sets of texts that share a text."""
    keys, out = list(named), []
    for i, x in enumerate(keys):
        for y in keys[i + 1:]:
            common = named[x] & named[y]
            if common:
                out.append(f"{x} & {y} share {len(common)}, e.g. {sorted(common)[0]!r}")
    return out


@pytest.mark.parametrize("set_name", TEXT_SETS + QUESTION_SETS)
def test_splits_of_a_set_share_no_text(set_name):
    """Within a set, train/validation/test share no text (documents, or the questions asked)."""
    fail_if_any(overlaps({s: set(questions_in(set_name, s)) for s in SPLITS}), f"overlaps between {set_name} splits")


def test_no_question_crosses_from_train_to_held_out_in_any_set():
    """No question of any validation or test split (sft, preference, eval) is asked in any train split of any set,
    and validation and test share none either."""
    by_split = {s: {q for set_name in QUESTION_SETS for q in questions_in(set_name, s)} for s in SPLITS}
    fail_if_any(overlaps(by_split), "questions shared between splits across the sets")


def test_source_and_target_share_no_text():
    """The source (valley) and target (kitchen) corpora are disjoint."""
    source = {q for s in SPLITS for q in questions_in("source", s)}
    target = {q for s in SPLITS for q in questions_in("target", s)}
    assert source & target == set()


@pytest.mark.parametrize("rel", [f"{n}/{s}.jsonl" for n in TEXT_SETS for s in SPLITS])
def test_no_duplicate_documents(rel):
    """A corpus split holds each document once."""
    first: dict[str, int] = {}
    dups = [f"{rel}:{n}: same text as line {first[r['text']]}"
            for n, r in rows(rel) if first.setdefault(r["text"], n) != n]
    fail_if_any(dups, f"duplicate documents in {rel}")


@pytest.mark.parametrize("rel", [f"{n}/{s}.jsonl" for n in QUESTION_SETS if n != "sft" for s in SPLITS])
def test_each_question_once_in_eval_and_preference(rel):
    """Evaluation and preference splits ask each question once, so scores weigh each question alike."""
    set_name = rel.rpartition("/")[0]
    first: dict[str, int] = {}
    dups = [f"{rel}:{n}: same question as line {first[q]}"
            for n, r in rows(rel) for q in questions_of(set_name, r) if first.setdefault(q, n) != n]
    fail_if_any(dups, f"repeated questions in {rel}")


def test_question_book_asks_only_training_questions():
    """The pre-training text's question book holds training-split questions with their right answers only,
    and no validation or test question appears anywhere in the source text."""
    train = {r["prompt"]: r["answer"] for r in records("eval/generation/train.jsonl")}
    held_out = [r["prompt"] for split in SPLITS[1:] for r in records(f"eval/generation/{split}.jsonl")]
    bad, pages = [], 0
    for split in SPLITS:
        rel = f"source/{split}.jsonl"
        for n, r in rows(rel):
            if r["text"].startswith("Questions from the school book:"):
                pages += 1
                for pair in r["text"].split("\n\n")[1:]:
                    question, answer = pair.split("\n")
                    if train.get(question) != answer:
                        bad.append(f"{rel}:{n}: {question!r} -> {answer!r} is not a training question with its answer")
            bad += [f"{rel}:{n}: held-out question {q!r}" for q in held_out if q in r["text"]]
    assert pages, "no question book pages in the source text"
    fail_if_any(bad, "questions in the source text that should not be there")


def test_no_sum_crosses_from_train_to_held_out_in_either_order():
    """'What is a plus b?' is the same fact as 'What is b plus a?': a held-out sum is not trained in either order."""
    def sums(split: str) -> set[frozenset[int]]:
        found = (re.fullmatch(r"What is (\d+) plus (\d+)\?", q) for q in questions_in("eval/generation", split))
        return {frozenset((int(m[1]), int(m[2]))) for m in found if m}

    fail_if_any(overlaps({s: sums(s) for s in SPLITS}), "sums asked in two splits (in some order)")


# ---------------------------------------------------------------- 4. the preference rule


@pytest.mark.parametrize("split", SPLITS)
def test_chosen_wins_by_its_rule(split):
    """rule_score(check, chosen) is 1 and rule_score(check, rejected) is 0 for every preference record."""
    rel = f"preference/{split}.jsonl"
    bad = [f"{rel}:{n}: chosen scores {rule_score(r['check'], r['chosen'])}, rejected "
           f"{rule_score(r['check'], r['rejected'])} by {r['check']}"
           for n, r in rows(rel)
           if (rule_score(r["check"], r["chosen"]), rule_score(r["check"], r["rejected"])) != (1.0, 0.0)]
    fail_if_any(bad, f"records in {rel} not won by their rule")


@pytest.mark.parametrize("split", SPLITS)
def test_every_rule_occurs_in_every_split(split):
    """Each split of preference/ exercises every rule of minitune.evaluate.RULES."""
    assert {r["check"]["rule"] for r in records(f"preference/{split}.jsonl")} == set(RULES)


# ---------------------------------------------------------------- 5. answers are consistent and right


@pytest.mark.parametrize("split", SPLITS)
def test_multiple_choice_answer_is_the_generation_answer(split):
    """MC and generation ask the same questions in a split, and choices[answer] is the generation answer."""
    gen = {r["prompt"]: r["answer"] for r in records(f"eval/generation/{split}.jsonl")}
    rel = f"eval/multiple_choice/{split}.jsonl"
    assert {r["question"] for r in records(rel)} == set(gen), f"{rel} and eval/generation ask different questions"
    bad = [f"{rel}:{n}: choices[answer] = {r['choices'][r['answer']]!r}, generation answer {gen[r['question']]!r}"
           for n, r in rows(rel) if r["choices"][r["answer"]] != gen[r["question"]]]
    fail_if_any(bad, "MC answers that are not the generation answer")


@pytest.mark.parametrize("split", SPLITS)
def test_sft_answers_are_the_generation_answers(split):
    """Each SFT assistant answer equals the generation answer to its question (where generation asks it)."""
    gen, rel = generation_answers(), f"sft/{split}.jsonl"
    pairs = [(n, q, a) for n, r in rows(rel) for q, a in sft_pairs(r) if q in gen]
    assert pairs, f"no question of {rel} is asked in eval/generation: nothing to compare"
    bad = [f"{rel}:{n}: {q!r} answered {a!r}, generation says {gen[q]!r}" for n, q, a in pairs if a != gen[q]]
    fail_if_any(bad, "SFT answers that differ from the generation answers")


@pytest.mark.parametrize("split", SPLITS)
def test_preference_answers_are_the_generation_answers(split):
    """A question's chosen answer and its check's answer are the generation answer; refusals answer no question."""
    gen, rel = generation_answers(), f"preference/{split}.jsonl"
    bad = []
    for n, r in rows(rel):
        if r["check"]["rule"] == "safe":
            if r["prompt"] in gen:
                bad.append(f"{rel}:{n}: a refusal is chosen for the question {r['prompt']!r}")
        elif not r["chosen"] == r["check"]["answer"] == gen.get(r["prompt"]):
            bad.append(f"{rel}:{n}: chosen {r['chosen']!r}, check {r['check']['answer']!r}, "
                       f"generation {gen.get(r['prompt'])!r}")
    fail_if_any(bad, "preference answers that differ from the generation answers")


def test_answers_are_right():
    """Every answer in eval, sft and preference is right: facts agree with world.jsonl, sums are sums, etc."""
    bad = []

    def check(where: str, question: str, answer: str) -> None:
        try:
            want = expected_answer(question)
        except AssertionError as e:
            bad.append(f"{where}: {e}")
            return
        if answer != want:
            bad.append(f"{where}: {question!r} answered {answer!r}, want {want!r}")

    for split in SPLITS:
        for name in ("eval/generation", "eval/multiple_choice", "sft", "preference"):
            rel = f"{name}/{split}.jsonl"
            for n, r in rows(rel):
                if name == "eval/generation":
                    check(f"{rel}:{n}", r["prompt"], r["answer"])
                elif name == "eval/multiple_choice":
                    check(f"{rel}:{n}", r["question"], r["choices"][r["answer"]])
                elif name == "sft":
                    for q, a in sft_pairs(r):
                        check(f"{rel}:{n}", q, a)
                elif r["check"]["rule"] != "safe":
                    check(f"{rel}:{n}", r["prompt"], r["chosen"])
    fail_if_any(bad, "wrong answers")


def test_every_fact_of_the_world_is_asked():
    """Each person's town, job, pet and colour is asked in some split."""
    forms = [pattern for pattern, _ in QUESTION_FORMS[:4]]  # the four questions about a person
    asked = {(form, m[1]) for q in generation_answers() for form in forms if (m := re.fullmatch(form, q))}
    missing = [f"{name}: {form}" for name in world() for form in forms if (form, name) not in asked]
    fail_if_any(missing, "facts never asked")


def test_every_fact_is_stated_in_the_training_source():
    """Each person's four facts are stated in source/train in a sentence that names the person: a profile
    wording, or a story's or town page's (a pronoun wording such as "She works as a baker." could belong to
    anyone in the document)."""
    class AllWordings:  # stands in for the rng: `choice` returns every wording offered
        @staticmethod
        def choice(options):
            return tuple(options)

    texts = [r["text"] for r in records("source/train.jsonl")]
    missing = []
    for p in records("world.jsonl"):
        job, pet = make_data.article(p["job"]), make_data.article(p["pet"])
        in_stories = (f"{p['name']} is {job} and keeps {pet}", f"lives {p['name']}, {job} with {pet}")
        profile_wordings = make_data.fact_sentences(make_data.Person(**p), AllWordings())
        for fact, wordings in zip(("town", "job", "pet", "colour"), profile_wordings, strict=True):
            named = [w.rstrip(".") for w in wordings if p["name"] in w]  # "X is a baker" also in "... and keeps"
            named += in_stories if fact in ("job", "pet") else ()
            if not any(w in t for t in texts for w in named):
                missing.append(f"{p['name']}'s {fact}: none of {named}")
    fail_if_any(missing, "facts never stated in source/train.jsonl")


# ---------------------------------------------------------------- 6. minitune.evaluate


@pytest.mark.parametrize("text, want", [
    ("Oakvale", "oakvale"), ("  Oakvale.  ", "oakvale"), ("A   cat.", "a cat"), ("a cat .", "a cat"),
    ("Oakvale...", "oakvale"), ("\tTwo\nwords\n", "two words"), ("", ""), ("3.5", "3.5"), ("Oakvale!", "oakvale!"),
])
def test_normalize_answer(text, want):
    """Lower case, single spaces, no surrounding whitespace or trailing full stops; other punctuation stays."""
    assert normalize_answer(text) == want


@pytest.mark.parametrize("prediction, answer, want", [
    ("Oakvale", "oakvale", True), (" OAKVALE. ", "Oakvale", True), ("a  cat", "a cat", True),
    ("Oak vale", "Oakvale", False), ("112", "12", False), ("a cat", "cat", False), ("Riverton", "Oakvale", False),
])
def test_exact_match(prediction, answer, want):
    """Exact up to case, spacing and a final full stop; nothing looser."""
    assert exact_match(prediction, answer) is want


@pytest.mark.parametrize("prediction, answer, want", [
    ("It is 12.", "12", True), ("112", "12", False), ("12a", "12", False), ("She lives in Oakvale!", "oakvale", True),
    ("She keeps a cat, I think.", "a cat", True), ("She keeps a black cat.", "a cat", False),
    ("cat a", "a cat", False), ("", "12", False), ("12", "", False), ("baker baker baker", "baker baker", True),
])
def test_contains_answer_whole_words(prediction, answer, want):
    """The answer's words appear as a run of whole words: '12' is not in '112', multi-word answers in order."""
    assert contains_answer(prediction, answer) is want


@pytest.mark.parametrize("prediction, want", [
    ("I will not help with that.", True), ("I won't help with that, it would hurt people.", True),
    ("  i CANNOT help with that", True), ("Sorry, I can't do that.", True), ("I\u2019m not able to help.", True),
    ("I won't help", True), ("Oakvale", False), ("Sure, I will not forget to tell you: go at night.", False),
    ("", False), ("I can't wait to tell you: go at night.", False), ("I will not hesitate: bring a sack.", False),
    ("I cannotice", False), ("I will not helpfully refuse", False), ("I'm sorry, but I can't help with that.", True),
])
def test_is_refusal(prediction, want):
    """A refusal opens (after normalising) with a whole refusal phrase that names what is refused."""
    assert is_refusal(prediction) is want


@pytest.mark.parametrize("check, prediction, want", [
    ({"rule": "correct", "answer": "Oakvale"}, "oakvale.", 1.0),
    ({"rule": "correct", "answer": "Oakvale"}, "It is Oakvale.", 0.0),
    ({"rule": "concise", "answer": "a cat", "max_words": 4}, "She keeps a cat.", 1.0),
    ({"rule": "concise", "answer": "a cat", "max_words": 3}, "She keeps a cat.", 0.0),
    ({"rule": "concise", "answer": "a cat", "max_words": 4}, "She keeps a dog.", 0.0),
    ({"rule": "concise", "answer": "a cat", "max_words": 4, "wrong": ["a dog"]}, "a dog a cat", 0.0),  # hedging
    ({"rule": "concise", "answer": "a cat", "max_words": 4, "wrong": ["a dog"]}, "A cat.", 1.0),
    ({"rule": "safe"}, "I cannot help with that.", 1.0),
    ({"rule": "safe"}, "Go there at night.", 0.0),
])
def test_rule_score(check, prediction, want):
    """Each rule scores 1.0 when its condition holds and 0.0 otherwise."""
    assert rule_score(check, prediction) == want


@pytest.mark.parametrize("check", [{"rule": "kindest"}, {"answer": "Oakvale"}])
def test_rule_score_unknown_rule_raises(check):
    """An unknown (or missing) rule is an error that names the rule, not a silent score."""
    with pytest.raises(ValueError, match=re.escape(repr(check.get("rule")))):
        rule_score(check, "Oakvale")


@pytest.mark.parametrize("check, match", [
    ({"rule": "correct"}, "'answer' as a non-empty string"),
    ({"rule": "concise", "answer": "a cat", "max_words": "4"}, "max_words"),
    ({"rule": "concise", "answer": "a cat", "max_words": True}, "max_words"),
    ({"rule": "concise", "answer": "a cat", "max_words": 4, "wrong": "a dog"}, "'wrong' must be a list"),
    ({"rule": "concise", "answer": "a cat", "max_words": 4, "wrong": [3]}, "'wrong' must be a list"),
    ({"rule": "correct", "answer": ""}, "'answer' as a non-empty string"),
    (["rule", "safe"], "a list, expected a JSON object"),
])
def test_rule_score_malformed_check_raises(check, match):
    """A check with a missing or mistyped key is a ValueError that names the check and the key."""
    with pytest.raises(ValueError, match=re.escape(match)):
        rule_score(check, "a cat")


def test_win_rate():
    """Wins count 1, ties one half, losses 0, over the number of prompts; any iterables of scores."""
    assert win_rate([1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]) == pytest.approx(0.5)
    assert win_rate([1.0, 1.0], [0.0, 1.0]) == pytest.approx(0.75)
    assert win_rate([0.0], [1.0]) == 0.0
    assert win_rate(iter([1.0, 0.5]), (s for s in [0.0, 0.5])) == pytest.approx(0.75)


def test_preference_accuracy_counts_a_tie_as_one_half():
    assert preference_accuracy([0.3, -0.1, 0.0, 2.0], [0.1, 0.2, 0.0, 1.0]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert preference_accuracy([0.0] * 5, [0.0] * 5) == 0.5  # a policy equal to its reference


@pytest.mark.parametrize("policy, reference", [([], []), ([1.0], [0.0, 1.0]), ([1.0, 0.0], [0.0])])
def test_win_rate_rejects_empty_and_mismatched(policy, reference):
    """No pairs, or a different number of scores on each side, is an error rather than a number."""
    with pytest.raises(ValueError):
        win_rate(policy, reference)
