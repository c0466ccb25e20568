"""minitune.tokenizer against transformers' AutoTokenizer, on tokenizers built here and on real files.

transformers is the oracle: for the same folder, ids, decoded text and rendered chats must be equal
(except the one documented difference: no doubled BOS).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jinja2
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from minitune.errors import UserError
from minitune.tokenizer import ZEPHYR_CHAT_TEMPLATE, ChatTemplateError, check_fits, load_tokenizer
from tests.conftest import EXAMPLES, FIXTURES

transformers = pytest.importorskip("transformers")


ZEPHYR_TEMPLATE = ZEPHYR_CHAT_TEMPLATE  # Zephyr-7b-beta's, as its tokenizer_config.json has it

# Zephyr's turns, behind a BOS (as Llama/Mistral-instruct templates write it), and strict about roles.
TINY_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n' + message['content'] + eos_token }}\n"
    "{% else %}\n"
    "{{ raise_exception('Unknown role: ' + message['role']) }}\n"
    "{% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "{{ '<|assistant|>\n' }}"
    "{% endif %}"
)

CHAT = [
    {"role": "system", "content": "You are a friendly chatbot."},
    {"role": "user", "content": "How many helicopters can a human eat in one sitting?"},
    {"role": "assistant", "content": "None, helicopters are not food."},
    {"role": "user", "content": "  What about  émojis 🤗?\nAnd newlines."},
]

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "You are a friendly chatbot. How many helicopters can a human eat?",
    "None, helicopters are not food. Don't eat them!",
    "<|system|>\n<|user|>\n<|assistant|>\n",
    "The quick brown fox jumps over the lazy dog. 123 456",
]

TEXTS = [
    "Hello world",
    "  leading spaces and trailing ",
    "line one\nline two\n\n\ttabbed",
    "émojis 🤗 and 世界",
    "<s>starts with BOS",
    "ends with EOS</s>",
    "mid <s> and </s> and <unk> tokens",
    "",
    "Don't , stop . now ?",
]


def hf_tokenizer(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False), encoding="utf-8")


def added(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def build_tiny_bpe(folder: Path, **config_overrides) -> Path:
    """A byte-level BPE trained here, with a BOS post-processor and a Zephyr-style chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(tok.token_to_id(t)): added(t) for t in ("<unk>", "<s>", "</s>")},
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": {"content": "<unk>", "__type": "AddedToken",
                                                               "lstrip": False, "rstrip": False,
                                                               "normalized": False, "single_word": False},
        "pad_token": None, "chat_template": TINY_TEMPLATE, "model_max_length": 2048,
    }
    config.update(config_overrides)
    write_json(folder / "tokenizer_config.json", config)
    return folder


def build_word_level(folder: Path) -> Path:
    """A word-level tokenizer (not BPE, so transformers' decode clean-up applies), with special tokens
    the config names but tokenizer.json does not declare, and an add_bos_token transformers ignores."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["[UNK]", "<pad>", "hello", "world", ".", ",", "it", "'s", "n't", "don", "</s>", "<s>", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("[UNK]", special=True)])
    tok.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "pad_token": "<pad>",
        "bos_token": "<s>", "eos_token": "</s>", "mask_token": "<mask>",
        "clean_up_tokenization_spaces": True, "add_bos_token": True,
    })
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_tiny_bpe(tmp_path_factory.mktemp("tiny_bpe"))
    return load_tokenizer(folder), hf_tokenizer(folder), folder


@pytest.fixture(scope="module")
def word_level(tmp_path_factory):
    folder = build_word_level(tmp_path_factory.mktemp("word_level"))
    return load_tokenizer(folder), hf_tokenizer(folder)


def real_folder(name: str) -> Path:
    folder = FIXTURES / name
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"real tokenizer fixture {folder} not found (the fixtures are absent outside the dev setup)")
    return folder


@pytest.fixture(scope="module")
def gpt2():
    folder = real_folder("gpt2")
    return load_tokenizer(folder), hf_tokenizer(folder)


@pytest.fixture(scope="module")
def mistral():
    folder = real_folder("mistral-7b-v0.1")
    return load_tokenizer(folder), hf_tokenizer(folder)


@pytest.fixture(scope="module")
def zephyr(tmp_path_factory):
    """Zephyr-7b-beta's layout: Mistral's tokenizer.json and config.json, Zephyr's tokenizer_config.json."""
    source = real_folder("mistral-7b-v0.1")
    folder = tmp_path_factory.mktemp("zephyr")
    shutil.copy(source / "tokenizer.json", folder / "tokenizer.json")
    shutil.copy(source / "config.json", folder / "config.json")
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.update(chat_template=ZEPHYR_TEMPLATE, pad_token="</s>", legacy=True, truncation_side="left",
                  use_default_system_prompt=True)
    del config["add_bos_token"], config["add_eos_token"]
    write_json(folder / "tokenizer_config.json", config)
    return load_tokenizer(folder), hf_tokenizer(folder)


