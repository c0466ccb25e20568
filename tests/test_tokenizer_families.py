"""Llama 3.x and Qwen2.5/Qwen3 tokenizers: minitune against transformers' AutoTokenizer, on tiny look-alikes.

The real tokenizer files are not available offline, so each family's folder is rebuilt here in miniature: a
small byte-level BPE with the family's pre-tokenizer, the family's special tokens as added tokens at the end
of the vocabulary, its post-processor (Llama 3 puts <|begin_of_text|> in front; Qwen adds nothing), a
tokenizer_config.json with the special tokens the real one names, and the real chat template, verbatim.
transformers is the oracle: ids, decoded text and rendered chats must be equal (except the documented one:
minitune never doubles BOS).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import jinja2
import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import minitune.tokenizer
from minitune.errors import UserError
from minitune.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
import transformers.utils.chat_template_utils  # noqa: E402  (its strftime_now is frozen below)

# ---------------------------------------------------------------- the real chat templates (test data)
# Public model metadata, byte for byte: the "chat_template" of each model's tokenizer_config.json on the Hub.
# Copied from huggingface/trl, trl/chat_templates/{llama3,llama3_1,llama3_2,qwen2_5,qwen3}.jinja (commit
# f2cd577), which TRL keeps as the "original" templates it recognises these models by (equality with
# tokenizer.chat_template). Cross-checked, equal byte for byte, against guidance-ai/guidance, guidance/chat.py
# (Meta-Llama-3-8B-Instruct, Llama 3.2, Qwen2.5-0.5B-Instruct@7ae5576 and Qwen3-8B), and for Llama 3.1 against
# copies of Llama-3.1-8B-Instruct's string in other public code. Llama 3.1 writes a fixed date, 3.2 today's
# (strftime_now); Qwen2.5-7B-Instruct ships the same template as the 0.5B.
# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3_TEMPLATE = r'''{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>

'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>

' }}{% endif %}'''

# meta-llama/Llama-3.1-8B-Instruct
LLAMA31_TEMPLATE = r'''{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
'''

# meta-llama/Llama-3.2-1B-Instruct
LLAMA32_TEMPLATE = r'''{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
'''

# Qwen/Qwen2.5-7B-Instruct
QWEN25_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''

# Qwen/Qwen3-8B
QWEN3_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}'''

# ---------------------------------------------------------------- tiny look-alike folders

# The pre-tokenizer regexes of the real tokenizer.json files (Llama 3 groups digits by three, Qwen splits each)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")

# Llama 3.1's first added tokens (ids 128000-128010 there; the rest are reserved), all special
LLAMA3_ADDED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
# Qwen2.5's added tokens (ids 151643-151664) and whether each is special; Qwen3 adds four more, none special
QWEN25_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
                ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
                ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True),
                ("<|vision_end|>", True), ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
                ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
                ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False)]
QWEN3_ADDED = [*QWEN25_ADDED, ("<tool_response>", False), ("</tool_response>", False), ("<think>", False),
               ("</think>", False)]

CORPUS = [
    "You are a helpful assistant. You are Qwen, created by Alibaba Cloud.",
    "What is the weather in Paris today? It is sunny, 21 degrees.",
    "Cutting Knowledge Date: December 2023. Today Date: 26 Jul 2024.",
    "Given the following functions, please respond with a JSON for a function call.",
    '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
    "The user asks about the weather, so I should call the tool first. Let me think.",
    "Hello! How can I help you today? 123 4567 89",
    "  indented\n\tline\n\nnew paragraph, émojis 🤗 and 世界",
]


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False), encoding="utf-8")


def decoder_entry(content: str, special: bool = True) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def train_bpe(tok: Tokenizer, added: list[tuple[str, bool]]) -> dict:
    """Train `tok` on CORPUS, then append the family's added tokens in order; their added_tokens_decoder."""
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    for content, special in added:  # one at a time, so ids follow the real order
        token = AddedToken(content, special=special, normalized=False)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    return {str(tok.token_to_id(c)): decoder_entry(c, special) for c, special in added}


