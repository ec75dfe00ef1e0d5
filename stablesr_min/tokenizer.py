"""The CLIP byte-level BPE tokenizer, as OpenCLIP 2.0.2's `open_clip.tokenize` runs it for SD 2.x.

A prompt becomes `[start] + BPE ids + [end]`, zero-padded to 77 ids. On the way: clean the text (ftfy,
HTML entities twice, whitespace collapsed, lower case), split it into words, write each word's UTF-8 bytes
as printable characters, and merge those characters pair by pair in the order the vocabulary ranks them.

OpenCLIP needs `ftfy` and `regex`; this file uses the standard library only. Where that can differ is said
next to `fix_text` and `word_pattern`: in practice only for mojibake and exotic control characters.
The vocabulary (`bpe_simple_vocab_16e6.txt.gz`, MIT, from OpenCLIP) is read on first need only: the empty
prompt, which StableSR uses, never reads it.
"""

from __future__ import annotations

import functools
import gzip
import html
import re
import sys
import unicodedata
from pathlib import Path

import torch

VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
# CLIP uses the first 48894 merges of the file (it holds 262144): 512 byte symbols + 48894 merged symbols
# + 2 special tokens = 49408 ids.
NUM_MERGES = 48894
START_TOKEN = 49406  # "<start_of_text>": the id after the 256 + 256 byte symbols and the merges
END_TOKEN = 49407  # "<end_of_text>"
SPECIAL_TOKENS = {"<start_of_text>": START_TOKEN, "<end_of_text>": END_TOKEN}


# --------------------------------------------------------------------------------------------------
# Cleaning

# ftfy's fix_text, restricted to what changes ordinary text, applied in ftfy's order. C1 control
# characters are read as the Windows-1252 bytes they most likely were (the five bytes Windows-1252 leaves
# undefined stay). The ligature table is NFKC's decomposition, except that "ﬅ" keeps its long s.
UNDEFINED_IN_WINDOWS_1252 = (0x81, 0x8D, 0x8F, 0x90, 0x9D)
C1_AS_WINDOWS_1252 = str.maketrans(
    {chr(b): bytes([b]).decode("cp1252") for b in range(0x80, 0xA0) if b not in UNDEFINED_IN_WINDOWS_1252}
)
LATIN_LIGATURES = str.maketrans(
    {**{c: unicodedata.normalize("NFKC", c) for c in "ĲĳŉǱǲǳǄǅǆǇǈǉǊǋǌﬀﬁﬂﬃﬄﬆ"}, "ﬅ": "ſt"}
)
FULL_WIDTH = str.maketrans(
    {"\u3000": " "}
    | {chr(i): unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
       if unicodedata.normalize("NFKC", chr(i)) != chr(i)}
)
CURLY_QUOTES = str.maketrans(dict.fromkeys("\u02bc\u2018\u2019\u201a\u201b", "'")
                             | dict.fromkeys("\u201c\u201d\u201e\u201f", '"'))
CONTROL_CHARS = str.maketrans(dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
     *range(0xFFF9, 0xFFFD)]
))


def fix_text(text: str) -> str:
    """C1 controls as Windows-1252, Latin ligatures split, full-width forms narrowed, quotes
    straightened, control characters dropped, NFC.

    Unlike ftfy this does not repair mojibake ("cafÃ©" stays as it is) and leaves ANSI terminal escapes
    (only their ESC byte goes). HTML entities are decoded afterwards by `clean`, as OpenCLIP does after
    ftfy.
    """
    for table in (C1_AS_WINDOWS_1252, LATIN_LIGATURES, FULL_WIDTH, CURLY_QUOTES, CONTROL_CHARS):
        text = text.translate(table)
    return unicodedata.normalize("NFC", text)


def clean(text: str) -> str:
    text = html.unescape(html.unescape(fix_text(text)))
    # `re`'s \s (str.isspace) equals the `regex` module's (Unicode White_Space) once fix_text has
    # dropped U+001C..U+001F.
    return re.sub(r"\s+", " ", text).strip().lower()


# --------------------------------------------------------------------------------------------------
# Words


