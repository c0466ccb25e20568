"""minitune.data preference encoding: formats, the Anthropic HH split, masking, limits, errors and collate.

Expectations are written by hand (token ids of the bundled tiny Mistral tokenizer, the texts the answers
must decode to) or computed on an independent path: tok.encode of the prompt alone, as generation sees it,
and transformers' apply_chat_template on the real Mistral tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minitune.data import (
    collate_preferences,
    encode_preference,
    encode_preferences,
    load_preferences,
    preference_parts,
    read_jsonl,
    split_shared_prefix,
)
from minitune.losses import IGNORE_INDEX
from minitune.tokenizer import ZEPHYR_CHAT_TEMPLATE, load_tokenizer
from tests.conftest import with_template

ROOT = Path(__file__).resolve().parents[1]
TINY_MISTRAL = ROOT / "examples" / "assets" / "tiny-mistral"
TINY_GPT2 = ROOT / "examples" / "assets" / "tiny-gpt2"
PREFERENCE_DATA = ROOT / "examples" / "data" / "preference"
X = IGNORE_INDEX

# tiny-mistral ids, as test_data.py has them
USER = [30, 94, 290, 266, 94, 32, 201, 449, 271, 340, 407, 419, 33, 2, 201]  # "<|user|>\nWhat is 2 plus 7?</s>\n"
HEADER = [30, 94, 327, 85, 262, 86, 326, 86, 94, 32, 201]  # "<|assistant|>\n"
QUESTION = [449, 271, 340, 407, 419, 33]  # "What is 2 plus 7?"

TEXT = {"prompt": "What is 2 plus 7?", "chosen": " 9", "rejected": " 10", "check": {"rule": "correct"}}
ASK = [{"role": "user", "content": "What is 2 plus 7?"}]
CONVERSATION = {"prompt": ASK, "chosen": [{"role": "assistant", "content": "9"}],
                "rejected": [{"role": "assistant", "content": "Oakvale"}]}
HISTORY = [{"role": "system", "content": "Be brief."}, *ASK, {"role": "assistant", "content": "9"},
           {"role": "user", "content": "Where does Teo live?"}]


@pytest.fixture(scope="module")
def mistral():
    return load_tokenizer(TINY_MISTRAL)


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer(TINY_GPT2)


def write(tmp_path: Path, name: str, records: list) -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def supervised(example) -> list[int]:
    return [label for label in example["labels"] if label != X]


def prompt_ids(example) -> list[int]:
    """The leading run of -100 labels: the prompt's tokens."""
    n = next(t for t, label in enumerate(example["labels"]) if label != X)
    return example["input_ids"][:n]


# ---------------------------------------------------------------- text


def test_text_pair_by_hand(mistral):
    pair = encode_preference(TEXT, mistral, 64)
    assert set(pair) == {"chosen", "rejected"}
    assert pair["chosen"] == {"input_ids": [1, *QUESTION, 450, 2], "labels": [X] * 7 + [450, 2]}  # " 9" = 450
    for side in ("chosen", "rejected"):
        answer = mistral.encode(TEXT[side], add_special_tokens=False) + [mistral.eos_token_id]
        assert pair[side]["input_ids"] == mistral.encode(TEXT["prompt"]) + answer
        assert pair[side]["labels"] == [X] * 7 + answer
        assert pair[side]["input_ids"].count(mistral.bos_token_id) == 1


def test_text_pair_gpt2_has_no_bos(gpt2):
    pair = encode_preference(TEXT, gpt2, 64)
    prompt = gpt2.encode(TEXT["prompt"])
    assert prompt == [447, 269, 338, 405, 417, 31]
    assert pair["rejected"]["input_ids"] == [*prompt, *gpt2.encode(" 10", add_special_tokens=False), gpt2.eos_token_id]
    assert prompt_ids(pair["chosen"]) == prompt_ids(pair["rejected"]) == prompt


def test_text_answer_may_be_empty(mistral):
    """An empty answer still has a target: EOS, i.e. "say nothing"."""
    pair = encode_preference({"prompt": "What is 2 plus 7?", "chosen": "", "rejected": " 9"}, mistral, 64)
    assert pair["chosen"] == {"input_ids": [1, *QUESTION, 2], "labels": [X] * 7 + [2]}


# ---------------------------------------------------------------- conversational


