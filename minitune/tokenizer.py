"""Tokenizers and chat templates, read from a Hugging Face folder, behaving like transformers.

A tokenizer folder holds `tokenizer.json` (the whole pipeline, for the `tokenizers` library),
`tokenizer_config.json` (special tokens, the chat template, decoding options) and, in older
folders, `special_tokens_map.json`; newer ones keep the chat template in `chat_template.jinja`.
`load_tokenizer` reads them the way `transformers.AutoTokenizer` (5.x) does, so that ids, decoded
text and rendered chats are the ones the model was trained with. Where transformers does something
surprising, the code says so and names the place in transformers it follows.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from .errors import UserError, is_int
from .hub import read_json, resolve

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # transformers' name for extra named templates
# what load_tokenizer fetches from the hub: never the weights
TOKENIZER_FILES = [TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, CHAT_TEMPLATE_FILE,
                   f"{CHAT_TEMPLATE_DIR}/*.jinja"]

# HuggingFaceH4/zephyr-7b-beta's chat template, as its tokenizer_config.json has it: <|system|>,
# <|user|> and <|assistant|> turns, each closed by EOS. It writes no BOS: encoding the rendered chat
# adds one. For giving a base Mistral-family tokenizer the chat format before fine-tuning it.
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

# The named special tokens of transformers (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(jinja2.TemplateError):
    """A chat template called raise_exception(...) or could not be rendered.

    A subclass of jinja2.TemplateError, which is what transformers raises, so callers that catch that keep working.
    """


# ---------------------------------------------------------------- the tokenizer

class Tokenizer:
    """A `tokenizers.Tokenizer` plus what tokenizer_config.json adds: special tokens, chat templates, decoding.

    encode/decode give the ids and text of transformers' fast tokenizer for the same folder, with one
    deliberate difference: `encode(text, add_special_tokens=True)` never yields a doubled BOS. When the
    text already starts with the BOS string (a rendered chat whose template writes `{{ bos_token }}`,
    say) and the post-processor adds a BOS in front of it, the added one is dropped. transformers would
    return two BOS tokens there, which silently shifts the model off its training distribution.
    """

    def __init__(self, backend: BackendTokenizer, config: dict, *, special_tokens: dict[str, str],
                 extra_special_tokens: Sequence[str] = (), chat_template: str | dict[str, str] | None = None,
                 chat_template_source: str = "", folder: Path | None = None):
        self.backend = backend
        self.config = config
        self.folder = folder
        self.special_tokens_map = dict(special_tokens)  # name -> string, e.g. {"bos_token": "<s>"}
        self.extra_special_tokens = list(extra_special_tokens)
        self.chat_template = chat_template
        self._chat_template_source = chat_template_source or str(folder or "this tokenizer")
        # transformers' default is False (PreTrainedTokenizerBase.__init__), whatever the class.
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._clean_up_bpe = bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                                             False))
        self.model_max_length = config.get("model_max_length")

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.folder)!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, pad={self.pad_token!r})")

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------ vocabulary and special tokens

    @property
    def vocab_size(self) -> int:
        """All ids, added tokens included: transformers' len(tokenizer), the size an embedding needs."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def add_tokens(self, tokens: Sequence[str], special: bool = False) -> int:
        """Add whole tokens (domain words, chat markers) at the end of the vocabulary; returns how many were new.

        An added token is matched before the model's own splitting, so it always encodes to its one id.
        Special tokens are also skipped by decode(skip_special_tokens=True). Grow the model to match with
        `model.resize_token_embeddings(len(tokenizer))`.
        """
        if isinstance(tokens, str) or not all(isinstance(t, str) for t in tokens):
            raise TypeError(f"add_tokens expects a list of strings; got {tokens!r}")  # a str would add its characters
        new = [t for t in dict.fromkeys(tokens) if self.backend.token_to_id(t) is None]
        added = [AddedToken(t, special=special, normalized=not special) for t in new]
        count = self.backend.add_special_tokens(added) if special else self.backend.add_tokens(added)
        if special:
            self.extra_special_tokens += new
        return count

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self.backend.id_to_token(int(index))

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        if token is None:
            return None
        index = self.backend.token_to_id(token)
        if index is None and name != "unk_token":  # transformers maps an unknown token to unk's id
            return self._special_id("unk_token")
        return index

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens_map.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens_map.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self.special_tokens_map.get("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def all_special_ids(self) -> list[int]:
        tokens = dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens])
        return [i for i in (self.backend.token_to_id(t) for t in tokens) if i is not None]

    # ------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, as transformers' tokenizer.encode, except that BOS is never doubled.

        With add_special_tokens the post-processor adds what the model expects (Mistral: BOS in front;
        GPT-2: nothing). If `text` itself starts with the BOS string, the added BOS is dropped, so
        encoding a rendered chat that begins with `{{ bos_token }}` gives one BOS, not two.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}; use batch_encode for a list")
        return self._ids(self.backend.encode(text, add_special_tokens=add_special_tokens), text, add_special_tokens)

    def batch_encode(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """encode() for many texts at once (the Rust backend runs them in parallel)."""
        if isinstance(texts, str):
            raise TypeError("batch_encode expects a list of strings, got one str; use encode for a single text")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"batch_encode: texts[{i}] is a {type(text).__name__}, expected a str")
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [self._ids(e, t, add_special_tokens) for e, t in zip(encodings, texts, strict=True)]

    def _ids(self, encoding, text: str, add_special_tokens: bool) -> list[int]:
        ids = encoding.ids
        bos = self.bos_token
        if not (add_special_tokens and bos and len(ids) >= 2 and text.startswith(bos)):
            return ids
        mask = encoding.special_tokens_mask
        if ids[0] == ids[1] == self.bos_token_id and mask[0] == 1 and mask[1] == 0:
            # [0] was added by the post-processor (mask 1), [1] came from the text (mask 0): keep the text's.
            return ids[1:]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, as transformers' tokenizer.decode (including its clean-up rule, see below).

        transformers applies `clean_up_tokenization_spaces` ("a ." -> "a.") only when the config asks for
        it *and* the model is not BPE, since on BPE it corrupts text (TokenizersBackend._decode in
        transformers/tokenization_utils_tokenizers.py). GPT-2's config asks for it and gets none.

        A negative id is an error naming it (transformers: an OverflowError, for -100, the label ignore index).
        An id past the vocabulary, which a model whose embedding has spare rows can generate, is dropped as
        transformers drops it, with a warning rather than in silence.
        """
        text = self.backend.decode(self._checked_ids(ids), skip_special_tokens=skip_special_tokens)
        is_bpe = type(self.backend.model).__name__ == "BPE"
        if self.clean_up_tokenization_spaces and (not is_bpe or self._clean_up_bpe):
            text = clean_up_tokenization(text)
        return text

    def _checked_ids(self, ids) -> list[int]:
        """`ids` (a list, a tensor, an array or one id) as a list of ints, each a token of this tokenizer."""
        if hasattr(ids, "tolist"):  # a tensor or an array
            ids = ids.tolist()
        if is_int(ids):
            ids = [ids]
        if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
            raise TypeError(f"decode expects a sequence of token ids; got {type(ids).__name__}")
        ids = list(ids)
        if not all(type(i) is int for i in ids):  # the slow path: numpy ints are fine, floats and lists are not
            for k, i in enumerate(ids):
                if not is_int(i):
                    hint = "; batch_decode takes several sequences" if isinstance(i, (list, tuple)) else ""
                    raise TypeError(f"decode: ids[{k}] is {i!r} ({type(i).__name__}), not an int token id{hint}")
            ids = [int(i) for i in ids]
        n = len(self)
        if ids and min(ids) < 0:  # transformers: an OverflowError
            bad = [(k, i) for k, i in enumerate(ids) if i < 0]
            k, i = bad[0]
            what = ("the label ignore index, not a token: decode input ids, or drop the -100s" if i == -100
                    else "not a token of this tokenizer")
            more = f" ({len(bad)} such ids)" if len(bad) > 1 else ""
            raise ValueError(f"decode: id {i} at position {k} is {what}; token ids are 0..{n - 1}{more}")
        if ids and max(ids) >= n:  # a spare embedding row's id: no text, as in transformers, but said
            warnings.warn(f"decode: dropped ids past the vocabulary (0..{n - 1}): {sorted({i for i in ids if i >= n})}; "
                          "the model's embedding has rows no token uses", stacklevel=3)
            ids = [i for i in ids if i < n]
        return ids

    def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]

    # ------------------------------------------------------------ chat templates

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template text to use: a name among several templates, an explicit template, or the default.

        Same choice as transformers' get_chat_template: with several named templates, "tool_use" when
        tools are given and it exists, else "default".
        """
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is not None:
                return templates.get(chat_template, chat_template)
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise UserError(f"{self._chat_template_source}: several chat templates "
                            f"({', '.join(sorted(templates))}) and none is named 'default'; "
                            "pass chat_template=<name>")
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise UserError(f"{self.folder}: this tokenizer has no chat template (no 'chat_template' key in "
                            f"{CONFIG_FILE} and no {CHAT_TEMPLATE_FILE}); pass chat_template=... or use a "
                            "chat model's tokenizer")
        return templates

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = False, *, chat_template: str | None = None,
                            tools: list | None = None, documents: list | None = None,
                            continue_final_message: bool | str = False, **kwargs) -> str | list[int]:
        """Render a conversation with the model's chat template, exactly as transformers renders it.

        messages: [{"role": "user", "content": "..."}, ...]. add_generation_prompt appends the header that
        starts an assistant turn. tools: JSON schemas ({"type": "function", "function": {...}}) for the
        templates that describe tools (Llama 3.1, Qwen). continue_final_message leaves the last message open
        (no end of turn after it) so that generation continues it; a field name ("reasoning_content")
        continues that field instead of the content. Extra keyword arguments become template variables
        (they override the special tokens of the same name): date_string, enable_thinking, builtin_tools...
        tokenize=True returns ids encoded without adding special tokens, because the template already
        writes them (transformers does the same).
        """
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
            raise TypeError("apply_chat_template expects a list of {'role': ..., 'content': ...} messages; "
                            f"got a {type(messages).__name__}")
        messages = list(messages)
        if not messages:
            raise ValueError("apply_chat_template: the conversation is empty; give at least one message")
        if continue_final_message and add_generation_prompt:
            raise ValueError("apply_chat_template: continue_final_message and add_generation_prompt exclude each "
                             "other: the first leaves the last message open, the second starts a new assistant turn")
        _check_tools(tools)
        source = self._chat_template_source
        template_text = self.get_chat_template(chat_template, tools)
        template = _compile_chat_template(template_text, source)
        messages = _normalize_messages(messages)
        if continue_final_message:
            final = _mark_final_message(messages, continue_final_message, template_text)
        variables = {**self.special_tokens_map, **_plain(kwargs)}
        try:
            text = template.render(messages=messages, tools=_plain(tools), documents=_plain(documents),
                                   add_generation_prompt=add_generation_prompt, **variables)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{source}: chat template failed: {e}") from e
        if continue_final_message:
            text = _cut_at_mark(text, final)
        if tokenize:
            return self.backend.encode(text, add_special_tokens=False).ids
        return text

    # ------------------------------------------------------------ saving

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and the chat template(s).

        The result loads back in minitune and in transformers' AutoTokenizer with the same behaviour.
        The chat template goes to chat_template.jinja, where transformers 5 writes it and which wins on
        load, and also into tokenizer_config.json, the only place that transformers before 4.47, TGI
        and older vLLM look. Each file is written under a temporary name and renamed into place.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files: dict[str, str] = {
            TOKENIZER_FILE: self.backend.to_str(pretty=True),
            CONFIG_FILE: _dump_json(self._config_to_save()),
            SPECIAL_TOKENS_MAP_FILE: _dump_json(self.special_tokens_map),
        }
        files.update(_template_files(self.chat_template))
        stale = [out / CHAT_TEMPLATE_FILE, *sorted((out / CHAT_TEMPLATE_DIR).glob("*.jinja"))]
        with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-tokenizer-") as tmp:
            for name, text in files.items():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_text(text, encoding="utf-8")
            # A template file left by an earlier save would override the config's (it wins on load).
            for path in stale:
                if path.relative_to(out).as_posix() not in files and path.exists():
                    path.unlink()
            for name in files:
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(Path(tmp) / name, out / name)

    def _config_to_save(self) -> dict:
        config = {k: v for k, v in self.config.items() if k not in ("chat_template", "add_bos_token", "add_eos_token")}
        # transformers drops add_bos/eos_token on save as well: with a tokenizer.json it ignores them on
        # load, since the post-processor in tokenizer.json decides (PreTrainedTokenizerBase._from_pretrained).
        config.update(self.special_tokens_map)
        if isinstance(config.get("extra_special_tokens"), list):
            del config["extra_special_tokens"]  # a dict (named tokens) stays; a list goes under the old name
        if self.extra_special_tokens:
            # the name both transformers 4 and 5 read (5 renames it to extra_special_tokens on load)
            config["additional_special_tokens"] = list(self.extra_special_tokens)
        if isinstance(self.chat_template, str):
            config["chat_template"] = self.chat_template
        elif self.chat_template:  # named templates: the config's list form
            config["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_template.items()]
        config["added_tokens_decoder"] = {str(i): t.__getstate__()
                                          for i, t in sorted(self.backend.get_added_tokens_decoder().items())}
        # tokenizer.json is the whole pipeline; a model-specific class (LlamaTokenizer, GPT2Tokenizer)
        # would make transformers rebuild parts of it from config keys. This name loads it as written,
        # in transformers 4 and 5 alike.
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        return config


def check_fits(tok: Tokenizer, model) -> None:
    """Raise UserError unless every id of `tok` has a row in `model`'s token embedding.

    Where a tokenizer and a model meet (after loading both, after add_tokens), check once: an id past
    the embedding fails deep inside torch (an IndexError on CPU, a device assert on CUDA), and checking
    ids in every forward would cost a device sync. More rows than tokens is fine: embeddings are often
    padded to a multiple of 64.
    """
    rows = model.input_embeddings().num_embeddings
    if len(tok) > rows:
        where = f" ({tok.folder})" if tok.folder else ""
        raise UserError(f"the tokenizer{where} has {len(tok)} tokens, added ones included, but the model's embedding "
                        f"has {rows} rows; grow it first: model.resize_token_embeddings(len(tok))")


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: remove the space before punctuation and English contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


# ---------------------------------------------------------------- loading

def load_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a local folder or hub id: tokenizer.json plus tokenizer_config.json and friends.

    Behaves like transformers' AutoTokenizer.from_pretrained on the same folder (see Tokenizer for the
    one deliberate difference). transformers rebuilds parts of tokenizer.json's pipeline for a few
    model-specific classes (a LlamaTokenizer folder without a Mistral config.json; GPT2Tokenizer with
    add_prefix_space); minitune always runs tokenizer.json as written, which is what transformers does
    for the real GPT-2, Mistral and Zephyr folders.
    """
    folder = resolve(name_or_path, TOKENIZER_FILES)
    config = _read_config(folder)
    special_tokens, extra_special_tokens = _special_tokens(folder, config)
    backend = _read_backend(folder)
    _add_missing_tokens(backend, config, special_tokens, extra_special_tokens)
    # transformers passes split_special_tokens to the backend (TokenizersBackend.__init__)
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    chat_template, source = _read_chat_templates(folder, config)
    return Tokenizer(backend, config, special_tokens=special_tokens, extra_special_tokens=extra_special_tokens,
                     chat_template=chat_template, chat_template_source=source, folder=folder)


def _read_backend(folder: Path) -> BackendTokenizer:
    """tokenizer.json as a tokenizers.Tokenizer, with any stored truncation and padding switched off.

    transformers keeps such settings in the file but applies them only when a call asks for truncation
    or padding (TokenizersBackend.set_truncation_and_padding); left on, GPT-2's hub file would cut
    every text to 50 tokens.
    """
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        hint = ""
        if (folder / "tokenizer.model").exists():
            hint = (" (found tokenizer.model: minitune reads only the tokenizers-format tokenizer.json; "
                    "convert it once with transformers' AutoTokenizer and save_pretrained)")
        raise FileNotFoundError(f"{folder}: no {TOKENIZER_FILE} in this folder{hint}")
    try:
        backend = BackendTokenizer.from_file(str(path))
    except Exception as e:
        read_json(path)  # raises with the file, line and column when the JSON itself is broken
        raise UserError(f"{path}: not a tokenizer file the tokenizers library can read: {e}") from None
    backend.no_truncation()
    backend.no_padding()
    return backend


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.exists():
        return {}
    config = read_json(path)
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _token_string(value: Any, where: str) -> str | None:
    """A special token given as a string, or as an AddedToken dict ({"content": ..., ...}), or None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: expected a string or an object with a 'content' string, got {value!r}")


