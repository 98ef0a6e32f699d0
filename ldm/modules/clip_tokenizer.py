"""CLIP's byte-level BPE tokenizer, as Stable Diffusion v1 feeds its text encoder.

CompVis `FrozenCLIPEmbedder` calls Hugging Face's `CLIPTokenizer` for
openai/clip-vit-large-patch14 with `truncation=True, max_length=77, padding="max_length"`;
with `ftfy` installed (CompVis's environment has it, through OpenAI's CLIP package) that
tokenizer cleans text as OpenAI's does. So a prompt becomes:

    ftfy.fix_text -> whitespace runs to one space -> lower case
    -> pieces by CLIP's regex ('s 't 're 've 'm 'll 'd, letter runs, single digits, other runs)
    -> each piece's UTF-8 bytes as printable characters, merged by the BPE ranks
    -> [<|startoftext|>] + ids[:75] + [<|endoftext|>], padded with <|endoftext|> to 77

The one difference from OpenAI's `SimpleTokenizer`: it also un-escapes HTML entities, which
Hugging Face's tokenizer (and so every SD v1 model) leaves to ftfy; ftfy un-escapes them too,
unless the text holds a "<" ("a <b> &amp; c"). We follow SD there.

The vocabulary is OpenAI's `bpe_simple_vocab_16e6.txt.gz` (48,894 merges; 256 byte symbols,
their 256 word-final forms, one token per merge and the two specials: 49,408 ids). No hub: it
ships in the `open-clip-torch` wheel (installed with `--no-deps`), and its checksum is pinned.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import shutil
from functools import lru_cache
from pathlib import Path

import torch

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
VOCAB_ENV = "LDM_CLIP_VOCAB"  # a path to the .txt.gz, over the wheel's copy
VOCAB_SIZE = 49408
MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894 lines after the file's header line
START, END = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer: specials, English contractions, letter runs, one digit, other runs.
PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
           r"|[^\s\p{L}\p{N}]+")


def default_vocab_file() -> Path:
    """`$LDM_CLIP_VOCAB`, else the copy inside the installed `open_clip` package (found
    without importing it: its __init__ needs torchvision)."""
    env = os.environ.get(VOCAB_ENV)
    if env:
        return Path(env)
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError(f"no CLIP vocabulary: `pip install --no-deps open-clip-torch` "
                           f"(it ships {VOCAB_FILE}), or set ${VOCAB_ENV} to the file")
    return Path(spec.origin).parent / VOCAB_FILE


@lru_cache
def byte_symbols() -> tuple[str, ...]:
    """The printable character standing for each byte 0..255: printable Latin-1 bytes stand
    for themselves, the rest (controls, space) for characters from U+0100 up, in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return tuple(chr(b) if b in keep else chr(next(extra)) for b in range(256))


def read_merges(path: Path) -> list[tuple[str, str]]:
    """The BPE merges, best first, from the vocabulary file (its checksum checked)."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise ValueError(f"{path}: sha256 {digest} is not CLIP's {VOCAB_FILE} ({VOCAB_SHA256})")
    lines = gzip.decompress(data).decode("utf-8").split("\n")[1:MERGES + 1]
    return [tuple(line.split()) for line in lines]


class CLIPTokenizer:
    """Prompts -> CLIP ids (B, max_length), as Stable Diffusion v1's FrozenCLIPEmbedder."""

    def __init__(self, vocab_file: str | Path | None = None, max_length: int = 77):
        import regex

        self.vocab_file = Path(vocab_file) if vocab_file else default_vocab_file()
        if not self.vocab_file.is_file():
            raise FileNotFoundError(f"no CLIP vocabulary file {self.vocab_file}")
        merges = read_merges(self.vocab_file)
        symbols = sorted(byte_symbols())  # ids 0-255: the symbols in code point order
        tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges),
                  START, END]
        self.encoder = {t: i for i, t in enumerate(tokens)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.start_id, self.end_id = self.encoder[START], self.encoder[END]
        self.pattern = regex.compile(PATTERN, regex.IGNORECASE)
        self.max_length = max_length
        self._bpe = lru_cache(maxsize=1 << 16)(self._merge)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @staticmethod
    def clean(text: str) -> str:
        import ftfy

        return " ".join(ftfy.fix_text(text).split()).lower()

    def _merge(self, piece: str) -> tuple[str, ...]:
        """One pre-token (as byte symbols) -> its BPE tokens: merge the best-ranked adjacent
        pair everywhere, again and again, until no ranked pair is left."""
        word = (*piece[:-1], piece[-1] + "</w>")
        while len(word) > 1:
            pairs = set(zip(word, word[1:], strict=False))
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        """One text -> its ids, without the start/end tokens or padding."""
        symbols = byte_symbols()
        ids = []
        for piece in self.pattern.findall(self.clean(text)):
            if piece in (START, END):  # the specials, written out in a prompt
                ids.append(self.encoder[piece])
                continue
            as_symbols = "".join(symbols[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(as_symbols))
        return ids

    def tokenize(self, text: str | list[str]) -> tuple[torch.Tensor, list[bool]]:
        """Texts -> (input_ids LongTensor (B, max_length), truncated: one flag per text)."""
        texts = [text] if isinstance(text, str) else list(text)
        room = self.max_length - 2
        rows, truncated = [], []
        for t in texts:
            ids = self.encode(t)
            truncated.append(len(ids) > room)
            ids = [self.start_id, *ids[:room], self.end_id]
            rows.append(ids + [self.end_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(texts), self.max_length), \
            truncated

    def __call__(self, text: str | list[str]) -> torch.Tensor:
        return self.tokenize(text)[0]

    def save(self, folder: Path) -> None:
        """The vocabulary file, so `CLIPTokenizer(folder / VOCAB_FILE)` loads offline."""
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.vocab_file, folder / VOCAB_FILE)