def assert_same_encode_decode(ours, theirs, texts):
    for text in texts:
        for add_special in (True, False):
            ids = theirs.encode(text, add_special_tokens=add_special)
            assert ours.encode(text, add_special_tokens=add_special) == ids, (text, add_special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), \
                    (text, add_special, skip)


def safe_texts(texts, bos):
    """The texts where transformers and minitune agree by design: no text starting with the BOS string."""
    return [t for t in texts if not (bos and t.startswith(bos))]


# ---------------------------------------------------------------- tokenizers built here

def test_tiny_bpe_encode_decode_match_transformers(tiny):
    ours, theirs, _ = tiny
    assert_same_encode_decode(ours, theirs, safe_texts(TEXTS, "<s>"))
    assert ours.encode("Hello world")[0] == ours.bos_token_id  # the post-processor's BOS


def test_tiny_bpe_special_tokens_match_transformers(tiny):
    ours, theirs, _ = tiny
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, name) == getattr(theirs, name), name
        assert getattr(ours, name + "_id") == getattr(theirs, name + "_id"), name
    assert ours.pad_token_id is None
    assert ours.vocab_size == len(theirs)
    assert ours.model_max_length == 2048


def test_word_level_matches_transformers(word_level):
    """Clean-up of decoded spaces applies (not BPE), add_bos_token is ignored, missing specials are added."""
    ours, theirs = word_level
    texts = ["hello world . it 's", "hello</s>world <pad>", "<mask> hello , don n't ?", "unknown words"]
    assert_same_encode_decode(ours, theirs, texts)
    assert ours.decode(ours.encode("hello world .")) == "hello world."  # clean-up applied
    assert ours.encode("hello") == [2]  # add_bos_token in the config does not add BOS, as in transformers
    assert ours.vocab_size == len(theirs) == 14  # <mask> was added as a new token
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.pad_token_id == theirs.pad_token_id == 1
    assert ours.token_to_id("<mask>") == theirs.mask_token_id == 13
    assert sorted(ours.all_special_ids) == sorted(theirs.all_special_ids)


def test_special_tokens_map_file_used_only_for_old_configs(tmp_path):
    """As transformers: special_tokens_map.json counts (and wins) only without "added_tokens_decoder"."""
    folder = build_tiny_bpe(tmp_path / "old_style", pad_token="<unk>")
    write_json(folder / "special_tokens_map.json", {"pad_token": {"content": "</s>", "lstrip": False},
                                                    "eos_token": "</s>"})
    ours, theirs = load_tokenizer(folder), hf_tokenizer(folder)
    assert ours.pad_token == theirs.pad_token == "<unk>"  # the config has added_tokens_decoder: map ignored

    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    write_json(folder / "tokenizer_config.json", config)
    ours, theirs = load_tokenizer(folder), hf_tokenizer(folder)
    assert ours.pad_token == theirs.pad_token == "</s>"
    assert ours.pad_token_id == theirs.pad_token_id


def test_chat_template_matches_transformers(tiny):
    ours, theirs, _ = tiny
    for add_generation_prompt in (False, True):
        text = ours.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt)
        assert text == theirs.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, tokenize=False)
        ids = ours.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, tokenize=True)
        assert ids == theirs.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, return_dict=False)
    assert text.startswith("<s><|system|>\nYou are") and text.endswith("</s>\n<|assistant|>\n")
    assert ids.count(ours.bos_token_id) == 1


