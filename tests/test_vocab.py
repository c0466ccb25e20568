"""Task-specific vocabulary: added tokens, a grown embedding (and untied head), saved so transformers loads both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import minitune as mt

ASSETS = Path(__file__).resolve().parents[1] / "examples" / "assets"
WORDS = ["saffron", "ramekin", "simmer"]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-mistral"])
def test_added_tokens_grow_the_model_and_save_in_a_layout_transformers_loads(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok, model = mt.load_tokenizer(ASSETS / name), mt.load_model(ASSETS / name).eval()
    before = len(tok)
    assert len(tok.encode("saffron", add_special_tokens=False)) > 1  # the valley never saw it: several pieces
    assert tok.add_tokens(WORDS) == 3 and tok.add_tokens(["saffron"]) == 0
    assert tok.add_tokens(["<|recipe|>"], special=True) == 1
    assert len(tok) == before + 4
    ids = tok.encode("a pinch of saffron in the ramekin", add_special_tokens=False)
    assert tok.token_to_id("saffron") in ids and tok.token_to_id("ramekin") in ids
    assert tok.decode(tok.encode("<|recipe|> simmer", add_special_tokens=False)).strip() == "simmer"

    rows = model.input_embeddings().num_embeddings
    old_embedding = model.input_embeddings().weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    x = torch.tensor([tok.encode("Mira lives in", add_special_tokens=True)])
    with torch.no_grad():
        old_logits = model(x)
    assert before < rows  # the bundled embeddings are padded past their tokenizers
    size = model.resize_token_embeddings(len(tok) + 40, pad_to_multiple_of=64, new_tokens_from=before)
    assert size == 1152 and model.config.vocab_size == size  # 1088 rows + 1: up to the next multiple of 64
    emb = model.input_embeddings().weight
    assert torch.equal(emb[:before], old_embedding[:before])
    torch.testing.assert_close(emb[before:], old_embedding[:before].mean(0).expand(size - before, -1))
    assert model.head_is_tied == (name == "tiny-gpt2")
    if name == "tiny-mistral":
        head = model.lm_head.weight
        torch.testing.assert_close(head[before:], old_head[:before].mean(0).expand(size - before, -1))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[..., :before], old_logits[..., :before])  # old tokens' logits kept

    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "a pinch of saffron <|recipe|> in the ramekin"
    assert their_tok(text)["input_ids"] == tok.encode(text)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, model(ids), atol=1e-5, rtol=1e-5)
    from tokenizers import Tokenizer as Backend
    assert Backend.from_file(str(tmp_path / "tokenizer.json")).token_to_id("ramekin") == tok.token_to_id("ramekin")


def test_appended_rows_start_at_the_mean_and_shrinking_is_refused():
    model = mt.load_model(ASSETS / "tiny-mistral")
    old = model.input_embeddings().weight.detach().clone()
    assert model.resize_token_embeddings(1090) == 1090
    torch.testing.assert_close(model.input_embeddings().weight[1088:], old.mean(0).expand(2, -1))
    with pytest.raises(ValueError, match="fewer than the"):
        model.resize_token_embeddings(10)
    with pytest.raises(ValueError, match="new_tokens_from=2000 must be in 1..1090"):
        model.resize_token_embeddings(1100, new_tokens_from=2000)