def _special_tokens(folder: Path, config: dict) -> tuple[dict[str, str], list[str]]:
    """Named special tokens (bos, eos, ...) and the extra ones, from the config and special_tokens_map.json.

    As transformers (PreTrainedTokenizerBase._from_pretrained): special_tokens_map.json is read only
    when tokenizer_config.json has no "added_tokens_decoder" (an older folder), and then its values win.
    Other "*_token" string keys of the config (e.g. "image_token") are model-specific special tokens.
    """
    sources = [(folder / CONFIG_FILE, config)]
    map_path = folder / SPECIAL_TOKENS_MAP_FILE
    if "added_tokens_decoder" not in config and map_path.exists():
        special_map = read_json(map_path)
        if not isinstance(special_map, dict):
            raise UserError(f"{map_path}: expected a JSON object, got {type(special_map).__name__}")
        sources.append((map_path, special_map))

    named: dict[str, str] = {}
    extra: list[str] = []
    for path, values in sources:
        for key, value in values.items():
            is_model_specific = key.endswith("_token") and isinstance(value, (str, dict)) and (
                isinstance(value, str) or "content" in value)
            if key in SPECIAL_TOKEN_NAMES or is_model_specific:
                token = _token_string(value, f"{path}, key {key!r}")
                if token is None:
                    named.pop(key, None)
                else:
                    named[key] = token
            elif key in ("additional_special_tokens", "extra_special_tokens") and value:
                if isinstance(value, dict):  # named extra tokens, e.g. {"image_token": "<image>"}
                    for name, token in value.items():
                        named[name] = _token_string(token, f"{path}, key {key!r}.{name}")
                elif isinstance(value, list):
                    extra = [_token_string(t, f"{path}, key {key!r}") for t in value]
                else:
                    raise UserError(f"{path}, key {key!r}: expected a list of tokens, got {value!r}")
    return named, extra