def test_raise_exception_in_template_is_an_error(tiny):
    ours, theirs, folder = tiny
    bad = CHAT + [{"role": "tool", "content": "42"}]
    with pytest.raises(ChatTemplateError, match="Unknown role: tool") as info:
        ours.apply_chat_template(bad)
    assert "tokenizer_config.json" in str(info.value)
    assert isinstance(info.value, jinja2.TemplateError)  # what transformers raises too
    with pytest.raises(jinja2.TemplateError, match="Unknown role: tool"):
        theirs.apply_chat_template(bad, tokenize=False)


def test_no_doubled_bos(tiny):
    ours, theirs, _ = tiny
    chat = ours.apply_chat_template(CHAT)
    assert chat.startswith(ours.bos_token)
    ids = ours.encode(chat)  # add_special_tokens=True on a text that already has its BOS
    reference = theirs.encode(chat)
    assert reference[:2] == [ours.bos_token_id] * 2  # transformers doubles it...
    assert ids == reference[1:]  # ...minitune keeps one, and nothing else changes
    assert ours.batch_encode([chat, "Hello"]) == [reference[1:], theirs.encode("Hello")]
    assert ours.encode(chat, add_special_tokens=False) == theirs.encode(chat, add_special_tokens=False)


def test_template_variables_and_environment(tmp_path):
    """Extra kwargs, tojson (non-ASCII, no HTML escaping), loopcontrols, strftime_now, {% generation %}."""
    template = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{{ m['role'] | upper }}: {{ m | tojson }}\n{% endfor %}"
        "{{ greeting }} {{ eos_token }} {{ strftime_now('%Y') | length }}"
        "{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}"
    )
    folder = build_tiny_bpe(tmp_path / "vars", chat_template=template)
    ours, theirs = load_tokenizer(folder), hf_tokenizer(folder)
    chat = [{"role": "user", "content": "<b>héllo</b> & 🤗", "name": None}, *CHAT]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    for kwargs in ({"greeting": "Hi"}, {"greeting": "Hi", "eos_token": "[END]"}, {"greeting": "x", "tools": tools}):
        assert ours.apply_chat_template(chat, **kwargs) == theirs.apply_chat_template(chat, tokenize=False, **kwargs)
    assert '"<b>héllo</b> & 🤗"' in ours.apply_chat_template(chat, greeting="")

    generation = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    folder = build_tiny_bpe(tmp_path / "generation", chat_template=generation)
    ours, theirs = load_tokenizer(folder), hf_tokenizer(folder)
    assert ours.apply_chat_template(CHAT) == theirs.apply_chat_template(CHAT, tokenize=False)


def test_chat_template_sources(tmp_path):
    """chat_template.jinja wins over the config; a list of named templates uses "default"."""
    named = [{"name": "tool_use", "template": "TOOLS {{ messages[0]['content'] }}"},
             {"name": "default", "template": "DEFAULT {{ messages[0]['content'] }}"}]
    folder = build_tiny_bpe(tmp_path / "named", chat_template=named)
    ours, theirs = load_tokenizer(folder), hf_tokenizer(folder)
    assert ours.apply_chat_template(CHAT) == theirs.apply_chat_template(CHAT, tokenize=False) == \
        "DEFAULT You are a friendly chatbot."
    assert ours.apply_chat_template(CHAT, chat_template="tool_use") == "TOOLS You are a friendly chatbot."

    (folder / "chat_template.jinja").write_text("JINJA {{ messages | length }}", encoding="utf-8")
    ours, theirs = load_tokenizer(folder), hf_tokenizer(folder)
    assert ours.apply_chat_template(CHAT) == theirs.apply_chat_template(CHAT, tokenize=False) == "JINJA 4"