def test_conversational_by_hand(mistral):
    pair = encode_preference(CONVERSATION, mistral, 64)
    # "<s><|user|>\nWhat is 2 plus 7?</s>\n<|assistant|>\n" then "9</s>\n" or "Oakvale</s>\n"; no EOS added
    assert pair["chosen"]["input_ids"] == [1, *USER, *HEADER, 27, 2, 201]
    assert pair["chosen"]["labels"] == [X] * 27 + [27, 2, 201]
    assert pair["rejected"]["input_ids"] == [1, *USER, *HEADER, 873, 2, 201]
    assert pair["rejected"]["labels"] == [X] * 27 + [873, 2, 201]


@pytest.mark.parametrize("template", [ZEPHYR_CHAT_TEMPLATE, "{{ bos_token }}" + ZEPHYR_CHAT_TEMPLATE],
                         ids=["zephyr", "zephyr-writing-bos"])
def test_conversational_one_bos_and_the_prompt_generation_sees(mistral, template):
    tok = with_template(mistral, template)
    record = {"prompt": HISTORY, "chosen": [{"role": "assistant", "content": "Stonebridge"}],
              "rejected": [{"role": "assistant", "content": "I am not sure, Oakvale maybe."}]}
    pair = encode_preference(record, tok, 256)
    generation = tok.encode(tok.apply_chat_template(HISTORY, add_generation_prompt=True))
    assert generation[0] == 1 and generation.count(1) == 1
    for side in ("chosen", "rejected"):
        example = pair[side]
        assert example["input_ids"][0] == tok.bos_token_id and example["input_ids"].count(tok.bos_token_id) == 1
        assert prompt_ids(example) == generation
        content = record[side][0]["content"]
        assert tok.decode(supervised(example), skip_special_tokens=False) == content + "</s>\n"
        assert example["labels"] == [X] * len(generation) + example["input_ids"][len(generation):]
    # the template's "<s>" text is the one BOS: the encoding is the same as without it
    assert pair == encode_preference(record, mistral, 256)


def test_conversational_on_real_mistral_matches_transformers(fixtures_dir):
    """Odd whitespace and non-ASCII text on Mistral-7B's tokenizer with the Zephyr template; transformers
    renders and tokenizes each side (without the BOS, which this template does not write)."""
    transformers = pytest.importorskip("transformers")
    folder = fixtures_dir / "mistral-7b-v0.1"
    tok = with_template(load_tokenizer(folder), ZEPHYR_CHAT_TEMPLATE)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    prompt = [{"role": "system", "content": "  Be   brief.\n"},
              {"role": "user", "content": "Capital of France? émojis 🤗"},
              {"role": "assistant", "content": "Ask me.\n"},
              {"role": "user", "content": "Fine: capital of France?"}]
    record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Paris ünï 😀  \n"}],
              "rejected": [{"role": "assistant", "content": "Lyon\n\n"}]}
    pair = encode_preference(record, tok, 512)
    generation = tok.encode(tok.apply_chat_template(prompt, add_generation_prompt=True))
    for side in ("chosen", "rejected"):
        example = pair[side]
        theirs = hf.apply_chat_template(prompt + record[side], chat_template=ZEPHYR_CHAT_TEMPLATE, tokenize=True,
                                        return_dict=True)["input_ids"]
        assert example["input_ids"] == [tok.bos_token_id, *theirs]
        assert example["input_ids"].count(tok.bos_token_id) == 1
        assert prompt_ids(example) == generation
        assert tok.decode(supervised(example), skip_special_tokens=False) == record[side][0]["content"] + "</s>\n"


def test_implicit_prompt_equals_the_explicit_one(mistral):
    chosen = [*HISTORY, {"role": "assistant", "content": "Stonebridge"}]
    rejected = [*HISTORY, {"role": "assistant", "content": "Oakvale"}]
    implicit = {"chosen": chosen, "rejected": rejected}
    assert preference_parts(implicit) == (HISTORY, chosen[-1:], rejected[-1:])
    explicit = {"prompt": HISTORY, "chosen": chosen[-1:], "rejected": rejected[-1:]}
    assert encode_preference(implicit, mistral, 256) == encode_preference(explicit, mistral, 256)
    # the shared first assistant turn "9" is prompt, not answer
    assert mistral.decode(supervised(encode_preference(implicit, mistral, 256)["chosen"]),
                          skip_special_tokens=False) == "Stonebridge</s>\n"


