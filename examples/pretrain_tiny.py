"""Pre-train the bundled tiny models from scratch on the valley corpus (examples/data/source).

The simplest loop in the project: a byte-level BPE tokenizer trained with `tokenizers`, the corpus
as one long stream of tokens, random windows of it as batches, AdamW with warmup and cosine decay,
and the validation loss now and then. It writes two models in the Hugging Face layout, loadable by
`mt.load_model` and by transformers:

  examples/assets/tiny-gpt2     GPT-2: 256 learned positions (all of them trained), LayerNorm, tied head
  examples/assets/tiny-mistral  Mistral: RoPE, RMSNorm, grouped-query attention (4 query heads
                                share 2 key/value heads), a 128-token sliding window inside a
                                256-token training context (RoPE: positions up to 2048 work), untied
                                head, a Zephyr-style chat template

Each folder also gets pretraining.json: the seed, the steps, and the validation loss at
initialisation (a random model of the same shape) and at the end.

    python examples/pretrain_tiny.py                                    # both, about 11 minutes on 2 cores
    python examples/pretrain_tiny.py --models tiny-gpt2 --max-steps 20 --out /tmp/assets
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

import minitune as mt
from minitune.data import read_jsonl, read_texts, token_stream
from minitune.evaluate import stream_loss as validation_loss
from minitune.optim import make_optimizer, make_scheduler
from minitune.tokenizer import ZEPHYR_CHAT_TEMPLATE
from minitune.errors import UserError
from minitune.train import ArgumentParser, MetricsLog, run_main, warmup_steps

HERE = Path(__file__).resolve().parent

# Shapes: each checkpoint stays under 8 MB in float32. The vocabulary size is filled in from the tokenizer.
CONFIGS = {
    "tiny-gpt2": dict(model_type="gpt2", n_positions=256, n_embd=128, n_layer=4, n_head=4,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),  # no dropout: 1M params underfit
    "tiny-mistral": dict(model_type="mistral", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         sliding_window=128, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
}
# Special tokens as the real families have them: GPT-2 one <|endoftext|> for everything and no BOS
# added; Mistral <unk>, <s>, </s>, with <s> put in front of every text by the post-processor.
SPECIALS = {"gpt2": ["<|endoftext|>"], "mistral": ["<unk>", "<s>", "</s>"]}


def model_context(config: dict) -> int:
    """The longest input a model takes: GPT-2's learned positions, or the positions Mistral's RoPE is set for."""
    return config["n_positions"] if config["model_type"] == "gpt2" else config["max_position_embeddings"]


def train_tokenizer(texts: list[str], family: str, vocab_size: int, max_length: int) -> mt.Tokenizer:
    """A byte-level BPE (GPT-2's scheme: any byte sequence encodes, nothing is unknown) on `texts`."""
    specials = SPECIALS[family]
    backend = Backend(models.BPE(unk_token="<unk>" if family == "mistral" else None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    if family == "gpt2":
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        names = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        template = None
    else:
        bos = ("<s>", backend.token_to_id("<s>"))
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                               special_tokens=[bos])
        names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        template = ZEPHYR_CHAT_TEMPLATE  # writes no BOS; tok.encode of a rendered chat adds one
    config = {"model_max_length": max_length, "clean_up_tokenization_spaces": False}
    return mt.Tokenizer(backend, config, special_tokens=names, chat_template=template)


def build_model(name: str, tok: mt.Tokenizer) -> mt.models.CausalLM:
    raw = dict(CONFIGS[name], vocab_size=64 * math.ceil(len(tok) / 64),  # rows padded to a multiple of 64
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cls = mt.models.MODEL_CLASSES[raw["model_type"]]
    return cls(cls.config_class.from_dict(raw, source=f"CONFIGS[{name!r}]"))


def random_windows(stream: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """batch_size windows of seq_len tokens at random offsets (documents packed, as in GPT pre-training)."""
    starts = torch.randint(len(stream) - seq_len, (batch_size,), generator=gen)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])  # (B, T)


# Plain-text completions that state each fact, in the corpus's own wordings.
FACT_PROMPTS = {"town": ("{name} lives in", "{town}"), "job": ("By trade, {name} is a", "{job}"),
                "pet": ("{name} lives in {town}. {pron} keeps a", "{pet}"),
                "colour": ("The favourite colour of {name} is", "{colour}")}


def greedy_answer(model, tok: mt.Tokenizer, prompt: str, stop: list[int], max_new_tokens: int = 8) -> str:
    """The greedy continuation of `prompt`, up to the first token in `stop`."""
    ids = torch.tensor([tok.encode(prompt)])
    return tok.decode(mt.generate(model, ids, max_new_tokens, eos_token_id=stop)[0, ids.size(1):].tolist())


@torch.no_grad()
def valley_knowledge(model, tok: mt.Tokenizer, data: Path) -> dict:
    """What the model knows of the world in `data` (world.jsonl, eval/generation/test.jsonl), greedily:

    facts: how many of the people's towns, trades, pets and colours a plain-text completion gets right;
    book_exact_match: held-out test questions answered exactly in the question book's format (the
      question, a newline, the answer up to the next newline);
    chat_exact_match: the same questions through the chat template, where there is one.
    """
    model.eval()
    people = read_jsonl(data / "world.jsonl")
    newline = tok.encode("\n", add_special_tokens=False)
    facts = {}
    for fact, (prompt, answer) in FACT_PROMPTS.items():
        facts[fact] = sum(greedy_answer(model, tok, prompt.format(pron="She" if p["she"] else "He", **p), newline,
                                        max_new_tokens=4).strip().startswith(answer.format(**p)) for p in people)
    questions = read_jsonl(data / "eval" / "generation" / "test.jsonl")
    book = sum(mt.evaluate.exact_match(greedy_answer(model, tok, q["prompt"] + "\n", [*newline, tok.eos_token_id]),
                                       q["answer"])
               for q in questions)
    out = {"people": len(people), "facts": facts, "questions": len(questions), "book_exact_match": book}
    if tok.chat_template:
        chats = [tok.apply_chat_template([{"role": "user", "content": q["prompt"]}], add_generation_prompt=True)
                 for q in questions]
        out["chat_exact_match"] = sum(
            mt.evaluate.exact_match(greedy_answer(model, tok, c, [tok.eos_token_id]), q["answer"])
            for c, q in zip(chats, questions, strict=True))
    return out


def pretrain(name: str, args: argparse.Namespace, train_texts: list[str], val_texts: list[str]) -> dict:
    torch.manual_seed(args.seed)
    family = CONFIGS[name]["model_type"]
    context = model_context(CONFIGS[name])
    tok = train_tokenizer(train_texts, family, args.vocab_size, max_length=context)
    model = build_model(name, tok)
    train, val = token_stream(tok, train_texts), token_stream(tok, val_texts)
    if min(len(train), len(val)) <= args.seq_len or args.seq_len > context:
        raise UserError(f"--seq-len {args.seq_len} must be below the token count of the training ({len(train)}) "
                        f"and validation ({len(val)}) sets, and at most the model's context ({context})")
    print(f"{name}: {model.num_parameters():,} parameters, vocabulary {len(tok)} (rows {model.config.vocab_size}), "
          f"{len(train):,} training tokens", file=sys.stderr)

    optimizer = make_optimizer(model, lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    scheduler = make_scheduler(optimizer, "cosine", warmup_steps=warmup_steps(args.warmup, args.max_steps),
                               total_steps=args.max_steps, min_lr_ratio=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    metrics = MetricsLog(Path(args.log_dir) / name / "metrics.jsonl")
    metrics.write({"step": 0, "val_loss": validation_loss(model, val, args.seq_len)})  # a random model, this shape
    start = tick = time.perf_counter()
    model.train()
    for step in (bar := tqdm(range(1, args.max_steps + 1), desc=name, file=sys.stderr)):
        batch = random_windows(train, args.batch_size, args.seq_len, gen)
        loss = mt.losses.causal_lm_loss(model, batch)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % args.eval_every == 0 or step == args.max_steps:
            steps_done = step - metrics.records[-1]["step"]
            tokens_per_s = steps_done * batch.numel() / (time.perf_counter() - tick)
            metrics.write({"step": step, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                           "tokens_per_s": round(tokens_per_s), "val_loss": validation_loss(model, val, args.seq_len)})
            bar.write(json.dumps(metrics.records[-1]))
            tick = time.perf_counter()
    seconds = time.perf_counter() - start
    log = metrics.records  # the step-0 record is the random model's

    out = Path(args.out) / name
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    write_json(out / "generation_config.json", {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id})
    summary = {"model": name, "command": " ".join(["python examples/pretrain_tiny.py", *args.argv]),
               "seed": args.seed, "steps": args.max_steps, "batch_size": args.batch_size,
               "seq_len": args.seq_len, "lr": args.lr, "parameters": model.num_parameters(),
               "train_tokens": len(train), "train_seconds": round(seconds, 1),
               "val_loss_at_init": log[0]["val_loss"], "val_loss": log[-1]["val_loss"],
               "sample": args.prompt + greedy_answer(model, tok, args.prompt, [tok.eos_token_id], 48),
               "knowledge": valley_knowledge(model, tok, Path(args.world)),
               "log": log}
    write_json(out / "pretraining.json", summary)
    print(f"{name}: validation loss {summary['val_loss_at_init']:.3f} at init -> {summary['val_loss']:.3f} "
          f"after {args.max_steps} steps ({seconds:.0f} s)\n  {summary['sample']!r}\n  {summary['knowledge']}",
          file=sys.stderr)
    return summary


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(HERE / "data" / "source"), help="folder with train/validation.jsonl")
    parser.add_argument("--world", default=str(HERE / "data"),
                        help="folder with world.jsonl and eval/generation/test.jsonl, to measure what the model knows")
    parser.add_argument("--out", default=str(HERE / "assets"))
    parser.add_argument("--log-dir", default="runs/pretrain", help="metrics.jsonl of each model goes here")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--max-steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--vocab-size", type=int, default=2048, help="at most; BPE stops when no pair is left")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="One morning, Mira")
    parser.add_argument("--overwrite", action="store_true", help="replace models already in --out (the bundled ones)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in pretraining.json
    if min(args.max_steps, args.eval_every, args.batch_size, args.seq_len) < 1:
        parser.error("--max-steps, --eval-every, --batch-size and --seq-len must be at least 1")

    earlier = [str(path) for name in args.models for path in (Path(args.out) / name, Path(args.log_dir) / name)
               if path.exists()]
    if earlier and not args.overwrite:
        raise UserError(f"{', '.join(earlier)} hold an earlier pre-training: pass --overwrite to replace it, "
                        "or another --out and --log-dir")
    train_texts = read_texts(Path(args.data) / "train.jsonl")
    val_texts = read_texts(Path(args.data) / "validation.jsonl")
    for name in args.models:
        pretrain(name, args, train_texts, val_texts)


if __name__ == "__main__":
    run_main(main)
