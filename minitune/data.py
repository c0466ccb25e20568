"""Training data: JSONL files in, batches of LongTensors out.

The whole path of an SFT example, each step a small function you can call on its own:

    records = read_jsonl("train.jsonl")                  # dicts; a bad line is an error naming file:line
    example = encode_sft(record, tok, max_length=512)    # {"input_ids", "labels"}: labels -100 off the answer
    rows = pack(examples, max_length=512)                # optional: several whole examples per row
    batch = collate(rows_or_examples, pad_id)            # (B, T) tensors for the model and the loss

`load_sft` does the first two for a file, `encode_records` for records already read. `train_val_split`,
`epoch_order`, `step_indices` and `shard` decide which examples a run sees, in which order, on which
rank, from seeds only, so a resumed or multi-GPU run sees the same data as a straight single-process one.

Preference pairs (DPO) take the same path: `encode_preference` turns a text, conversational or Anthropic HH
record into {"chosen", "rejected"}, each an example as above (`load_preferences` for a file), and
`collate_preferences` stacks the chosen rows over the rejected ones, for one forward through the model.

Labels are aligned with input_ids, as in Hugging Face: the loss shifts them (minitune.losses), so the
label at position t is the target of position t - 1, and IGNORE_INDEX (-100) marks "no loss here".
Every data problem raises ValueError, and the message starts with where it is (file:line when known).
"""

from __future__ import annotations

import bisect
import functools
import json
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import jinja2
import torch

from .errors import UserError
from .losses import IGNORE_INDEX
from .tokenizer import Tokenizer

TRUNCATION_POLICIES = ("error", "drop", "left")


# ---------------------------------------------------------------- JSONL

def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each line of a JSONL file, numbered from 1 as editors number them.

    Blank (whitespace-only) lines are skipped: editors and `cat a.jsonl b.jsonl` leave them, and they
    hold no record. They still count for the line numbers, so an error points at the right line.
    A file with no record at all is an error: a run on zero examples is never what was meant.
    """
    path = Path(path)
    count = 0
    with open(path, "rb") as f:  # bytes, so that a bad UTF-8 sequence can be blamed on its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                                "expected one JSON object per line") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            count += 1
            yield lineno, record
    if count == 0:
        raise UserError(f"{path}: no records (the file is empty or holds only blank lines)")


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of a JSONL file (see iter_jsonl for the rules)."""
    return [record for _, record in iter_jsonl(path)]


# ---------------------------------------------------------------- SFT encoding

def encode_sft(record: dict, tok: Tokenizer, max_length: int, train_on_prompt: bool = False,
               truncation: str = "error", where: str = "") -> dict[str, list[int]] | None:
    """One SFT record as {"input_ids", "labels"}, or None when truncation="drop" drops it.

    Two formats: {"prompt", "completion"} is plain text, and {"messages": [...]} a chat rendered with
    the tokenizer's chat template. Labels copy input_ids on the answer (the completion and its EOS, or
    each assistant turn) and are -100 elsewhere, because the model should learn to answer, not to write
    questions; train_on_prompt=True labels every token. `where` (e.g. "train.jsonl:12") starts every
    error message.

    An example longer than max_length is handled by `truncation`:
      "error"  raise, naming the example, its length and the limit (the default: nothing is lost silently)
      "drop"   return None; the caller counts the drops
      "left"   cut tokens from the start, keeping BOS and every answer token; an error if those do not fit
    """
    _check_args(max_length, truncation)
    if not isinstance(record, dict):
        raise UserError(f"{_at(where)}expected an SFT record (a JSON object), got {type(record).__name__}")
    if "messages" in record and ("prompt" in record or "completion" in record):
        raise UserError(f"{_at(where)}has both 'messages' and 'prompt'/'completion'; give one or the other")
    if "messages" in record:
        ids, labels = encode_chat(_messages(record, where), tok, where)
    elif "prompt" in record or "completion" in record:
        prompt, completion = _string(record, "prompt", where), _string(record, "completion", where)
        ids, labels = encode_prompt_completion(prompt, completion, tok)
    else:
        raise UserError(f"{_at(where)}expected an SFT record with 'messages', or 'prompt' and 'completion'; "
                        f"got keys {sorted(record)}")
    if len(ids) > max_length:
        if truncation == "drop":
            return None
        if truncation == "error":
            raise UserError(f"{_at(where)}example is {len(ids)} tokens, longer than max_length={max_length} "
                            "(raise max_length, or pass truncation='drop' or 'left')")
        ids, labels = truncate_left(ids, labels, max_length, tok.bos_token_id, where)
    if train_on_prompt:
        labels = list(ids)
    return {"input_ids": ids, "labels": labels}