def test_chat_flag_makes_a_text_record_conversational(mistral):
    record = {"prompt": "What is 2 plus 7?", "chosen": "9", "rejected": "Oakvale"}
    assert preference_parts(record, chat=True) == (ASK, CONVERSATION["chosen"], CONVERSATION["rejected"])
    assert encode_preference(record, mistral, 64, chat=True) == encode_preference(CONVERSATION, mistral, 64)
    assert encode_preference(record, mistral, 64) != encode_preference(record, mistral, 64, chat=True)


# ---------------------------------------------------------------- Anthropic HH


@pytest.mark.parametrize("chosen,rejected,expected", [
    # the answers share their first word: it stays in both answers, with the space after "Assistant:"
    ("\n\nHuman: Is it safe?\n\nAssistant: I think so.", "\n\nHuman: Is it safe?\n\nAssistant: I don't know.",
     ("\n\nHuman: Is it safe?\n\nAssistant:", " I think so.", " I don't know.")),
    # several shared words, and one answer empty
    ("\n\nHuman: Sum?\n\nAssistant: The answer is 17.", "\n\nHuman: Sum?\n\nAssistant: The answer is 20.",
     ("\n\nHuman: Sum?\n\nAssistant:", " The answer is 17.", " The answer is 20.")),
    ("\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant: Go away.",
     ("\n\nHuman: Hi\n\nAssistant:", "", " Go away.")),
    # multi-turn history: the prompt runs to the last assistant marker
    ("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Where does Teo live?\n\nAssistant: Stonebridge.",
     "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Where does Teo live?\n\nAssistant: Oakvale, I think.",
     ("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Where does Teo live?\n\nAssistant:", " Stonebridge.",
      " Oakvale, I think.")),
    # no marker: cut back to the last whitespace, so no shared word is split
    ("The capital of France is Paris.", "The capital of France is Lyon.",
     ("The capital of France is", " Paris.", " Lyon.")),
    ("I like apples", "I like apricots", ("I like", " apples", " apricots")),
])
def test_split_shared_prefix_by_hand(chosen, rejected, expected):
    assert split_shared_prefix(chosen, rejected) == expected
    assert preference_parts({"chosen": chosen, "rejected": rejected}) == expected


@pytest.mark.parametrize("chosen,rejected,match", [
    ("\n\nHuman: Hi\n\nAssistant: Yo", "\n\nHuman: Hi\n\nAssistant: Yo",
     r"h\.jsonl:9: 'chosen' and 'rejected' are identical"),
    ("Yes.", "No.", r"h\.jsonl:9: 'chosen' and 'rejected' \(with no 'prompt' field\) share no prompt"),
    ("Yes.", "Yeah.", "share no prompt"),  # only part of a word in common
    (" x", " y", "share no prompt"),  # only whitespace in common
])
def test_split_shared_prefix_errors(chosen, rejected, match):
    with pytest.raises(ValueError, match=match):
        split_shared_prefix(chosen, rejected, where="h.jsonl:9")


def test_hh_record_encodes_as_text_even_with_chat(mistral):
    record = {"chosen": "\n\nHuman: What is 2 plus 7?\n\nAssistant: It is 9.",
              "rejected": "\n\nHuman: What is 2 plus 7?\n\nAssistant: It is 10."}
    pair = encode_preference(record, mistral, 128)
    prompt = mistral.encode("\n\nHuman: What is 2 plus 7?\n\nAssistant:")
    for side, answer in (("chosen", " It is 9."), ("rejected", " It is 10.")):
        answer_ids = mistral.encode(answer, add_special_tokens=False) + [2]
        assert pair[side] == {"input_ids": prompt + answer_ids, "labels": [X] * len(prompt) + answer_ids}
    assert encode_preference(record, mistral, 128, chat=True) == pair


# ---------------------------------------------------------------- limits


LONG = {"prompt": "What is 2 plus 7?" * 5, "chosen": " 9", "rejected": " 10"}  # 1 BOS + 30 prompt tokens