def _add_missing_tokens(backend: BackendTokenizer, config: dict, special_tokens: dict[str, str],
                        extra_special_tokens: list[str]) -> None:
    """Add the config's added tokens and special tokens that tokenizer.json lacks, as transformers does.

    TokenizersBackend.__init__ adds every entry of the config's "added_tokens_decoder" that differs
    from the backend's, then each special token whose string is not an added token yet, as a special
    AddedToken: it is then matched whole in text and skipped by decode(skip_special_tokens=True).
    """
    declared = config.get("added_tokens_decoder") or {}
    path = CONFIG_FILE
    wanted: list[AddedToken] = []
    for index, entry in sorted(declared.items(), key=lambda item: int(item[0])):
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise UserError(f"{path}, key 'added_tokens_decoder'.{index}: expected an object with 'content'")
        fields = {k: v for k, v in entry.items() if k in ("content", "single_word", "lstrip", "rstrip",
                                                            "normalized", "special")}
        wanted.append(AddedToken(**fields))
    present = {repr(t) for t in backend.get_added_tokens_decoder().values()}
    to_add = [t for t in wanted if repr(t) not in present]
    known = {t.content for t in backend.get_added_tokens_decoder().values()} | {t.content for t in to_add}
    by_content = {t.content: t for t in wanted}
    for token in [*special_tokens.values(), *extra_special_tokens]:
        if token not in known:
            to_add.append(by_content.get(token) or AddedToken(token, special=True))
            known.add(token)
    if to_add:
        backend.add_tokens(to_add)


