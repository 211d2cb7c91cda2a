"""A CLIP tokenizer with a small vocabulary written by us, so tiny models need no download.

Every printable ASCII character is a token (alone and as a word end), so any text tokenizes; each listed word
additionally gets BPE merges that build it left to right, so known words become single tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_clip_tokenizer(words: Iterable[str], model_max_length: int = 77) -> CLIPTokenizer:
    """A `CLIPTokenizer` whose vocabulary is the ASCII characters plus the given (lower-case) words."""
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    add(BOS)
    add(EOS)
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    for c in chars:
        add(c)
    for c in chars:
        add(c + "</w>")
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in sorted({w.lower() for w in words if w}):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for sym in symbols[1:]:
            pair = (current, sym)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            current += sym
            add(current)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