def test_max_prompt_length_keeps_bos_and_the_end_of_the_prompt(mistral):
    full = encode_preference(LONG, mistral, 64)
    assert len(prompt_ids(full["chosen"])) == 31 and prompt_ids(full["chosen"])[-6:] == QUESTION
    pair = encode_preference(LONG, mistral, 64, max_prompt_length=8)
    # BOS, then the last 7 prompt tokens: the "?" ending the 4th question, and the 5th question
    assert pair["chosen"] == {"input_ids": [1, 33, *QUESTION, 450, 2], "labels": [X] * 8 + [450, 2]}
    for side in ("chosen", "rejected"):
        assert pair[side]["input_ids"] == [1, *full[side]["input_ids"][24:]]
        assert supervised(pair[side]) == supervised(full[side])  # the answer is intact
    assert encode_preference(LONG, mistral, 64, max_prompt_length=31) == full  # fits exactly: unchanged
    assert encode_preference(LONG, mistral, 64, max_prompt_length=1)["rejected"]["input_ids"] == [
        1, *mistral.encode(" 10", add_special_tokens=False), 2]


def test_max_prompt_length_without_bos(gpt2):
    full = encode_preference(LONG, gpt2, 64)
    assert full["chosen"]["input_ids"][0] != gpt2.bos_token_id
    pair = encode_preference(LONG, gpt2, 64, max_prompt_length=4)
    answer = supervised(full["chosen"])
    assert pair["chosen"] == {"input_ids": full["chosen"]["input_ids"][-len(answer) - 4:], "labels": [X] * 4 + answer}


def test_max_prompt_length_of_a_conversation(mistral):
    record = {"prompt": HISTORY, "chosen": [{"role": "assistant", "content": "Stonebridge"}],
              "rejected": [{"role": "assistant", "content": "Oakvale"}]}
    generation = mistral.encode(mistral.apply_chat_template(HISTORY, add_generation_prompt=True))
    pair = encode_preference(record, mistral, 128, max_prompt_length=10)
    for side in ("chosen", "rejected"):
        assert prompt_ids(pair[side]) == [1, *generation[-9:]]
        answer = record[side][0]["content"] + "</s>\n"
        assert mistral.decode(supervised(pair[side]), skip_special_tokens=False) == answer


# chosen: 1 BOS + 6 prompt + " 9" + EOS = 9 tokens; rejected: 7 prompt tokens, then the long answer and EOS
RAMBLE = {"prompt": "What is 2 plus 7?", "chosen": " 9",
          "rejected": " Let me think about that for a moment: the answer is 9."}


def rejected_length(tok) -> int:
    return 7 + len(tok.encode(RAMBLE["rejected"], add_special_tokens=False)) + 1


def test_max_length_error_names_where_side_and_length(mistral):
    n = rejected_length(mistral)
    assert n > 20
    with pytest.raises(ValueError, match=rf"p\.jsonl:4: the rejected side is {n} tokens \(prompt \+ answer\), longer "
                                         r"than max_length=20 \(raise max_length, set max_prompt_length, or pass "
                                         r"truncation='drop' or 'right'\)"):
        encode_preference(RAMBLE, mistral, 20, where="p.jsonl:4")
    assert len(encode_preference(RAMBLE, mistral, n)["rejected"]["input_ids"]) == n  # exactly the limit fits


def test_max_length_drop(mistral):
    n = rejected_length(mistral)
    assert encode_preference(RAMBLE, mistral, n - 1, truncation="drop") is None
    assert encode_preference(RAMBLE, mistral, n, truncation="drop") == encode_preference(RAMBLE, mistral, n)


def test_max_length_right_cuts_the_answer_end(mistral):
    full = encode_preference(RAMBLE, mistral, 64)
    pair = encode_preference(RAMBLE, mistral, 12, truncation="right")
    assert pair["chosen"] == full["chosen"]  # fits: untouched, EOS kept
    rejected = pair["rejected"]
    assert rejected["input_ids"] == full["rejected"]["input_ids"][:12]
    assert rejected["labels"] == [X] * 7 + rejected["input_ids"][7:]  # still aligned with the ids
    assert 2 not in rejected["input_ids"]  # its EOS went
    # the tightest fit: the prompt and one answer token
    assert encode_preference(RAMBLE, mistral, 8, truncation="right")["rejected"]["labels"] == [X] * 7 + [
        full["rejected"]["input_ids"][7]]
    with pytest.raises(ValueError, match=r"p:1: the chosen side's prompt alone is 7 tokens, leaving no room for an "
                                         "answer token within max_length=7"):
        encode_preference(RAMBLE, mistral, 7, truncation="right", where="p:1")
    # max_prompt_length first, then the answer is cut to what is left
    pair = encode_preference(LONG | {"rejected": RAMBLE["rejected"]}, mistral, 10, max_prompt_length=4,
                             truncation="right")
    assert [len(pair[side]["input_ids"]) for side in ("chosen", "rejected")] == [6, 10]
    assert pair["rejected"]["input_ids"][:4] == [1, *QUESTION[-3:]]