def test_missing_chat_template_is_a_clear_error(tmp_path):
    folder = build_tiny_bpe(tmp_path / "no_template", chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(folder).apply_chat_template(CHAT)


def test_template_syntax_error_names_the_file(tmp_path):
    folder = build_tiny_bpe(tmp_path / "syntax", chat_template="line one\n{% for m in messages %}")
    tok = load_tokenizer(folder)
    with pytest.raises(ValueError, match=r"tokenizer_config.json: chat template line \d"):
        tok.apply_chat_template(CHAT)


def test_save_pretrained_round_trip(tiny, tmp_path):
    ours, _, _ = tiny
    out = tmp_path / "saved"
    (out / "additional_chat_templates").mkdir(parents=True)
    (out / "additional_chat_templates" / "stale.jinja").write_text("stale")  # an earlier save's leftover
    ours.save_pretrained(out)
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                               "special_tokens_map.json", "chat_template.jinja",
                                               "additional_chat_templates"}
    assert not list((out / "additional_chat_templates").iterdir())
    # the template in both places: the .jinja file for transformers 5, the config for older readers
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (out / "chat_template.jinja").read_text() == ours.chat_template
    again, theirs = load_tokenizer(out), hf_tokenizer(out)
    texts = safe_texts(TEXTS, "<s>")
    assert_same_encode_decode(again, theirs, texts)
    assert [again.encode(t) for t in texts] == [ours.encode(t) for t in texts]
    assert again.apply_chat_template(CHAT, add_generation_prompt=True) == \
        theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == \
        ours.apply_chat_template(CHAT, add_generation_prompt=True)
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == \
        (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)


# ---------------------------------------------------------------- errors

def test_missing_tokenizer_json_names_folder_and_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_invalid_json_names_file_and_line(tmp_path):
    folder = build_tiny_bpe(tmp_path / "bad_config")
    (folder / "tokenizer_config.json").write_text('{\n  "bos_token": "<s>",\n  "eos_token": </s>\n}\n')
    with pytest.raises(ValueError, match=r"tokenizer_config.json, line 3"):
        load_tokenizer(folder)

    folder = build_tiny_bpe(tmp_path / "bad_tokenizer")
    text = (folder / "tokenizer.json").read_text()
    (folder / "tokenizer.json").write_text(text.replace('"model"', '"model" oops', 1))
    with pytest.raises(ValueError, match=r"tokenizer.json, line \d+"):
        load_tokenizer(folder)


def test_bad_special_token_value_names_key(tmp_path):
    folder = build_tiny_bpe(tmp_path / "bad_token", bos_token=7)
    with pytest.raises(ValueError, match=r"tokenizer_config.json, key 'bos_token'"):
        load_tokenizer(folder)


# ---------------------------------------------------------------- real files

REAL_TEXTS = TEXTS + [
    "Hello, world! How are you doing today?",
    "   three leading spaces",
    " one leading space",
    "trailing newline\n",
    "\n\nleading newlines",
    "Emoji 🤗🚀 and accents: café, naïve, Ångström",
    "中文字符 and 日本語 and 한국어",
    "rare bytes: \u0f3a \u2603 \U0001f9ec",
    "def f(x):\n    return x  # code\n",
    "<|endoftext|>between<|endoftext|>",
]


def test_gpt2_matches_transformers(gpt2):
    ours, theirs = gpt2
    assert ours.vocab_size == len(theirs) == 50257
    assert ours.eos_token_id == ours.bos_token_id == theirs.eos_token_id == 50256
    assert ours.pad_token_id is None
    assert_same_encode_decode(ours, theirs, REAL_TEXTS)  # GPT-2 adds no BOS: no text is special here


def test_gpt2_stored_truncation_is_ignored(gpt2):
    ours, theirs = gpt2
    text = "The quick brown fox jumps over the lazy dog. " * 20
    ids = ours.encode(text)
    assert len(ids) > 100
    assert ids == theirs.encode(text)
    assert ours.decode(ids) == text
    assert ours.batch_encode([text])[0] == ids


def test_mistral_matches_transformers(mistral):
    ours, theirs = mistral
    assert ours.vocab_size == len(theirs) == 32000
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id) == (1, 2, 0)
    assert ours.pad_token_id is None
    assert_same_encode_decode(ours, theirs, safe_texts(REAL_TEXTS, "<s>"))
    assert ours.encode("Hello world") == [1, 22557, 1526]  # BOS from the post-processor
    assert ours.encode("Hello world", add_special_tokens=False) == [22557, 1526]


