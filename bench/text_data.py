"""Offline English text for the transformer benchmark, and the tokenizers that turn it into model inputs.

- `english_sentences`: sentences of the Python documentation that every CPython install carries: the
  help topics of `pydoc_data.topics` and the docstrings of the standard library's modules, classes and
  functions (read with `ast` from the source files, never imported). Paragraphs with code (`>>>`, `::`) are
  skipped; a sentence is kept when it starts with a capital, ends in . ! or ?, has 6-40 words and at least
  60% of them alphabetic. Deduplicated and sorted, so the set depends only on the Python version.
- `split`: disjoint seeded draws (calibration, held-out, ...) from one shuffle.
- `WordPieceTokenizer`: BERT's uncased tokenizer from a vocab.txt: text cleaning (control characters
  dropped, whitespace unified), CJK ideographs split apart, lower case, accents stripped (NFD without
  combining marks), splitting on whitespace and punctuation, then greedy longest-match-first WordPiece with
  `##` continuations ([UNK] for a word it cannot cover or longer than 100 characters); special tokens
  written in the text ([MASK], ...) map to their ids; [CLS] ... [SEP],
  truncated to the maximum length and padded with [PAD] (attention_mask 0) to a fixed length.
- `CharVocabulary`: the character-level vocabulary of the decoder's language-modelling task (printable
  ASCII and newline; anything else is one unknown symbol).
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
import unicodedata
from pathlib import Path

import numpy as np

_SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]")  # kept whole where they occur in text
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"“A-Z])")


# ------------------------------------------------------------------------------------------- sentences
def _docstrings() -> list[str]:
    """Docstrings of the standard library's top-level and package modules (tests excluded), in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if any(part.startswith("test") or part == "site-packages" for part in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text:
                    found.append(text)
    return found


def _sentences_of(text: str, min_words: int, max_words: int) -> list[str]:
    kept = []
    for paragraph in re.split(r"\n\s*\n", text):
        if ">>>" in paragraph or "::" in paragraph:
            continue
        for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
            words = sentence.split()
            if (min_words <= len(words) <= max_words and sentence[0].isupper() and sentence[-1] in ".!?"
                    and sum(word.isalpha() for word in words) >= 0.6 * len(words)):
                kept.append(sentence)
    return kept


def english_sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """Distinct sentences of the installed Python's help topics and standard-library docstrings, sorted."""
    from pydoc_data.topics import topics
    texts = [*topics.values(), *_docstrings()]
    return sorted({s for text in texts for s in _sentences_of(text, min_words, max_words)})