def encode_prompt_completion(prompt: str, completion: str, tok: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion + EOS, and labels that cover only the completion and EOS.

    The two texts are encoded separately, so the prompt's tokens are the ones a model sees at inference
    (where it is encoded alone and the model continues it). The prompt gets the tokenizer's special
    tokens (BOS for Mistral, none for GPT-2); the completion gets none, and EOS ends it so the model
    learns to stop. Write the separator (a space, a newline) into the prompt or the completion yourself.
    """
    if tok.eos_token_id is None:
        raise UserError(f"{tok!r} has no EOS token to end a completion with")
    prompt_ids = tok.encode(prompt)
    completion_ids = tok.encode(completion, add_special_tokens=False) + [tok.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def encode_chat(messages: list[dict], tok: Tokenizer, where: str = "") -> tuple[list[int], list[int]]:
    """Token ids of a chat rendered with the chat template, and labels that cover the assistant turns.

    The text of an assistant turn is found by rendering prefixes of the chat: it is what
    messages[:i+1] adds to messages[:i] with the generation prompt (the assistant header), i.e. the
    content and whatever the template writes after it up to the next turn (Zephyr: "</s>\\n"). That needs
    no knowledge of the template, only that it renders a prefix of a chat as a prefix of the whole
    chat; a template that does not (one that rewrites earlier turns, say) is an error, not a silent
    mis-masking. The full text is encoded once and the character spans mapped onto its tokens through
    the tokenizer's offsets, so token boundaries are those of the text the model trains on.

    A token belongs to the turn its last character is in (the end of its offsets). So a token that
    straddles the start of a turn (header text and the first answer text) is a target, as the model must
    produce it to answer. The end is also the one offset that stays exact when a tokenizer trims
    whitespace off its offsets (GPT-2 style ByteLevel trim_offsets gives a lone space token empty offsets
    at its end), and the special tokens the tokenizer adds (BOS) have empty offsets at 0, in no turn.
    """
    text, spans = _assistant_spans(messages, tok, where)
    ids, offsets = _encode_with_offsets(tok, text)
    labels = [IGNORE_INDEX] * len(ids)
    for t, (_, end) in enumerate(offsets):
        if any(span_start < end <= span_end for span_start, span_end in spans):
            labels[t] = ids[t]
    if all(label == IGNORE_INDEX for label in labels):
        raise UserError(f"{_at(where)}the chat template wrote no text for the assistant turns, nothing to train on")
    return ids, labels


def _assistant_spans(messages: list[dict], tok: Tokenizer, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the [start, end) character span of each assistant turn in it."""
    text = _render(tok, messages, False, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise UserError(f"{_at(where)}messages[0] is an assistant turn; a chat starts with a system or user turn")
        before = _render(tok, messages[:i], True, where)  # ends with the assistant header
        through = _render(tok, messages[: i + 1], False, where)
        if not (through.startswith(before) and text.startswith(through)):
            raise UserError(f"{_at(where)}the chat template does not render prefixes of this chat consistently: "
                            f"messages[:{i}] with the generation prompt, messages[:{i + 1}] and the whole chat "
                            "are not prefixes of each other, so the assistant turns cannot be located")
        spans.append((len(before), len(through)))
    if not spans:
        raise UserError(f"{_at(where)}no message has role 'assistant', nothing to train on")
    return text, spans


def _render(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except (ValueError, jinja2.TemplateError) as e:
        raise UserError(f"{_at(where)}{e}") from e


def _encode_with_offsets(tok: Tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` and their [start, end) character offsets, with exactly one BOS.

    The tokenizer adds its special tokens (BOS for Mistral) as tok.encode does. When the template
    already wrote the BOS text, the added one is dropped: the same rule as Tokenizer.encode, so the ids
    equal tok.encode(text).
    """
    encoding = tok.backend.encode(text)
    ids, offsets, added = encoding.ids, encoding.offsets, encoding.special_tokens_mask
    if len(ids) >= 2 and ids[0] == ids[1] == tok.bos_token_id and added[0] and not added[1]:
        ids, offsets = ids[1:], offsets[1:]
    return ids, offsets


def truncate_left(ids: list[int], labels: list[int], max_length: int, bos_id: int | None,
                  where: str = "") -> tuple[list[int], list[int]]:
    """Drop tokens from the start (after a leading BOS) until max_length tokens remain.

    Only prompt tokens may go: if an answer token would be cut, or the first answer token would lose
    the token before it (and with it its place as a target), it is an error, as the example cannot be
    trained on as written.
    """
    keep = 1 if bos_id is not None and ids and ids[0] == bos_id else 0
    cut = len(ids) - (max_length - keep)  # ids[keep:cut] go
    first = next(t for t, label in enumerate(labels) if label != IGNORE_INDEX)
    if cut >= first + keep:
        raise UserError(f"{_at(where)}example is {len(ids)} tokens, longer than max_length={max_length}, and its "
                        f"answer ({len(ids) - first} tokens from the first answer token on) does not fit even "
                        "after truncating the prompt from the left")
    return ids[:keep] + ids[cut:], labels[:keep] + labels[cut:]


def load_sft(path: str | Path, tok: Tokenizer, max_length: int, train_on_prompt: bool = False,
             truncation: str = "error") -> list[dict[str, list[int]]]:
    """encode_sft on every record of a JSONL file; errors name file:line (see encode_records)."""
    records = ((f"{path}:{lineno}", record) for lineno, record in iter_jsonl(path))
    return encode_records(records, tok, max_length, train_on_prompt, truncation, name=str(path))


def encode_records(records: Iterable[tuple[str, dict]], tok: Tokenizer, max_length: int,
                   train_on_prompt: bool = False, truncation: str = "error", name: str = "the data"
                   ) -> list[dict[str, list[int]]]:
    """encode_sft on (where, record) pairs, `where` being the record's "file:line" for error messages.

    Examples dropped by truncation="drop" are counted in a warning; dropping all of them is an error.
    """
    examples, dropped = [], 0
    for where, record in records:
        example = encode_sft(record, tok, max_length, train_on_prompt, truncation, where=where)
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    if not examples:
        raise UserError(f"{name}: all {dropped} examples are longer than max_length={max_length} and were dropped")
    if dropped:
        warnings.warn(f"{name}: dropped {dropped} of {dropped + len(examples)} examples longer than "
                      f"max_length={max_length}", stacklevel=2)
    return examples


def read_texts(path: str | Path) -> list[str]:
    """The "text" of every record of a raw-text JSONL file ({"text": str}); errors name file:line."""
    texts = []
    for lineno, record in iter_jsonl(path):
        if not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{lineno}: expected {{\"text\": str}}, got {record!r:.80}")
        texts.append(record["text"])
    return texts


def token_stream(tok: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Raw-text documents end to end as one LongTensor, each closed by EOS (and opened by BOS where the
    tokenizer adds one): the pre-training layout, cut into windows for language modelling."""
    ids = [i for ids in tok.batch_encode(list(texts)) for i in [*ids, tok.eos_token_id]]
    return torch.tensor(ids, dtype=torch.long)


def pad_id(tok: Tokenizer) -> int:
    """The id that fills padding: the tokenizer's pad token, else its EOS (Mistral and GPT-2 have no pad), else 0.
    Padding is masked out everywhere, so any id would do; these keep it a token the model knows."""
    if tok.pad_token_id is not None:
        return tok.pad_token_id
    return tok.eos_token_id if tok.eos_token_id is not None else 0


def _check_args(max_length: int, truncation: str) -> None:
    if truncation not in TRUNCATION_POLICIES:
        raise UserError(f"truncation={truncation!r}: expected one of {', '.join(TRUNCATION_POLICIES)}")
    if not isinstance(max_length, int) or max_length < 1:
        raise UserError(f"max_length={max_length!r}: expected a positive int")


def _at(where: str) -> str:
    return f"{where}: " if where else ""


def _string(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise UserError(f"{_at(where)}missing field '{key}'")
    if not isinstance(record[key], str):
        raise UserError(f"{_at(where)}field '{key}': expected a string, got {type(record[key]).__name__}")
    return record[key]


def _messages(record: dict, where: str, key: str = "messages") -> list[dict]:
    """record[key] checked to be a non-empty list of {"role": str, "content": str}; errors name key[i]."""
    messages = record[key]
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{_at(where)}field '{key}': expected a non-empty list of "
                        f"{{'role': ..., 'content': ...}} objects, got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{_at(where)}{key}[{i}]: expected an object, got {type(message).__name__}")
        for field in ("role", "content"):
            _string(message, field, f"{_at(where)}{key}[{i}]")
    return messages


# ---------------------------------------------------------------- preference encoding

PREFERENCE_TRUNCATION = ("error", "drop", "right")
HH_ASSISTANT = "\n\nAssistant:"  # what opens an assistant turn in Anthropic HH transcripts


def split_shared_prefix(chosen: str, rejected: str, where: str = "") -> tuple[str, str, str]:
    """(prompt, chosen answer, rejected answer) of an Anthropic HH record, which has no prompt field.

    HH records are whole transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...") that differ only in the last
    assistant turn, so the prompt is what they share: their longest common character prefix, cut back to
    just after the last "\\n\\nAssistant:" in it. The cut matters when the two answers start alike:
    "Assistant: I think" vs "Assistant: I don't" share " I ", and without the cut the answers would be
    "think" and "don't", the model never being trained to say "I". With no such marker (not a real HH
    transcript) the prefix is cut back to its last whitespace, so no shared word is split between prompt
    and answer; the whitespace goes with the answers, as the space after "Assistant:" does.

    Identical texts, and a prompt that comes out empty (or only whitespace), are errors: there is no
    pair to learn from, or nothing the answers respond to.
    """
    if chosen == rejected:
        raise UserError(f"{_at(where)}'chosen' and 'rejected' are identical; a preference pair needs two "
                        "different answers")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    shared = chosen[:n]
    marker = shared.rfind(HH_ASSISTANT)
    if marker >= 0:
        cut = marker + len(HH_ASSISTANT)
    else:
        cut = max((i for i, c in enumerate(shared) if c.isspace()), default=0)
    prompt = chosen[:cut]
    if not prompt.strip():
        raise UserError(f"{_at(where)}'chosen' and 'rejected' (with no 'prompt' field) share no prompt: their "
                        f"common start {shared!r:.60} holds no {HH_ASSISTANT!r} and no whole word; "
                        "give the prompt in a 'prompt' field")
    for key, answer in (("chosen", chosen[cut:]), ("rejected", rejected[cut:])):
        if "\n\nHuman:" in answer:
            raise UserError(f"{_at(where)}'{key}': the answer after the shared prompt holds a later Human turn: the "
                            "two transcripts differ before their last assistant turn, so they are not one pair")
    return prompt, chosen[cut:], rejected[cut:]


def preference_parts(record: dict, chat: bool = False, where: str = ""
                     ) -> tuple[str | list[dict], str | list[dict], str | list[dict]]:
    """(prompt, chosen, rejected) of a preference record: three strings (text) or three message lists.

    The formats, told apart by which fields there are and whether they hold strings or lists:
      {"prompt": str, "chosen": str, "rejected": str}          text; with chat=True made conversational: the
                                                                prompt a user turn, each answer an assistant turn
      {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}  conversational with an explicit prompt
      {"chosen": [msgs], "rejected": [msgs]}                    conversational, implicit prompt: the leading
                                                                messages both share; the rest are the answers
      {"chosen": str, "rejected": str}                          Anthropic HH: split_shared_prefix (stays text,
                                                                chat or not: its turns are already written out)
    Other fields (e.g. "check") are ignored. Every answer of a conversation must start with an assistant
    turn, since what follows the prompt is what the model is trained to write. A text answer may be empty:
    its EOS is still a target ("say nothing"). Chosen and rejected must differ.
    """
    if not isinstance(record, dict):
        raise UserError(f"{_at(where)}expected a preference record (a JSON object), got {type(record).__name__}")
    keys = ("prompt", "chosen", "rejected") if "prompt" in record else ("chosen", "rejected")
    values = [_text_or_messages(record, key, where) for key in keys]
    if len({type(value) for value in values}) > 1:
        got = ", ".join(f"'{key}' a {type(value).__name__}" for key, value in zip(keys, values, strict=True))
        raise UserError(f"{_at(where)}expected {_names(keys)} to be all strings (text) or all message lists "
                        f"(conversational), got {got}")
    if isinstance(values[0], str):
        if len(keys) == 2:
            return split_shared_prefix(*values, where=where)
        prompt, chosen, rejected = values
        _check_different(chosen, rejected, where)
        if chat:
            return ([{"role": "user", "content": prompt}], [{"role": "assistant", "content": chosen}],
                    [{"role": "assistant", "content": rejected}])
        return prompt, chosen, rejected
    lists = [_messages(record, where, key) for key in keys]
    if len(keys) == 3:
        prompt, chosen, rejected = lists
    else:
        prompt, chosen, rejected = _split_shared_messages(*lists, where)
    _check_different(chosen, rejected, where)
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        roles = [message["role"] for message in answer]
        if set(roles) != {"assistant"}:
            what = "the answer" if len(keys) == 3 else f"the answer (after the {len(prompt)} shared messages)"
            raise UserError(f"{_at(where)}field '{key}': {what} must be assistant turns only, got roles {roles} "
                            "(two conversations that differ before their last turn are not one preference pair)")
    return prompt, chosen, rejected


def _text_or_messages(record: dict, key: str, where: str) -> str | list:
    if key not in record:
        raise UserError(f"{_at(where)}missing field '{key}' (a preference record has 'chosen' and 'rejected', "
                        "and 'prompt' unless the two share it as a prefix)")
    if not isinstance(record[key], (str, list)):
        raise UserError(f"{_at(where)}field '{key}': expected a string or a list of messages, "
                        f"got {type(record[key]).__name__}")
    return record[key]


def _split_shared_messages(chosen: list[dict], rejected: list[dict], where: str
                           ) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen answer, rejected answer) of two conversations: the prompt is the longest run of
    leading messages they share."""
    _check_different(chosen, rejected, where)
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise UserError(f"{_at(where)}'chosen' and 'rejected' (with no 'prompt' field) differ from their first "
                        "message on, so there is no prompt; give the prompt in a 'prompt' field")
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) == n:
            raise UserError(f"{_at(where)}field '{key}': no answer: all its {n} messages are shared with the "
                            "other side, so they are the prompt")
    return chosen[:n], chosen[n:], rejected[n:]


def _check_different(chosen: str | list, rejected: str | list, where: str) -> None:
    if chosen == rejected:
        raise UserError(f"{_at(where)}'chosen' and 'rejected' are identical; a preference pair needs two "
                        "different answers")


def _names(keys: Sequence[str]) -> str:
    quoted = [f"'{key}'" for key in keys]
    return ", ".join(quoted[:-1]) + " and " + quoted[-1]


def encode_preference(record: dict, tok: Tokenizer, max_length: int, max_prompt_length: int | None = None,
                      truncation: str = "error", chat: bool = False, where: str = "") -> dict | None:
    """One preference record as {"chosen": {"input_ids", "labels"}, "rejected": {...}}, or None when dropped.

    Each side is the prompt followed by one answer, labelled like an SFT example (-100 on the prompt), so
    that the sum of the answer's token log-probs is what DPO compares; the prompt is the same on both sides.
      text            encode_prompt_completion(prompt, answer, tok): the prompt with the tokenizer's special
                      tokens (BOS for Mistral), the answer without, EOS appended.
      conversational  the chat template renders prompt + answer once, and the prompt alone with the generation
                      prompt (the assistant header), which must be a prefix of it. The whole text is encoded
                      once (exactly one BOS, even when the template writes the BOS text), so the tokens are the
                      ones generation sees; a token is an answer token when its last character is past the
                      prompt (encode_chat's rule). No EOS is appended: the template writes what ends a turn.

    Two limits, each explicit, applied in this order:
      max_prompt_length  (None: no limit) a longer prompt keeps its end, which is what the answer responds
                         to: a leading BOS stays, then the last max_prompt_length - 1 prompt tokens (without a
                         BOS, the last max_prompt_length). The prompt is the leading run of -100 labels.
      max_length         prompt + answer. A side that is longer is handled by `truncation`:
                           "error"  raise, naming where, the side, its length and the limit (the default)
                           "drop"   return None; the caller counts the drops
                           "right"  cut the end of the answer so each side fits (its EOS may go); an error if
                                    the prompt alone leaves no room for an answer token
    """
    _check_preference_args(max_length, max_prompt_length, truncation)
    prompt, chosen, rejected = preference_parts(record, chat, where)
    pair = {}
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(prompt, str):
            ids, labels = encode_prompt_completion(prompt, answer, tok)
        else:
            ids, labels = _encode_conversation(prompt, answer, tok, side, where)
        if max_prompt_length is not None:
            ids, labels = _truncate_prompt(ids, labels, max_prompt_length, tok.bos_token_id)
        if labels[0] != IGNORE_INDEX:  # position 0 predicts nothing: the answer's first token would go unscored
            raise UserError(f"{_at(where)}the prompt is empty and {tok!r} adds no BOS, so the {side} answer's first "
                            "token has no position to be predicted from; give a non-empty prompt")
        pair[side] = {"input_ids": ids, "labels": labels}
    too_long = [side for side, example in pair.items() if len(example["input_ids"]) > max_length]
    if not too_long:
        return pair
    if truncation == "drop":
        return None
    if truncation == "error":
        side = too_long[0]
        raise UserError(f"{_at(where)}the {side} side is {len(pair[side]['input_ids'])} tokens (prompt + answer), "
                        f"longer than max_length={max_length} (raise max_length, set max_prompt_length, "
                        "or pass truncation='drop' or 'right')")
    for side in too_long:
        pair[side] = _truncate_answer(pair[side], max_length, side, where)
    return pair


def _encode_conversation(prompt: list[dict], answer: list[dict], tok: Tokenizer, side: str, where: str
                         ) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer rendered with the chat template, labels on the answer's tokens."""
    text = _render(tok, prompt + answer, False, where)
    prompt_text = _render(tok, prompt, True, where)  # ends with the assistant header
    if not text.startswith(prompt_text):
        raise UserError(f"{_at(where)}the chat template does not render the prompt (with the generation prompt) "
                        f"as a prefix of the prompt followed by the '{side}' answer, so the answer cannot be "
                        "located")
    ids, offsets = _encode_with_offsets(tok, text)
    start = len(prompt_text)
    labels = [ids[t] if end > start else IGNORE_INDEX for t, (_, end) in enumerate(offsets)]
    if all(label == IGNORE_INDEX for label in labels):
        raise UserError(f"{_at(where)}the chat template wrote no text for the '{side}' answer, nothing to train on")
    return ids, labels


def _prompt_length(labels: list[int]) -> int:
    return next((t for t, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def _truncate_prompt(ids: list[int], labels: list[int], max_prompt_length: int, bos_id: int | None
                     ) -> tuple[list[int], list[int]]:
    """Keep a leading BOS and the last prompt tokens, max_prompt_length in all; the answer is untouched."""
    n = _prompt_length(labels)
    if n <= max_prompt_length:
        return ids, labels
    keep = 1 if bos_id is not None and ids and ids[0] == bos_id else 0
    cut = n - (max_prompt_length - keep)  # ids[keep:cut] go
    return ids[:keep] + ids[cut:], labels[:keep] + labels[cut:]


def _truncate_answer(example: dict[str, list[int]], max_length: int, side: str, where: str
                     ) -> dict[str, list[int]]:
    n = _prompt_length(example["labels"])
    if n >= max_length:
        raise UserError(f"{_at(where)}the {side} side's prompt alone is {n} tokens, leaving no room for an answer "
                        f"token within max_length={max_length} (set max_prompt_length below max_length, "
                        "or raise max_length)")
    return {"input_ids": example["input_ids"][:max_length], "labels": example["labels"][:max_length]}


def encode_preferences(records: Iterable[tuple[str, dict]], tok: Tokenizer, max_length: int,
                       max_prompt_length: int | None = None, truncation: str = "error", chat: bool = False,
                       name: str = "the data") -> list[dict]:
    """encode_preference on (where, record) pairs, `where` being the record's "file:line" for error messages.

    Pairs dropped by truncation="drop" are counted in a warning; dropping all of them is an error.
    """
    pairs, dropped = [], 0
    for where, record in records:
        pair = encode_preference(record, tok, max_length, max_prompt_length, truncation, chat, where=where)
        if pair is None:
            dropped += 1
        else:
            pairs.append(pair)
    if not pairs and not dropped:
        raise UserError(f"{name}: no preference pairs")
    if not pairs:
        raise UserError(f"{name}: all {dropped} preference pairs are longer than max_length={max_length} "
                        "and were dropped")
    if dropped:
        warnings.warn(f"{name}: dropped {dropped} of {dropped + len(pairs)} preference pairs longer than "
                      f"max_length={max_length}", stacklevel=2)
    return pairs


def load_preferences(path: str | Path, tok: Tokenizer, max_length: int, max_prompt_length: int | None = None,
                     truncation: str = "error", chat: bool = False) -> list[dict]:
    """encode_preference on every record of a JSONL file; errors name file:line (see encode_preferences)."""
    records = ((f"{path}:{lineno}", record) for lineno, record in iter_jsonl(path))
    return encode_preferences(records, tok, max_length, max_prompt_length, truncation, chat, name=str(path))


def collate_preferences(examples: Sequence[dict], pad_id: int, pack_length: int | None = None) -> dict[str, torch.Tensor]:
    """Encoded preference pairs as one batch, so that the policy scores both sides in one forward.

    The answers are 2B sequences: the chosen sides 0..B-1, then the rejected ones B..2B-1, in the examples'
    order, so per-sequence log-probs split as logps[:B], logps[B:]. Without pack_length each is a row of a
    (2B, T) batch, right-padded by collate. With it the sequences are packed (best-fit decreasing) into rows of
    pack_length tokens, and "sequence_ids" (R, T) says whose each token is (-1 on padding). "answer_tokens"
    (2B,) counts each sequence's labelled tokens (its length gives B without a look at the device).
    When the caller has attached "reference_logps" (a pair [chosen, rejected] of floats, precomputed with the
    reference model) to every example, the batch also has them as float32 (2B,) in the same order;
    some examples with and some without is an error, as the batch would need the reference model after all.
    """
    if not examples:
        raise ValueError("collate_preferences: no examples")
    with_reference = sum("reference_logps" in example for example in examples)
    if with_reference not in (0, len(examples)):
        raise ValueError(f"collate_preferences: {with_reference} of {len(examples)} examples have reference_logps; "
                         "precompute them for every example or for none")
    sequences = [{"input_ids": example[side]["input_ids"], "labels": example[side]["labels"]}
                 for side in ("chosen", "rejected") for example in examples]
    if pack_length is None:
        batch = collate(sequences, pad_id)
    else:
        batch = collate(pack([{**seq, "sequence_id": i} for i, seq in enumerate(sequences)], pack_length), pad_id)
    batch["answer_tokens"] = torch.tensor([sum(label != IGNORE_INDEX for label in seq["labels"][1:])
                                           for seq in sequences])  # (2B,): the first label is never a target
    if with_reference:
        pairs = [example["reference_logps"] for example in examples]
        for i, pair in enumerate(pairs):
            if len(pair) != 2:
                raise ValueError(f"collate_preferences: example {i}: reference_logps: expected a pair "
                                 f"[chosen, rejected], got {pair!r:.80}")
        batch["reference_logps"] = torch.tensor([float(pair[0]) for pair in pairs] +
                                                [float(pair[1]) for pair in pairs], dtype=torch.float32)  # (2B,)
    return batch


def _check_preference_args(max_length: int, max_prompt_length: int | None, truncation: str) -> None:
    if truncation not in PREFERENCE_TRUNCATION:
        raise UserError(f"truncation={truncation!r}: expected one of {', '.join(PREFERENCE_TRUNCATION)}")
    if not isinstance(max_length, int) or max_length < 1:
        raise UserError(f"max_length={max_length!r}: expected a positive int")
    if max_prompt_length is not None and (not isinstance(max_prompt_length, int)
                                          or not 0 < max_prompt_length < max_length):
        raise UserError(f"max_prompt_length={max_prompt_length!r}: expected None or a positive int below "
                        f"max_length={max_length}, so an answer token fits")


# ---------------------------------------------------------------- batches

def collate(examples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples (or packed rows) into (B, T) LongTensors.

    input_ids are padded with pad_id (a tokenizer without a pad token pads with its eos_token_id: the
    padding is masked out, so which id it is does not matter), labels with -100, attention_mask with 0.
    attention_mask is 1 on real tokens, or a packed row's segment ids (see pack). position_ids are
    in the batch only when the examples have them (packed rows), padded with 0. cu_seqlens (N + 1,)
    int32 are the bounds of the runs of equal attention_mask values in the flattened (B * T) batch
    (each example, each row's padding), computed here on the CPU: on a GPU the model attends within
    them without a mask, and without reading anything back.
    """
    if not examples:
        raise ValueError("collate: no examples")
    if pad_id is None:
        raise ValueError("collate: pad_id is None; for a tokenizer without a pad token pass its eos_token_id")
    with_positions = sum("position_ids" in example for example in examples)
    if with_positions not in (0, len(examples)):
        raise ValueError(f"collate: {with_positions} of {len(examples)} examples have position_ids; "
                         "packed rows and plain examples cannot share a batch")
    length = max(len(example["input_ids"]) for example in examples)
    batch = {
        "input_ids": _pad([example["input_ids"] for example in examples], length, pad_id),
        "labels": _pad([example["labels"] for example in examples], length, IGNORE_INDEX),
        "attention_mask": _pad([example.get("attention_mask", [1] * len(example["input_ids"]))
                                for example in examples], length, 0),
    }
    if with_positions:
        batch["position_ids"] = _pad([example["position_ids"] for example in examples], length, 0)
    if "sequence_ids" in examples[0]:  # packed preference sequences (collate_preferences)
        batch["sequence_ids"] = _pad([example["sequence_ids"] for example in examples], length, -1)
    batch["cu_seqlens"] = sequence_bounds(batch["attention_mask"])
    return batch


def sequence_bounds(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N + 1,) int32: where each run of equal mask values (an example, a row's padding) starts in the flattened
    (B, T) mask, and its end: flash attention's cu_seqlens. A run never crosses from one row into the next."""
    B, T = attention_mask.shape
    starts = torch.ones(B, T, dtype=torch.bool)
    starts[:, 1:] = attention_mask[:, 1:] != attention_mask[:, :-1]  # (B, T): the first token of a run
    return torch.cat([starts.reshape(-1).nonzero().flatten(), torch.tensor([B * T])]).to(torch.int32)


def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)  # (B, T)


def pack(examples: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Whole examples into rows of at most max_length tokens, by best-fit decreasing: the longest example
    first, each into the fullest row that still has room for it, a new row when none has. No example is ever
    split; a row keeps its examples in the order they went in. Each row has:
      input_ids       the examples' tokens, one after another
      labels          the examples' labels, with each example's first label set to -100: in its own
                      row the first token is never a target, and here it would be the target of the
                      previous example's last token
      attention_mask  the 1-based segment id of each token's example (1, 1, 1, 2, 2, 3, ...; 0 = padding)
      position_ids    restarting at 0 for each example
    A model that keeps attention inside each segment and uses these positions computes, for every
    example, the logits it computes for the example alone: the packed loss equals the unpacked one.
    """
    for i, example in enumerate(examples):
        if not 0 < len(example["input_ids"]) <= max_length:
            raise UserError(f"pack: example {i} is {len(example['input_ids'])} tokens; each example must have 1 to "
                            f"max_length={max_length}")
    rows: list[list[int]] = []  # the examples (indices) of each row
    room: list[tuple[int, int]] = []  # (tokens free, row), sorted: the first with enough is the best fit
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"])):  # stable: ties in order
        n = len(examples[i]["input_ids"])
        fit = bisect.bisect_left(room, (n, -1))
        if fit == len(room):
            rows.append([])
            free, row = max_length, len(rows) - 1
        else:
            free, row = room.pop(fit)
        rows[row].append(i)
        bisect.insort(room, (free - n, row))
    return [_pack_row([examples[i] for i in row]) for row in rows]


def packing_efficiency(rows: Sequence[dict[str, list[int]]], max_length: int) -> float:
    """The share of the rows' max_length slots that hold a token."""
    return sum(len(row["input_ids"]) for row in rows) / (len(rows) * max_length)


def _pack_row(examples: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    row = {"input_ids": [], "labels": [], "attention_mask": [], "position_ids": []}
    for segment, example in enumerate(examples, start=1):
        n = len(example["input_ids"])
        row["input_ids"] += example["input_ids"]
        row["labels"] += [IGNORE_INDEX] + example["labels"][1:]
        row["attention_mask"] += [segment] * n
        row["position_ids"] += range(n)
        if "sequence_id" in example:  # whose tokens these are (collate_preferences)
            row.setdefault("sequence_ids", []).extend([example["sequence_id"]] * n)
    return row


# ---------------------------------------------------------------- which examples, in which order, on which rank

def train_val_split(records: Sequence, val_fraction: float, seed: int) -> tuple[list, list]:
    """Split records into disjoint train and validation lists, the same way for the same seed.

    round(len(records) * val_fraction) records, chosen at random, go to validation; both lists keep
    the records' original order (shuffling is the epoch's business). The generator is a private
    random.Random(seed), so the split does not depend on, or disturb, any global random state.
    """
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction={val_fraction}: expected a fraction strictly between 0 and 1")
    n = len(records)
    n_val = round(n * val_fraction)
    if not 0 < n_val < n:
        raise UserError(f"train_val_split: val_fraction={val_fraction} of {n} records leaves a split empty")
    val = set(_permutation(n, random.Random(seed))[:n_val])
    train = [record for i, record in enumerate(records) if i not in val]
    return train, [record for i, record in enumerate(records) if i in val]


def read_splits(data: str | Path, val_data: str | Path | None, val_fraction: float, seed: int
                ) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """The training and held-out records as ("file:line", record) pairs, so that errors found later (while
    encoding) still name where a record came from: both files, or, without val_data, a seeded
    train_val_split of the training file."""
    records = [(f"{data}:{n}", r) for n, r in iter_jsonl(data)]
    if val_data:
        return records, [(f"{val_data}:{n}", r) for n, r in iter_jsonl(val_data)]
    return train_val_split(records, val_fraction, seed)


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The order in which an epoch visits examples 0..n-1: a permutation that depends on (seed, epoch) only.

    Nothing about the run's past is needed, so a run resumed at example `position` of epoch `epoch`
    continues with epoch_order(n, epoch, seed)[position:]. The generator is seeded with the pair (as a
    string) rather than seed + epoch, which would give seed 0's second epoch the order of seed 1's first.
    """
    return _permutation(n, random.Random(f"{seed}:{epoch}"))


def step_indices(n: int, step: int, per_step: int, seed: int) -> list[int]:
    """The examples (indices into 0..n-1) of optimizer step `step` (0-based), `per_step` of them.

    The run walks epoch_order(n, 0, seed), then epoch 1's order, and so on, per_step examples a step;
    a step that straddles two epochs ends one and starts the next. The data position is a function
    of the step alone, so a run resumed after step k simply asks for step k + 1.
    """
    if n < 1 or per_step < 1 or step < 0:
        raise ValueError(f"step_indices: need n >= 1, per_step >= 1 and step >= 0, got {n}, {per_step}, {step}")
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(i, n)
        out.append(_epoch_order_cached(n, epoch, seed)[offset])
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order_cached(n: int, epoch: int, seed: int) -> tuple[int, ...]:
    return tuple(epoch_order(n, epoch, seed))


def _permutation(n: int, rng: random.Random) -> list[int]:
    # Sorting by rng.random() keys rather than rng.shuffle: Python guarantees random() and seeding stay the
    # same across versions, not shuffle's algorithm, and the data order should not change with Python.
    keys = [rng.random() for _ in range(n)]
    return sorted(range(n), key=keys.__getitem__)


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The part of an epoch's order that data-parallel rank `rank` of `world_size` trains on.

    Strided: rank r takes positions r, r + W, r + 2W, ... With a per-rank batch of B, the k-th batch
    of every rank together is exactly indices[k*B*W : (k+1)*B*W], the k-th batch of one process with
    batch B*W, so the run sees the same data at each step whatever the world size (step_indices gives
    a step's global batch, whose size is a multiple of W). The last len(indices) % world_size
    indices are left out so every rank runs the same number of steps; a rank with one batch more would
    wait forever in the gradient all-reduce.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"shard: rank={rank} is not in [0, world_size={world_size})")
    usable = len(indices) - len(indices) % world_size
    return list(indices[rank:usable:world_size])