def test_mistral_byte_fallback_and_spaces(mistral):
    ours, _ = mistral
    ids = ours.encode("🤗", add_special_tokens=False)
    tokens = [ours.id_to_token(i) for i in ids]
    assert all(t.startswith("<0x") for t in tokens if t != "▁"), tokens  # no piece for it: raw bytes
    for text in ["🤗", "two  spaces", "a\nb\n\nc", "\u0f3a"]:
        assert ours.decode(ours.encode(text)) == text
    # Mistral's decoder strips the one space its pre-tokenizer prepends, as transformers' does
    assert ours.decode(ours.encode("  two")) == " two"


def test_mistral_no_doubled_bos(mistral):
    ours, theirs = mistral
    text = "<s>[INST] Hello [/INST]"
    assert theirs.encode(text)[:2] == [1, 1]
    assert ours.encode(text) == theirs.encode(text)[1:]
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)


def test_mistral_has_no_chat_template(mistral):
    ours, _ = mistral
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(CHAT)


def test_zephyr_chat_template_matches_transformers(zephyr):
    ours, theirs = zephyr
    assert ours.pad_token == "</s>" and ours.pad_token_id == theirs.pad_token_id == 2
    for add_generation_prompt in (False, True):
        text = ours.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt)
        assert text == theirs.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, tokenize=False)
        ids = ours.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, tokenize=True)
        assert ids == theirs.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, return_dict=False)
        assert ours.encode(text) == theirs.encode(text)  # Zephyr's template writes no BOS: one is added
    assert text == ("<|system|>\nYou are a friendly chatbot.</s>\n<|user|>\nHow many helicopters can a human eat "
                    "in one sitting?</s>\n<|assistant|>\nNone, helicopters are not food.</s>\n<|user|>\n  What about"
                    "  émojis 🤗?\nAnd newlines.</s>\n<|assistant|>\n")


def test_save_pretrained_real_mistral(mistral, tmp_path):
    ours, _ = mistral
    ours.save_pretrained(tmp_path)
    again, theirs = load_tokenizer(tmp_path), hf_tokenizer(tmp_path)
    texts = safe_texts(REAL_TEXTS, "<s>")
    assert_same_encode_decode(again, theirs, texts)
    assert [again.encode(t) for t in texts] == [ours.encode(t) for t in texts]
    assert again.vocab_size == 32000


# ---------------------------------------------------------------- bad input: refused by name, never dropped silently

def test_decode_refuses_negative_ids_and_says_when_it_drops_one_past_the_vocabulary(tiny):
    """transformers raises OverflowError for -100 and silently drops ids >= len(tokenizer): the first is one clear
    error here, the second is dropped too (a model with spare embedding rows can generate them) with a warning."""
    ours, theirs, _ = tiny
    n = len(ours)
    assert len(theirs) == n and theirs.decode([n]) == ""  # what transformers does: the id vanishes
    with pytest.raises(ValueError, match=rf"decode: id -100 at position 1 is the label ignore index, not a token: "
                                         rf"decode input ids, or drop the -100s; "
                                         rf"token ids are 0..{n - 1} \(2 such ids\)"):
        ours.decode([5, -100, 6, -100])
    with pytest.warns(UserWarning, match=rf"decode: dropped ids past the vocabulary \(0..{n - 1}\): \[{n}, {n + 3}\]"):
        assert ours.decode([5, n, 6, n + 3]) == ours.decode([5, 6])
    with pytest.raises(ValueError, match=rf"decode: id -1 at position 0 is not a token"):
        ours.decode(-1)
    import torch
    labels = torch.tensor([-100, -100, 5, 6])
    with pytest.raises(ValueError, match="label ignore index"):
        ours.batch_decode(labels[None])
    assert ours.decode(labels[labels != -100]) == ours.decode([5, 6])