@pytest.mark.parametrize("kwargs,match", [
    ({"truncation": "left"}, "truncation='left': expected one of error, drop, right"),
    ({"max_length": 0}, "max_length=0: expected a positive int"),
    ({"max_prompt_length": 16}, "max_prompt_length=16: expected None or a positive int below max_length=16"),
    ({"max_prompt_length": 0}, "max_prompt_length=0: expected None or a positive int"),
])
def test_bad_arguments(mistral, kwargs, match):
    with pytest.raises(ValueError, match=match):
        encode_preference(TEXT, mistral, **{"max_length": 16, **kwargs})


def test_encode_preferences_counts_drops(mistral):
    records = [("a:1", TEXT), ("a:2", RAMBLE), ("a:3", TEXT)]
    with pytest.warns(UserWarning, match=r"a\.jsonl: dropped 1 of 3 preference pairs longer than max_length=12"):
        pairs = encode_preferences(records, mistral, 12, truncation="drop", name="a.jsonl")
    assert pairs == [encode_preference(TEXT, mistral, 12)] * 2
    with pytest.raises(ValueError, match=r"a\.jsonl: all 1 preference pairs are longer than max_length=12"):
        encode_preferences([("a:2", RAMBLE)], mistral, 12, truncation="drop", name="a.jsonl")


# ---------------------------------------------------------------- bad records