def build_llama3(folder: Path, chat_template: str, eos_token: str = "<|eot_id|>") -> Path:
    """Llama 3.x's layout: ByteLevel BPE, BOS added by a TemplateProcessing post-processor, eos <|eot_id|>
    (the Instruct models; the base ones use <|end_of_text|>), no pad token, PreTrainedTokenizerFast."""
    folder.mkdir(parents=True)
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    added_tokens_decoder = train_bpe(tok, [(t, True) for t in LLAMA3_ADDED])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.token_to_id(bos))])])
    tok.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", {
        "added_tokens_decoder": added_tokens_decoder, "bos_token": bos, "chat_template": chat_template,
        "clean_up_tokenization_spaces": True, "eos_token": eos_token,
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast"})
    stops = [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]  # generation_config's
    write_json(folder / "config.json", {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                        "bos_token_id": tok.token_to_id(bos), "eos_token_id": stops})
    return folder


def build_qwen(folder: Path, chat_template: str, added: list[tuple[str, bool]], model_type: str,
               eos_token: str = "<|im_end|>") -> Path:
    """Qwen2.5/Qwen3's layout: NFC + ByteLevel BPE, no BOS at all (bos_token null, nothing added on encode),
    eos <|im_end|> (Instruct; <|endoftext|> for the base models), pad <|endoftext|>, Qwen2Tokenizer."""
    folder.mkdir(parents=True)
    tok = Tokenizer(models.BPE(dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    added_tokens_decoder = train_bpe(tok, added)
    tok.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [c for c, special in added[1:] if special], "bos_token": None,
        "chat_template": chat_template, "clean_up_tokenization_spaces": False, "eos_token": eos_token,
        "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})
    write_json(folder / "config.json", {"model_type": model_type})
    return folder


def hf_tokenizer(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def pair(folder: Path):
    return load_tokenizer(folder), hf_tokenizer(folder)


@pytest.fixture(scope="module")
def llama31(tmp_path_factory):
    return pair(build_llama3(tmp_path_factory.mktemp("llama") / "llama-3.1-instruct", LLAMA31_TEMPLATE))


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    return pair(build_llama3(tmp_path_factory.mktemp("llama") / "llama-3.2-instruct", LLAMA32_TEMPLATE))


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    return pair(build_qwen(tmp_path_factory.mktemp("qwen") / "qwen2.5-instruct", QWEN25_TEMPLATE, QWEN25_ADDED,
                           "qwen2"))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return pair(build_qwen(tmp_path_factory.mktemp("qwen") / "qwen3", QWEN3_TEMPLATE, QWEN3_ADDED, "qwen3"))


@pytest.fixture
def frozen_today(monkeypatch):
    """strftime_now (both libraries read datetime.now()) on 5 March 2025, so that Llama 3.2's date is known."""
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2025, 3, 5, 9, 30)

    monkeypatch.setattr(minitune.tokenizer, "datetime", Frozen)
    monkeypatch.setattr(transformers.utils.chat_template_utils, "datetime", Frozen)
    return "05 Mar 2025"


# ---------------------------------------------------------------- conversations

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "What is the weather in Paris today?"}
ASSISTANT = {"role": "assistant", "content": "It is sunny, 21 degrees."}
CHAT = [SYSTEM, USER, ASSISTANT]
MULTI_TURN = [SYSTEM, USER, ASSISTANT, {"role": "user", "content": "  And tomorrow? émojis 🤗 and 世界\n"},
              {"role": "assistant", "content": "Rain, I am afraid."}, {"role": "user", "content": "Thanks!"}]
NO_SYSTEM = [USER]

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city — «today» or another day.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time now.",
                                              "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}
TOOL_CHAT = [SYSTEM, USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
             {"role": "tool", "content": '{"temperature": 21, "sky": "sunny"}'}]


def assert_same_chat(ours, theirs, messages, **kwargs) -> str:
    """The chat rendered and tokenized by both, equal; decoding its ids gives the text back. Returns the text."""
    text = ours.apply_chat_template(messages, **kwargs)
    assert text == theirs.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = ours.apply_chat_template(messages, tokenize=True, **kwargs)
    assert ids == theirs.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    return text


def assert_same_encode_decode(ours, theirs, texts) -> None:
    for text in texts:
        for add_special in (True, False):
            ids = theirs.encode(text, add_special_tokens=add_special)
            assert ours.encode(text, add_special_tokens=add_special) == ids, (text, add_special)
            assert ours.batch_encode([text], add_special_tokens=add_special) == [ids]
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
        assert ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


TEXTS = ["Hello world", "  leading spaces and trailing ", "line one\nline two\n\n\ttabbed", "12345678 digits",
         "émojis 🤗 and 世界", "Don't stop, we'll see", "", "mid <|eot_id|> and <|im_end|> tokens",
         "<think>\nreasoning\n</think>\n\nanswer", "<tool_call>\n{}\n</tool_call>"]


# ---------------------------------------------------------------- Llama 3.x

def test_llama3_special_tokens_and_bos_rule(llama31):
    """Llama 3 adds <|begin_of_text|> through its post-processor when special tokens are asked for."""
    ours, theirs = llama31
    assert_same_encode_decode(ours, theirs, TEXTS)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, name) == getattr(theirs, name), name
        assert getattr(ours, name + "_id") == getattr(theirs, name + "_id"), name
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|begin_of_text|>", "<|eot_id|>", None)
    assert ours.vocab_size == len(theirs)
    assert sorted(ours.all_special_ids) == sorted(theirs.all_special_ids)
    with_bos, without = ours.encode("Hello world"), ours.encode("Hello world", add_special_tokens=False)
    assert with_bos == [ours.bos_token_id, *without]
    assert ours.encode("<|eot_id|>", add_special_tokens=False) == [ours.token_to_id("<|eot_id|>")]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("messages", [CHAT, MULTI_TURN, NO_SYSTEM], ids=["chat", "multi_turn", "no_system"])