def split(items: list[str], sizes: list[int], seed: int) -> list[list[str]]:
    """Disjoint parts of the given sizes from one seeded shuffle (a size of -1: everything left)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    parts, first = [], 0
    for size in sizes:
        last = len(order) if size < 0 else first + size
        if last > len(order):
            raise ValueError(f"asked for {sum(max(s, 0) for s in sizes)} items, only {len(order)} available")
        parts.append(order[first:last])
        first = last
    return parts


# ------------------------------------------------------------------------------------------- WordPiece
def _is_punctuation(char: str) -> bool:
    code = ord(char)  # ASCII symbols count as punctuation although Unicode files some under S*
    return 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126 \
        or unicodedata.category(char).startswith("P")


def _is_cjk(code: int) -> bool:
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF
            or 0x2A700 <= code <= 0x2B73F or 0x2B740 <= code <= 0x2B81F or 0x2B820 <= code <= 0x2CEAF
            or 0xF900 <= code <= 0xFAFF or 0x2F800 <= code <= 0x2FA1F)


def _normalise(text: str) -> str:
    """Cleaned, CJK-spaced, lower-cased text without accents."""
    pieces = []
    for char in text:
        code = ord(char)
        if code in (0, 0xFFFD):
            continue
        category = unicodedata.category(char)
        if char in " \t\n\r" or category == "Zs":
            pieces.append(" ")
        elif category.startswith("C"):
            continue
        elif _is_cjk(code):
            pieces.append(f" {char} ")
        else:
            pieces.append(char)
    decomposed = unicodedata.normalize("NFD", "".join(pieces).lower())
    return "".join(char for char in decomposed if unicodedata.category(char) != "Mn")


def _split_punctuation(word: str) -> list[str]:
    pieces: list[str] = []
    current = ""
    for char in word:
        if _is_punctuation(char):
            pieces += [current, char] if current else [char]
            current = ""
        else:
            current += char
    return pieces + ([current] if current else [])


class WordPieceTokenizer:
    """BERT's uncased WordPiece tokenizer over the vocabulary of a vocab.txt (one token a line, id = line)."""

    def __init__(self, vocab_path: str | Path, max_length: int = 128, max_word_chars: int = 100) -> None:
        tokens = Path(vocab_path).read_text(encoding="utf-8").split("\n")
        self.vocab = {token: index for index, token in enumerate(tokens) if token}
        self.max_length, self.max_word_chars = max_length, max_word_chars
        self.cls, self.sep, self.pad, self.unk = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))
        specials = [token for token in _SPECIAL_TOKENS if token in self.vocab]
        self._specials = re.compile("(" + "|".join(re.escape(token) for token in specials) + ")")

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > self.max_word_chars:
            return [self.unk]
        pieces, first = [], 0
        while first < len(word):
            last = len(word)
            while last > first:
                piece = word[first:last] if first == 0 else "##" + word[first:last]
                if piece in self.vocab:
                    pieces.append(self.vocab[piece])
                    break
                last -= 1
            if last == first:
                return [self.unk]
            first = last
        return pieces

    def encode(self, text: str) -> list[int]:
        """[CLS] word pieces [SEP], truncated to max_length."""
        ids = []
        for index, chunk in enumerate(self._specials.split(text)):  # odd indices: the special tokens
            ids += [self.vocab[chunk]] if index % 2 else [
                piece for word in _normalise(chunk).split() for part in _split_punctuation(word)
                for piece in self._wordpiece(part)]
        return [self.cls, *ids[:self.max_length - 2], self.sep]

    def batch(self, texts: list[str], length: int | None = None) -> dict[str, np.ndarray]:
        """input_ids and attention_mask, int64 [len(texts), length] (default: the longest encoding)."""
        encoded = [self.encode(text) for text in texts]
        length = length or max(len(ids) for ids in encoded)
        input_ids = np.full((len(texts), length), self.pad, dtype=np.int64)
        attention_mask = np.zeros((len(texts), length), dtype=np.int64)
        for row, ids in enumerate(encoded):
            ids = ids[:length]
            input_ids[row, :len(ids)] = ids
            attention_mask[row, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


# ------------------------------------------------------------------------------------------ characters
class CharVocabulary:
    """id 0: any character outside the set; 1: newline; 2..: printable ASCII (space to tilde)."""

    def __init__(self) -> None:
        self.chars = ["\n", *(chr(code) for code in range(32, 127))]
        self.ids = {char: index + 1 for index, char in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> np.ndarray:
        return np.array([self.ids.get(char, 0) for char in text], dtype=np.int64)


def windows(stream: np.ndarray, length: int, count: int, seed: int | None) -> np.ndarray:
    """`count` windows of `length` + 1 ids: seeded random starts, or consecutive non-overlapping windows
    from the start with `seed=None` (for held-out perplexity)."""
    if seed is None:
        starts = np.arange(count) * length
    else:
        starts = np.random.default_rng(seed).integers(0, len(stream) - length - 1, size=count)
    if starts.max() + length + 1 > len(stream):
        raise ValueError(f"{count} windows of {length} need more than the {len(stream)} ids of the text")
    return np.stack([stream[start:start + length + 1] for start in starts])