def test_load_preferences_errors_name_file_and_line(tmp_path, mistral):
    cases = [
        ({"prompt": "a", "chosen": "b"}, r"missing field 'rejected'"),
        ({"prompt": "a", "chosen": 7, "rejected": "c"}, r"field 'chosen': expected a string or a list of messages, "
                                                        "got int"),
        ({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"},
         r"expected 'prompt', 'chosen' and 'rejected' to be all strings \(text\) or all message lists "
         r"\(conversational\), got 'prompt' a str, 'chosen' a list, 'rejected' a str"),
        ({"chosen": "b", "rejected": [{"role": "assistant", "content": "c"}]}, r"expected 'chosen' and 'rejected'"),
    ]
    for record, match in cases:
        path = write(tmp_path, "pref.jsonl", [TEXT, "", record, TEXT])
        with pytest.raises(ValueError, match=r"pref\.jsonl:3: " + match):
            load_preferences(path, mistral, 64)
    path = write(tmp_path, "pref.jsonl", [TEXT, RAMBLE])
    with pytest.raises(ValueError, match=r"pref\.jsonl:2: the rejected side is \d+ tokens"):
        load_preferences(path, mistral, 20)


A = [{"role": "assistant", "content": "b"}]


@pytest.mark.parametrize("record,match", [
    (["a"], r"expected a preference record \(a JSON object\), got list"),
    ({"prompt": "a", "rejected": "c"}, "missing field 'chosen'"),
    ({"prompt": None, "chosen": "b", "rejected": "c"}, "field 'prompt': expected a string or a list of messages, "
                                                       "got NoneType"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "'chosen' and 'rejected' are identical"),
    ({"prompt": [], "chosen": A, "rejected": A}, "field 'prompt': expected a non-empty list"),
    ({"prompt": ASK, "chosen": A, "rejected": []}, "field 'rejected': expected a non-empty list"),
    ({"prompt": ASK, "chosen": [{"role": "assistant"}], "rejected": A}, r"chosen\[0\]: missing field 'content'"),
    ({"prompt": ASK, "chosen": A, "rejected": [A[0], "x"]}, r"rejected\[1\]: expected an object, got str"),
    ({"prompt": ASK, "chosen": [{"role": 1, "content": "b"}], "rejected": A},
     r"chosen\[0\]: field 'role': expected a string, got int"),
    ({"prompt": ASK, "chosen": A, "rejected": A}, "'chosen' and 'rejected' are identical"),
    ({"prompt": ASK, "chosen": ASK, "rejected": A}, r"field 'chosen': the answer must be assistant turns only, "
                                                    r"got roles \['user'\]"),
    ({"prompt": ASK, "chosen": [*A, *ASK, *A], "rejected": A},
     r"field 'chosen': the answer must be assistant turns only, got roles \['assistant', 'user', 'assistant'\] "
     r"\(two conversations that differ before"),
    ({"chosen": ASK + A, "rejected": ASK + A}, "'chosen' and 'rejected' are identical"),
    ({"chosen": A, "rejected": ASK + A}, r"'chosen' and 'rejected' \(with no 'prompt' field\) differ from their "
                                         "first message on, so there is no prompt"),
    ({"chosen": ASK, "rejected": ASK + A}, "field 'chosen': no answer: all its 1 messages are shared"),
    ({"chosen": [*ASK, *A, *ASK], "rejected": [*ASK, *A, {"role": "user", "content": "other"}]},
     r"field 'chosen': the answer \(after the 2 shared messages\) must be assistant turns only"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d", "rejected": "\n\nHuman: a\n\nAssistant: x"},
     "'chosen': the answer after the shared prompt holds a later Human turn"),
])
def test_bad_record_errors_name_where_and_field(mistral, record, match):
    with pytest.raises(ValueError, match=r"f\.jsonl:3: " + match):
        encode_preference(record, mistral, 128, where="f.jsonl:3")


def test_template_errors_name_where(mistral, gpt2):
    tok = with_template(mistral, "{{ messages | length }}" + ZEPHYR_CHAT_TEMPLATE)
    with pytest.raises(ValueError, match=r"t\.jsonl:4: the chat template does not render the prompt"):
        encode_preference(CONVERSATION, tok, 128, where="t.jsonl:4")
    silent = with_template(mistral, "{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}{% endif %}"
                                    "{% endfor %}")
    with pytest.raises(ValueError, match=r"t\.jsonl:4: the chat template wrote no text for the 'chosen' answer"):
        encode_preference(CONVERSATION, silent, 128, where="t.jsonl:4")
    with pytest.raises(ValueError, match=r"t\.jsonl:2: .*no chat template"):
        encode_preference(CONVERSATION, gpt2, 128, where="t.jsonl:2")


# ---------------------------------------------------------------- collate


def pair(chosen: list[int], rejected: list[int], prompt: int = 1, **extra) -> dict:
    def side(ids):
        return {"input_ids": ids, "labels": [X] * prompt + ids[prompt:]}
    return {"chosen": side(chosen), "rejected": side(rejected), **extra}


def test_collate_preferences_layout():
    examples = [pair([5, 6, 7], [5, 8]), pair([9, 10], [9, 11, 12, 13])]
    batch = collate_preferences(examples, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "cu_seqlens", "answer_tokens"}
    assert all(batch[k].dtype == torch.long and batch[k].shape == (4, 4) for k in ("input_ids", "labels", "attention_mask"))
    assert batch["answer_tokens"].tolist() == [2, 1, 1, 3]  # each answer's labelled tokens, chosen then rejected
    # chosen rows first, in the examples' order, then the rejected rows
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [9, 10, 0, 0], [5, 8, 0, 0], [9, 11, 12, 13]]
    assert batch["labels"].tolist() == [[X, 6, 7, X], [X, 10, X, X], [X, 8, X, X], [X, 11, 12, 13]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 4, 6, 8, 10, 12, 16]  # each side and each padding run


def test_collate_preferences_packed_layout():
    """pack_length: the 2B answers by best-fit decreasing into rows; sequence_ids say whose each token is."""
    examples = [pair([5, 6, 7], [5, 8]), pair([9, 10], [9, 11, 12, 13])]
    batch = collate_preferences(examples, pad_id=0, pack_length=6)
    # sequences 0..3 = chosen 0, chosen 1, rejected 0, rejected 1: lengths 3, 2, 2, 4
    assert batch["input_ids"].tolist() == [[9, 11, 12, 13, 9, 10], [5, 6, 7, 5, 8, 0]]
    assert batch["sequence_ids"].tolist() == [[3, 3, 3, 3, 1, 1], [0, 0, 0, 2, 2, -1]]
    assert batch["labels"].tolist() == [[X, 11, 12, 13, X, 10], [X, 6, 7, X, 8, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 0]]
    assert batch["answer_tokens"].tolist() == [2, 1, 1, 3]  # as unpacked