def test_llama31_chat_matches_transformers(llama31, messages, add_generation_prompt):
    ours, theirs = llama31
    assert_same_chat(ours, theirs, messages, add_generation_prompt=add_generation_prompt)


def test_llama31_renders_its_header_date_and_one_bos(llama31):
    ours, theirs = llama31
    text = assert_same_chat(ours, theirs, [SYSTEM, USER], add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
                    "You are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                    "What is the weather in Paris today?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "Today Date: 23 Jul 2024\n" in assert_same_chat(ours, theirs, CHAT, date_string="23 Jul 2024")
    ids = ours.apply_chat_template(CHAT, tokenize=True)
    assert ids.count(ours.bos_token_id) == 1 and ids[0] == ours.bos_token_id  # the template writes the BOS
    # encode() of the rendered text adds none on top (transformers would: the documented difference)
    assert ours.encode(text) == ours.encode(text, add_special_tokens=False) == theirs.encode(text)[1:]


@pytest.mark.parametrize("tools_in_user_message", [None, False])
def test_llama31_tools_match_transformers(llama31, tools_in_user_message):
    """Tools go into the first user message (the default) or into the system message, as tojson(indent=4)."""
    ours, theirs = llama31
    kwargs = {} if tools_in_user_message is None else {"tools_in_user_message": tools_in_user_message}
    text = assert_same_chat(ours, theirs, CHAT, tools=TOOLS, add_generation_prompt=True, **kwargs)
    assert "Environment: ipython\n" in text
    assert json.dumps(WEATHER_TOOL, indent=4, ensure_ascii=False) + "\n\n" in text  # non-ASCII kept as is
    assert_same_chat(ours, theirs, TOOL_CHAT, tools=TOOLS, add_generation_prompt=True, **kwargs)
    assert_same_chat(ours, theirs, TOOL_CHAT, custom_tools=TOOLS, **kwargs)


def test_llama31_builtin_tools_and_python_tag(llama31):
    """builtin_tools (a template variable) switch on ipython mode: <|python_tag|> calls ending in <|eom_id|>."""
    ours, theirs = llama31
    search = {"type": "function", "function": {"name": "brave_search", "arguments": {"query": "Paris weather"}}}
    chat = [SYSTEM, USER, {"role": "assistant", "tool_calls": [search]},
            {"role": "ipython", "content": {"results": ["sunny"]}}]
    builtin = ["brave_search", "wolfram_alpha", "code_interpreter"]
    text = assert_same_chat(ours, theirs, chat, builtin_tools=builtin, add_generation_prompt=True)
    assert "Tools: brave_search, wolfram_alpha\n\n" in text
    assert '<|python_tag|>brave_search.call(query="Paris weather")<|eom_id|>' in text
    assert_same_chat(ours, theirs, TOOL_CHAT, builtin_tools=builtin, tools=TOOLS)


def test_llama31_template_errors_match_transformers(llama31):
    ours, theirs = llama31
    two_calls = [USER, {"role": "assistant", "tool_calls": [CALL, CALL]}]
    for messages, kwargs, message in ((two_calls, {}, "only supports single tool-calls"),
                                      ([SYSTEM], {"tools": TOOLS}, "no first user message")):
        with pytest.raises(jinja2.TemplateError, match=message):
            ours.apply_chat_template(messages, **kwargs)
        with pytest.raises(jinja2.TemplateError, match=message):
            theirs.apply_chat_template(messages, tokenize=False, **kwargs)


def test_llama32_date_is_today(llama32, frozen_today):
    """Llama 3.2's template asks strftime_now("%d %b %Y"); date_string still wins."""
    ours, theirs = llama32
    for messages in (CHAT, NO_SYSTEM):
        text = assert_same_chat(ours, theirs, messages, add_generation_prompt=True)
        assert f"Today Date: {frozen_today}\n\n" in text
    assert_same_chat(ours, theirs, TOOL_CHAT, tools=TOOLS)
    assert "Today Date: 01 Jan 2025\n" in assert_same_chat(ours, theirs, CHAT, date_string="01 Jan 2025")


def test_llama32_date_without_freezing(llama32):
    """Unfrozen, both read the local clock (rendered again should midnight pass in between)."""
    ours, theirs = llama32
    for _ in range(2):
        text, reference = ours.apply_chat_template(NO_SYSTEM), theirs.apply_chat_template(NO_SYSTEM, tokenize=False)
        if text == reference:
            break
    assert text == reference
    assert re.search(r"\nToday Date: \d\d [A-Z][a-z]{2} \d{4}\n\n<\|eot_id\|>", text)


def test_llama3_original_template(tmp_path):
    """Meta-Llama-3-8B-Instruct's template: BOS in front of the first turn, every turn trimmed."""
    ours, theirs = pair(build_llama3(tmp_path / "llama-3-instruct", LLAMA3_TEMPLATE))
    for messages in (CHAT, MULTI_TURN):
        text = assert_same_chat(ours, theirs, messages, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are")
    assert "And tomorrow? émojis 🤗 and 世界<|eot_id|>" in text


def test_llama3_base_eos(tmp_path):
    ours, theirs = pair(build_llama3(tmp_path / "llama-3.1-base", LLAMA31_TEMPLATE, eos_token="<|end_of_text|>"))
    assert ours.eos_token == theirs.eos_token == "<|end_of_text|>"
    assert ours.eos_token_id == theirs.eos_token_id == ours.token_to_id("<|end_of_text|>")


# ---------------------------------------------------------------- Qwen2.5 (and the tokenizer Qwen3 shares)

def test_qwen_special_tokens_and_no_bos(qwen25, qwen3):
    """Qwen has no BOS: bos_token null, and encoding adds nothing with or without special tokens."""
    for ours, theirs in (qwen25, qwen3):
        assert_same_encode_decode(ours, theirs, TEXTS)
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            assert getattr(ours, name) == getattr(theirs, name), name
            assert getattr(ours, name + "_id") == getattr(theirs, name + "_id"), name
        assert (ours.bos_token, ours.bos_token_id) == (None, None)
        assert (ours.eos_token, ours.pad_token) == ("<|im_end|>", "<|endoftext|>")
        assert ours.vocab_size == len(theirs)
        assert sorted(ours.all_special_ids) == sorted(theirs.all_special_ids)
        assert ours.encode("Hello world") == ours.encode("Hello world", add_special_tokens=False)
        assert ours.encode("<tool_call>", add_special_tokens=False) == [ours.token_to_id("<tool_call>")]
        # <tool_call> is an added token but not a special one: decode keeps it even when skipping specials
        ids = ours.encode("<|im_start|>assistant\n<tool_call>\n{}\n</tool_call><|im_end|>")
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == \
            "assistant\n<tool_call>\n{}\n</tool_call>"


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("messages", [CHAT, MULTI_TURN, NO_SYSTEM], ids=["chat", "multi_turn", "no_system"])
def test_qwen25_chat_matches_transformers(qwen25, messages, add_generation_prompt):
    ours, theirs = qwen25
    assert_same_chat(ours, theirs, messages, add_generation_prompt=add_generation_prompt)


def test_qwen25_default_system_prompt(qwen25):
    ours, theirs = qwen25
    text = assert_same_chat(ours, theirs, NO_SYSTEM, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nWhat is the weather in Paris today?<|im_end|>\n"
                    "<|im_start|>assistant\n")


@pytest.mark.parametrize("messages", [NO_SYSTEM, TOOL_CHAT], ids=["question", "tool_call_and_results"])
def test_qwen25_tools_match_transformers(qwen25, messages):
    """Tools as one JSON line each (tojson: no HTML escaping, non-ASCII kept) inside <tools>; tool calls and
    consecutive tool results in one user turn."""
    ours, theirs = qwen25
    chat = [*messages, {"role": "tool", "content": "12:00"}] if messages is TOOL_CHAT else messages
    text = assert_same_chat(ours, theirs, chat, tools=TOOLS, add_generation_prompt=True)
    assert "\n" + json.dumps(WEATHER_TOOL, ensure_ascii=False) + "\n" in text
    if messages is TOOL_CHAT:
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n' in text
        assert "</tool_response>\n<tool_response>\n12:00\n</tool_response><|im_end|>" in text
    assert_same_chat(ours, theirs, chat)  # without tools: the tool turns still render


def test_qwen_base_eos(tmp_path):
    ours, theirs = pair(build_qwen(tmp_path / "qwen2.5-base", QWEN25_TEMPLATE, QWEN25_ADDED, "qwen2",
                                   eos_token="<|endoftext|>"))
    assert ours.eos_token == theirs.eos_token == ours.pad_token == "<|endoftext|>"
    assert ours.eos_token_id == theirs.eos_token_id == ours.pad_token_id == theirs.pad_token_id


# ---------------------------------------------------------------- Qwen3

@pytest.mark.parametrize("enable_thinking", [None, True, False])
@pytest.mark.parametrize("messages", [CHAT, MULTI_TURN, NO_SYSTEM], ids=["chat", "multi_turn", "no_system"])
def test_qwen3_chat_matches_transformers(qwen3, messages, enable_thinking):
    ours, theirs = qwen3
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    for add_generation_prompt in (False, True):
        assert_same_chat(ours, theirs, messages, add_generation_prompt=add_generation_prompt, **kwargs)


def test_qwen3_enable_thinking(qwen3):
    """enable_thinking=False writes an empty think block after the generation prompt; True or unset, nothing."""
    ours, theirs = qwen3
    prompt = "<|im_start|>user\nWhat is the weather in Paris today?<|im_end|>\n<|im_start|>assistant\n"
    assert assert_same_chat(ours, theirs, NO_SYSTEM, add_generation_prompt=True, enable_thinking=False) == \
        prompt + "<think>\n\n</think>\n\n"
    for kwargs in ({}, {"enable_thinking": True}):
        assert assert_same_chat(ours, theirs, NO_SYSTEM, add_generation_prompt=True, **kwargs) == prompt


REASONING = "The user asks about the weather, so I should call the tool first."


@pytest.mark.parametrize("key", ["reasoning_content", "thinking", "reasoning"])
def test_qwen3_reasoning_content(qwen3, key):
    """The last answer's reasoning is written in <think>; transformers takes it under any of its three names."""
    ours, theirs = qwen3
    chat = [SYSTEM, USER, {**ASSISTANT, key: REASONING}]
    text = assert_same_chat(ours, theirs, chat)
    assert text.endswith(f"<|im_start|>assistant\n<think>\n{REASONING}\n</think>\n\nIt is sunny, 21 degrees."
                         "<|im_end|>\n")


def test_qwen3_think_tags_in_content_and_history(qwen3):
    """<think>...</think> in an assistant's content is parsed out; it is kept after the last user query and
    dropped from earlier turns; an empty think block goes on the last answer only."""
    ours, theirs = qwen3
    thought = {"role": "assistant", "content": f"<think>\n{REASONING}\n</think>\n\nIt is sunny, 21 degrees."}
    for chat in ([USER, thought], [USER, thought, {"role": "user", "content": "Thanks!"}],
                 [USER, {**thought, "reasoning_content": "other"}],
                 [USER, thought, {"role": "user", "content": "Thanks!"}, {**ASSISTANT, "reasoning_content": "ok"}],
                 [USER, ASSISTANT, {"role": "user", "content": "Thanks!"}, ASSISTANT]):
        for add_generation_prompt in (False, True):
            for enable_thinking in (True, False):
                assert_same_chat(ours, theirs, chat, add_generation_prompt=add_generation_prompt,
                                 enable_thinking=enable_thinking)
    history = assert_same_chat(ours, theirs, [USER, thought, {"role": "user", "content": "Thanks!"}])
    assert "<think>" not in history and "<|im_start|>assistant\nIt is sunny" in history
    last = assert_same_chat(ours, theirs, [USER, ASSISTANT])
    assert last.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nIt is sunny, 21 degrees.<|im_end|>\n")


def test_qwen3_tools_and_multi_step_tool_calls(qwen3):
    """Tools in the system turn; reasoning stays on every assistant turn after the last real user query
    (tool results come back as user turns but do not count as queries); string arguments written as is."""
    ours, theirs = qwen3
    string_call = {"type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}
    chat = [SYSTEM, USER, {"role": "assistant", "content": "", "reasoning_content": REASONING, "tool_calls": [CALL]},
            {"role": "tool", "content": '{"temperature": 21}'},
            {"role": "assistant", "content": "Let me check the time.", "tool_calls": [string_call, CALL]},
            {"role": "tool", "content": "12:00"}, {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny at noon.", "reasoning_content": "Both tools answered."}]
    for tools in (TOOLS, None):
        for add_generation_prompt in (False, True):
            text = assert_same_chat(ours, theirs, chat, tools=tools, add_generation_prompt=add_generation_prompt)
    assert f"<think>\n{REASONING}\n</think>\n\n<tool_call>\n" in text
    assert '{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>\n<tool_call>' in text
    assert_same_chat(ours, theirs, chat[:-1], tools=TOOLS, add_generation_prompt=True, enable_thinking=False)


# ---------------------------------------------------------------- continuing the final message

def test_continue_final_message_matches_transformers(llama31, qwen25, qwen3):
    """A prefilled answer stays open (no <|eot_id|>/<|im_end|> after it), so that generation continues it."""
    prefill = [SYSTEM, USER, {"role": "assistant", "content": "It is "}]
    for (ours, theirs), end in ((llama31, "<|end_header_id|>\n\nIt is"),  # Llama trims each message
                                (qwen25, "<|im_start|>assistant\nIt is "),
                                (qwen3, "<|im_start|>assistant\n<think>\n\n</think>\n\nIt is ")):
        assert assert_same_chat(ours, theirs, prefill, continue_final_message=True).endswith(end)
        for bad in ({"add_generation_prompt": True}, {"continue_final_message": "reasoning_content"}):
            with pytest.raises(ValueError):
                ours.apply_chat_template(prefill, **{"continue_final_message": True, **bad})
            with pytest.raises(ValueError):
                theirs.apply_chat_template(prefill, tokenize=False, **{"continue_final_message": True, **bad})
    ours, theirs = qwen3
    thinking = [USER, {"role": "assistant", "content": "", "reasoning_content": "The user asks"}]
    text = assert_same_chat(ours, theirs, thinking, continue_final_message="reasoning_content")
    assert text.endswith("<|im_start|>assistant\n<think>\nThe user asks")


# ---------------------------------------------------------------- what minitune refuses

def test_python_functions_as_tools_are_refused_clearly(qwen25):
    """transformers turns a typed, documented Python function into a JSON schema; minitune takes the schema."""
    ours, _ = qwen25

    def get_weather(city: str) -> str:
        """Get the weather.

        Args:
            city: The city.
        """
        return "sunny"

    with pytest.raises(UserError, match=r"tools\[1\] is a function.*get_json_schema"):
        ours.apply_chat_template(NO_SYSTEM, tools=[WEATHER_TOOL, get_weather])
