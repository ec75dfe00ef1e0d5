"""The CLIP tokenizer and the text encoder, on known ids and on properties the golden case does not cover."""

import dataclasses

import pytest
import torch

from stablesr_min import tokenizer
from stablesr_min.config import TextConfig
from stablesr_min.text import TextEncoder
from stablesr_min.tokenizer import END_TOKEN, START_TOKEN, split_words, tokenize


def ids(prompt: str) -> list[int]:
    """The prompt's ids between the start and end tokens."""
    row = tokenize(prompt)[0].tolist()
    return row[1:row.index(END_TOKEN)]


def test_empty_prompt_needs_no_vocabulary(monkeypatch, tmp_path):
    monkeypatch.setattr(tokenizer, "VOCAB_PATH", tmp_path / "missing.txt.gz")
    tokenizer.default_tokenizer.cache_clear()
    expected = torch.zeros(2, 77, dtype=torch.long)
    expected[:, :2] = torch.tensor([START_TOKEN, END_TOKEN])
    assert torch.equal(tokenize(["", "  \n "]), expected)
    with pytest.raises(FileNotFoundError, match="missing.txt.gz"):
        tokenize("a cat")
    tokenizer.default_tokenizer.cache_clear()


def test_vocabulary_size():
    assert len(tokenizer.default_tokenizer().ids) == TextConfig().vocab_size == 49408


def test_known_clip_ids():
    assert ids("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert ids("A high-resolution photo, 4K!") == [320, 1400, 268, 9977, 1125, 267, 275, 330, 256]
    assert ids("dog") == [1929]
    assert ids("hello world") == [3306, 1002]


def test_shape_and_padding():
    tokens = tokenize(["a cat", "a photo of a cat"], context_length=10)
    assert tokens.dtype == torch.long and tokens.shape == (2, 10)
    assert tokens[0].tolist() == [START_TOKEN, 320, 2368, END_TOKEN] + [0] * 6


def test_long_prompt_is_truncated_with_end_token_last():
    tokens = tokenize("cat " * 100)
    assert tokens.shape == (1, 77)
    assert tokens[0, 0] == START_TOKEN and tokens[0, -1] == END_TOKEN
    assert (tokens[0, 1:-1] == 2368).all()


def test_cleanup_case_whitespace_html_and_typography():
    assert torch.equal(tokenize("A  &amp; B"), tokenize("a & b"))
    assert torch.equal(tokenize("  Tom &amp;amp; JERRY\t\n"), tokenize("tom & jerry"))
    assert torch.equal(tokenize("it\u2019s \u201cfine\u201d"), tokenize("it's \"fine\""))
    assert torch.equal(tokenize("\uff23\uff21\uff34\u3000\ufb01sh"), tokenize("cat fish"))
    assert torch.equal(tokenize("wait\x85 x\x00y"), tokenize("wait\u2026 xy"))  # C1 read as Windows-1252


def test_word_split():
    assert split_words("don't stop!!'s") == ["don", "'t", "stop", "!!'", "s"]
    assert split_words("m\u00b2 42") == ["m", "\u00b2", "4", "2"]  # every number character on its own
    assert split_words("caf\u00e9 \u00fcber") == ["caf\u00e9", "\u00fcber"]  # letters beyond ASCII
    assert split_words("<end_of_text>x") == ["<end_of_text>", "x"]


def test_special_token_text_maps_to_its_id():
    assert ids("<start_of_text>") == [START_TOKEN]


@pytest.mark.parametrize("bad", [None, 3, ["ok", 3], ["ok", b"bytes"]])
def test_non_string_prompt_is_refused(bad):
    with pytest.raises(TypeError, match="str"):
        tokenize(bad)


def small_encoder(layers: int, layer: str, state: dict | None = None) -> TextEncoder:
    cfg = TextConfig(vocab_size=49408, context_length=77, width=32, heads=4, layers=layers, layer=layer)
    encoder = TextEncoder(cfg)
    if state is None:
        torch.manual_seed(0)
        state = {k: torch.randn_like(v) * 0.2 for k, v in encoder.state_dict().items()}
    encoder.load_state_dict({k: v for k, v in state.items() if k in encoder.state_dict()})
    return encoder.eval()


@torch.inference_mode()
def test_penultimate_skips_exactly_the_last_block():
    last = small_encoder(3, "last")
    penultimate = small_encoder(3, "penultimate", last.state_dict())
    two_blocks = small_encoder(2, "last", last.state_dict())
    tokens = tokenize(["a photo of a cat", ""])
    assert not torch.allclose(last(tokens), penultimate(tokens))
    torch.testing.assert_close(penultimate(tokens), two_blocks(tokens), rtol=0, atol=0)


@torch.inference_mode()
def test_attention_is_causal():
    encoder = small_encoder(2, "penultimate")
    a, b = tokenize(["a photo of a cat", "a photo of a dog"])
    out = encoder(torch.stack([a, b]))
    assert out.shape == (2, 77, 32)
    first_difference = int((a != b).nonzero()[0])
    torch.testing.assert_close(out[0, :first_difference], out[1, :first_difference])
    assert not torch.allclose(out[0, first_difference:], out[1, first_difference:])


@torch.inference_mode()
def test_bad_shapes():
    encoder = small_encoder(2, "penultimate")
    with pytest.raises(ValueError, match="77"):
        encoder(torch.zeros(1, 76, dtype=torch.long))
    with pytest.raises(ValueError, match="layer"):
        TextEncoder(dataclasses.replace(TextConfig(), layer="pooled"))