def unicode_class(major: str) -> str:
    """The body of a `re` character class: every code point whose Unicode category starts with `major`."""
    ranges: list[list[int]] = []
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp))[0] == major:
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
    return "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


@functools.cache
def word_pattern() -> re.Pattern:
    """CLIP's split: special tokens, English contractions, runs of letters, single number characters,
    runs of anything else that is not a space.

    OpenCLIP writes the letter and number classes as `\\p{L}` and `\\p{N}` of the `regex` module; `re`
    has no such classes, so they are spelled out from `unicodedata` (built once, about 0.1 s). They can
    differ only where the two libraries' Unicode versions do.
    """
    letters, numbers = unicode_class("L"), unicode_class("N")
    specials = "|".join(SPECIAL_TOKENS)
    return re.compile(
        rf"{specials}|'s|'t|'re|'ve|'m|'ll|'d|[{letters}]+|[{numbers}]|[^\s{letters}{numbers}]+",
        re.IGNORECASE,
    )


def split_words(text: str) -> list[str]:
    return word_pattern().findall(text)


# --------------------------------------------------------------------------------------------------
# Byte-level BPE


def byte_symbols() -> dict[int, str]:
    """One printable character per byte value; the dict's order is the vocabulary's.

    Printable Latin-1 bytes stand for themselves and come first; the 68 others (controls, space, soft
    hyphen, ...) are shifted to U+0100 onwards, so that no symbol is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(shifted)}


BYTE_TO_SYMBOL = byte_symbols()


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Join every non-overlapping occurrence of `pair`, left to right."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


class BPETokenizer:
    """The BPE vocabulary: 256 byte symbols, the same with the end-of-word mark `</w>`, then one symbol
    per merge rule (the rule's rank is its line in the file), then the two special tokens."""

    def __init__(self, vocab_path: str | Path = VOCAB_PATH):
        vocab_path = Path(vocab_path)
        if not vocab_path.is_file():
            raise FileNotFoundError(f"{vocab_path}: CLIP's BPE vocabulary is missing (stablesr_min ships it)")
        lines = gzip.decompress(vocab_path.read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0 is a header
        symbols = list(BYTE_TO_SYMBOL.values())
        symbols += [s + "</w>" for s in symbols]
        symbols += ["".join(pair) for pair in merges]
        self.ids = {s: i for i, s in enumerate(symbols)} | SPECIAL_TOKENS
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}

    def bpe(self, word: str) -> tuple[str, ...]:
        """Merge a word's symbols, always the best-ranked adjacent pair first, until no rule applies."""
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            symbols = merge_pair(symbols, best)
        return tuple(symbols)

    def encode_word(self, word: str) -> list[int]:
        if word in SPECIAL_TOKENS:
            return [SPECIAL_TOKENS[word]]
        chars = "".join(BYTE_TO_SYMBOL[b] for b in word.encode("utf-8"))
        return [self.ids[s] for s in self.bpe(chars)]


@functools.cache
def default_tokenizer() -> BPETokenizer:
    return BPETokenizer(VOCAB_PATH)


def encode(prompt: str) -> list[int]:
    """BPE ids of one prompt, without start/end tokens."""
    text = clean(prompt)
    if not text:  # nothing to look up: the vocabulary is not read
        return []
    tokenizer = default_tokenizer()
    return [i for word in split_words(text) for i in tokenizer.encode_word(word)]


def check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} must be a str, got {type(p).__name__}: {p!r}")
    return list(prompts)


def tokenize(prompts: str | list[str], context_length: int = 77) -> torch.LongTensor:
    """Prompts -> (B, context_length) ids: start, BPE ids, end, zeros. A prompt that is too long is cut,
    and its last kept id replaced by the end token."""
    prompts = check_prompts(prompts)
    if context_length < 2:
        raise ValueError(f"context_length must hold the start and end tokens, got {context_length}")
    tokens = torch.zeros(len(prompts), context_length, dtype=torch.long)
    for row, prompt in zip(tokens, prompts):
        ids = [START_TOKEN, *encode(prompt), END_TOKEN]
        if len(ids) > context_length:
            ids = ids[:context_length - 1] + [END_TOKEN]
        row[:len(ids)] = torch.tensor(ids)
    return tokens