def test_decode_takes_one_sequence_of_int_ids(tiny):
    import numpy as np
    import torch
    ours, _, _ = tiny
    ids = ours.encode("Hello world")
    assert ours.decode(np.array(ids)) == ours.decode(torch.tensor(ids)) == ours.decode([np.int64(i) for i in ids]) \
        == ours.decode(tuple(ids)) == ours.decode(ids)
    with pytest.raises(TypeError, match="decode expects a sequence of token ids; got str"):
        ours.decode("Hello world")
    with pytest.raises(TypeError, match=r"decode: ids\[1\] is 7.5 \(float\), not an int token id$"):
        ours.decode([5, 7.5])  # was cut to 7 without a word
    with pytest.raises(TypeError, match=r"decode: ids\[0\] is 5.0 \(float\)"):
        ours.decode(torch.tensor([5.0, 6.0]))
    with pytest.raises(TypeError, match=r"decode: ids\[0\] is \[5, 6\] \(list\).*batch_decode takes several"):
        ours.decode([[5, 6]])


def test_encode_and_add_tokens_refuse_a_str_where_a_list_belongs(tiny, tmp_path):
    ours, _, folder = tiny
    with pytest.raises(TypeError, match="batch_encode expects a list of strings, got one str; use encode"):
        ours.batch_encode("Hello")  # would encode each character
    with pytest.raises(TypeError, match=r"batch_encode: texts\[1\] is a int, expected a str"):
        ours.batch_encode(["Hello", 5])
    with pytest.raises(TypeError, match="encode expects a str, got NoneType"):
        ours.encode(None)
    tok = load_tokenizer(folder)  # a fresh one: add_tokens changes it
    with pytest.raises(TypeError, match=r"add_tokens expects a list of strings; got '<\|recipe\|>'"):
        tok.add_tokens("<|recipe|>")  # would add its characters, or nothing when they exist
    with pytest.raises(TypeError, match=r"add_tokens expects a list of strings; got \['<a>', 5\]"):
        tok.add_tokens(["<a>", 5])
    assert len(tok) == len(ours)


ZEPHYR_STYLE = EXAMPLES / "assets" / "tiny-mistral"  # its template skips a message of an unknown role silently


@pytest.mark.parametrize("messages, error, message", [
    ("Hello", TypeError, r"apply_chat_template expects a list of \{'role': ..., 'content': ...\} messages; got a str"),
    ({"role": "user", "content": "Hi"}, TypeError, r"expects a list of .* messages; got a dict"),
    ([{"content": "Hi"}], UserError, r"message 0: expected a 'role' string \(system, user, assistant, ...\); "
                                     r"got None \(keys \['content'\]\)"),
    ([{"role": "user", "content": "Hi"}, {"role": 1, "content": "Hi"}], UserError,
     r"message 1: expected a 'role' string"),
    ([{"role": "user", "content": 5}], UserError,
     r"message 0: 'content' must be a string \(or a list of parts\); got int 5"),
    ([], ValueError, "the conversation is empty"),
])
def test_apply_chat_template_refuses_bad_messages_by_name(messages, error, message):
    tok = load_tokenizer(ZEPHYR_STYLE)
    with pytest.raises(error, match=message):
        tok.apply_chat_template(messages)
    assert tok.apply_chat_template(({"role": "user", "content": "Hi"},))  # a tuple is a fine list of messages


def test_check_fits_refuses_a_tokenizer_bigger_than_the_model():
    """Where a tokenizer and a model meet: ids past the embedding would crash inside torch (IndexError on CPU,
    a device assert on CUDA), so check_fits names both sizes and the fix."""
    import torch

    import minitune as mt
    folder = EXAMPLES / "assets" / "tiny-gpt2"
    tok, model = load_tokenizer(folder), mt.load_model(folder)
    rows = model.config.vocab_size
    assert len(tok) < rows
    check_fits(tok, model)  # a padded embedding (more rows than tokens) is fine
    tok.add_tokens([f"<extra_{i}>" for i in range(rows - len(tok) + 3)])
    assert len(tok) == rows + 3
    with pytest.raises(UserError, match=rf"^the tokenizer \({re.escape(str(folder))}\) has {rows + 3} tokens, "
                                        rf"added ones included, but the model's embedding has {rows} rows; grow it first: "
                                        r"model.resize_token_embeddings\(len\(tok\)\)$"):
        check_fits(tok, model)
    with pytest.raises(IndexError):  # what check_fits saves a user from
        model(torch.tensor([[len(tok) - 1]]))
    model.resize_token_embeddings(len(tok))
    check_fits(tok, model)
    assert model(torch.tensor([[len(tok) - 1]])).shape == (1, 1, len(tok))
