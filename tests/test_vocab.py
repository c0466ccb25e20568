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
    size = model.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
    assert size % 64 == 0 and size >= len(tok) and size >= rows and model.config.vocab_size == size
    emb = model.input_embeddings().weight
    assert torch.equal(emb[:rows], old_embedding)
    torch.testing.assert_close(emb[rows:], old_embedding.mean(0).expand(size - rows, -1))
    assert model.head_is_tied == (name == "tiny-gpt2")
    if name == "tiny-mistral":
        torch.testing.assert_close(model.lm_head.weight[rows:], old_head.mean(0).expand(size - rows, -1))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[..., :rows], old_logits)  # old tokens' logits unchanged

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


def test_shrinking_is_refused():
    model = mt.load_model(ASSETS / "tiny-mistral")
    with pytest.raises(ValueError, match="fewer than the"):
        model.resize_token_embeddings(10)