def _read_chat_templates(folder: Path, config: dict) -> tuple[str | dict[str, str] | None, str]:
    """The chat template(s) and where they came from (for error messages).

    As transformers (PreTrainedTokenizerBase._from_pretrained): chat_template.jinja and
    additional_chat_templates/*.jinja, when present, replace the config's "chat_template" entirely;
    a config list [{"name": ..., "template": ...}] becomes a dict of named templates.
    """
    templates: dict[str, str] = {}
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    extra_dir = folder / CHAT_TEMPLATE_DIR
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        source = folder / (CHAT_TEMPLATE_FILE if "default" in templates else CHAT_TEMPLATE_DIR)
        return (templates["default"] if list(templates) == ["default"] else templates), str(source)

    value = config.get("chat_template")
    source = str(folder / CONFIG_FILE)
    if value is None or isinstance(value, str):
        return value, source
    if isinstance(value, list) and all(isinstance(t, dict) and "name" in t and "template" in t for t in value):
        return {t["name"]: t["template"] for t in value}, source
    raise UserError(f"{source}, key 'chat_template': expected a string or a list of "
                    f'{{"name": ..., "template": ...}} objects')


# ---------------------------------------------------------------- chat template rendering

class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` renders its body as is.

    Some templates mark assistant text with it for transformers' assistant-token masks; without the
    tag defined they would not even compile.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _template_environment(source: str) -> ImmutableSandboxedEnvironment:
    """The Jinja environment transformers renders chat templates in (utils/chat_template_utils.py).

    Templates come from the hub, so they run sandboxed and cannot change their inputs. trim_blocks and
    lstrip_blocks drop the newlines and indentation around {% ... %} tags; loopcontrols allows
    {% break %}; tojson does not escape HTML and keeps non-ASCII text as it is.
    """
    def raise_exception(message):
        raise ChatTemplateError(f"{source}: the chat template raised an error: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


@lru_cache(maxsize=32)
def _compile_chat_template(template: str, source: str) -> jinja2.Template:
    try:
        return _template_environment(source).from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{source}: chat template line {e.lineno}: {e.message}") from None


def _plain(value: Any) -> Any:
    """A copy made of dicts, lists and scalars, so the template sees plain data only."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Messages as transformers hands them to templates (apply_chat_template, render_jinja_template).

    Keys whose value is None are dropped (templates handle a missing key, not a None), and a
    reasoning text given under any of its names is exposed as both "reasoning_content" and "thinking".
    """
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"message {i}: expected a dict with 'role' and 'content', got {message!r}")
        if not isinstance(message.get("role"), str):  # a template would skip the message without a word
            raise UserError(f"message {i}: expected a 'role' string (system, user, assistant, ...); "
                            f"got {message.get('role')!r} (keys {sorted(map(str, message))})")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list, Mapping)):
            raise UserError(f"message {i}: 'content' must be a string (or a list of parts); got "
                            f"{type(content).__name__} {content!r}")
        message = {k: _plain(v) for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _check_tools(tools: Any) -> None:
    """Tools must be JSON schemas. transformers also takes Python functions and writes their schema from the
    type hints and docstring (utils.get_json_schema); minitune asks for the schema instead of guessing it."""
    if tools is None:
        return
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Iterable):
        raise TypeError(f"apply_chat_template: tools must be a list of JSON schemas, got a {type(tools).__name__}")
    for i, tool in enumerate(tools):
        if callable(tool):
            raise UserError(f"apply_chat_template: tools[{i}] is a function ({getattr(tool, '__name__', tool)}); "
                            "pass its JSON schema, {'type': 'function', 'function': {'name': ..., 'description': "
                            "..., 'parameters': {...}}} (transformers.utils.get_json_schema(fn) writes one)")
        if not isinstance(tool, Mapping):
            raise UserError(f"apply_chat_template: tools[{i}] is a {type(tool).__name__}, expected a JSON schema dict")


# transformers' marker for continue_final_message (render_jinja_template): it goes at the end of the final
# message, and the rendered chat is cut where it lands, which drops whatever the template closes the turn with.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _mark_final_message(messages: list[dict], field: bool | str, template: str) -> str:
    """Append the marker to the final message's `field` ("content" for True) and return the text it follows.

    As transformers: a reasoning field is marked under every name it was copied to (see _normalize_messages),
    and in a list of content blocks, the last block with text is marked. `messages` is our own copy.
    """
    field = field if isinstance(field, str) else "content"
    final = messages[-1].get(field)
    if final is None:
        raise ValueError(f"continue_final_message: the final message has no {field!r} to continue")
    fields = [k for k in _REASONING_KEYS if messages[-1].get(k) == final] if field in _REASONING_KEYS else [field]
    if not any(k in template for k in fields):
        raise ValueError(f"continue_final_message={field!r}, but the chat template never reads that field")
    if isinstance(final, (list, tuple)):
        block = next((b for b in reversed(final) if isinstance(b, Mapping) and "text" in b), None)
        if block is None:
            raise ValueError("continue_final_message: the final message has no text block to continue")
        final, block["text"] = block["text"], block["text"] + _CONTINUE_TAG
    else:
        for k in fields:
            messages[-1][k] = messages[-1][k] + _CONTINUE_TAG
    return final


def _cut_at_mark(text: str, final: str) -> str:
    """The rendered chat up to the marker: the final message, left open."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise ValueError("continue_final_message: the chat template did not write the final message as given, so "
                         f"there is no place to continue it from (final message: {final.strip()[:80]!r})")
    cut = text.rindex(tag)
    if text[cut:cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:cut]
    return text[:cut].rstrip()  # the template trimmed the message, and the marker's space with it: trim the rest


# ---------------------------------------------------------------- saving helpers

def _dump_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _template_files(chat_template: str | dict[str, str] | None) -> dict[str, str]:
    """Relative file name -> text for the chat template(s), in transformers' current layout."""
    if chat_template is None:
        return {}
    if isinstance(chat_template, str):
        return {CHAT_TEMPLATE_FILE: chat_template}
    return {(CHAT_TEMPLATE_FILE if name == "default" else f"{CHAT_TEMPLATE_DIR}/{name}.jinja"): text
            for name, text in chat_template.items()}