@pytest.mark.parametrize("average", [False, True], ids=["sum", "average"])
def test_packed_pairs_give_the_unpacked_logps_and_gradients(average):
    from minitune.losses import preference_logps
    from minitune.models import Mistral, MistralConfig
    torch.manual_seed(0)
    model = Mistral(MistralConfig(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, sliding_window=5))
    examples = []
    for prompt, chosen, rejected in [(4, 5, 9), (7, 3, 2), (2, 8, 6), (5, 1, 4)]:
        head = torch.randint(3, 60, (prompt,)).tolist()
        examples.append(pair(head + torch.randint(3, 60, (chosen,)).tolist(),
                             head + torch.randint(3, 60, (rejected,)).tolist(), prompt=prompt))
    results = []
    for pack_length in (None, 16):
        model.zero_grad()
        chosen, rejected = preference_logps(model, collate_preferences(examples, 0, pack_length), average)
        (chosen - 2 * rejected).sum().backward()
        results.append((chosen.detach(), rejected.detach(), [p.grad.clone() for p in model.parameters()]))
    (c0, r0, g0), (c1, r1, g1) = results
    torch.testing.assert_close(c1, c0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r1, r0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_collate_preferences_reference_logps():
    examples = [pair([5, 6], [5, 7], reference_logps=[-1.5, -2.5]),
                pair([5, 8], [5, 9], reference_logps=(-3.25, -4.0)),
                pair([5, 3], [5, 4], reference_logps=[torch.tensor(-0.5), torch.tensor(-7.0)])]
    batch = collate_preferences(examples, pad_id=2)
    assert batch["reference_logps"].dtype == torch.float32
    assert batch["reference_logps"].tolist() == [-1.5, -3.25, -0.5, -2.5, -4.0, -7.0]  # chosen..., rejected...
    assert batch["input_ids"].shape == (6, 2)
    with pytest.raises(ValueError, match="collate_preferences: 1 of 2 examples have reference_logps"):
        collate_preferences([examples[0], pair([5, 6], [5, 7])], pad_id=2)
    with pytest.raises(ValueError, match=r"collate_preferences: example 1: reference_logps: expected a pair"):
        collate_preferences([examples[0], pair([5, 6], [5, 7], reference_logps=[-1.0])], pad_id=2)
    with pytest.raises(ValueError, match="collate_preferences: no examples"):
        collate_preferences([], pad_id=2)


def test_collate_preferences_of_encoded_pairs(mistral):
    pairs = [encode_preference(TEXT, mistral, 64), encode_preference(CONVERSATION, mistral, 64)]
    batch = collate_preferences(pairs, pad_id=mistral.eos_token_id)
    assert batch["input_ids"].shape == (4, 30)
    assert batch["input_ids"][1].tolist() == [1, *USER, *HEADER, 27, 2, 201]
    assert batch["input_ids"][2].tolist() == [1, *QUESTION, 418, 2] + [2] * 21  # " 10" = 418, then padding
    assert batch["attention_mask"].sum(1).tolist() == [9, 30, 9, 30]


# ---------------------------------------------------------------- the bundled data


def test_load_preferences_reads_the_bundled_data(mistral):
    records = read_jsonl(PREFERENCE_DATA / "train.jsonl")
    pairs = load_preferences(PREFERENCE_DATA / "train.jsonl", mistral, max_length=256, chat=True)
    assert len(pairs) == len(records) == 758
    for record, encoded in zip(records, pairs, strict=True):
        generation = mistral.encode(mistral.apply_chat_template([{"role": "user", "content": record["prompt"]}],
                                                                add_generation_prompt=True))
        for side in ("chosen", "rejected"):
            assert prompt_ids(encoded[side]) == generation
            assert mistral.decode(supervised(encoded[side]), skip_special_tokens=False) == record[side] + "</s>\n"
    assert len(load_preferences(PREFERENCE_DATA / "validation.jsonl", mistral, max_length=256)) == 162


def test_an_empty_prompt_without_bos_is_refused(gpt2, mistral):
    """Position 0 predicts nothing: with no prompt and no BOS the answer's first token could never be scored."""
    with pytest.raises(ValueError, match="f.jsonl:2: the prompt is empty and .* adds no BOS, so the chosen answer"):
        encode_preference({"prompt": "", "chosen": "yes", "rejected": "no"}, gpt2, 64, where="f.jsonl:2")
    pair = encode_preference({"prompt": "", "chosen": "yes", "rejected": "no"}, mistral, 64)  # BOS is the prompt
    assert pair["chosen"]["labels"][0] == IGNORE_INDEX and pair["chosen"]["labels"][1] != IGNORE_INDEX


def test_no_records_is_its_own_error(mistral):
    with pytest.raises(ValueError, match="the data: no preference pairs"):
        encode_preferences([], mistral, 64)
