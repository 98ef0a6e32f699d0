"""The text encoder a config names, and its tokenizer: BERT (the paper's LDM) or CLIP (SD v1).

Both tokenizers answer `tokenize(texts) -> (ids (B, max_length), truncated flags)` and
`save(folder)`; `open_tokenizer(folder)` reads back what `save` wrote, offline.
"""
from __future__ import annotations

from pathlib import Path

from ldm.config import CLIPTextConfig, TextEncoderConfig
from ldm.modules.clip_tokenizer import VOCAB_FILE as CLIP_VOCAB_FILE
from ldm.modules.clip_tokenizer import CLIPTokenizer
from ldm.modules.text_encoder import BERTEmbedder, BERTTokenizer, load_bert_tokenizer

Tokenizer = BERTTokenizer | CLIPTokenizer


def make_text_encoder(cfg: TextEncoderConfig | CLIPTextConfig):
    """tau_theta for the config: BERTEmbedder or FrozenCLIPEmbedder."""
    if isinstance(cfg, CLIPTextConfig):
        from ldm.modules.clip_text import FrozenCLIPEmbedder

        return FrozenCLIPEmbedder(cfg)
    return BERTEmbedder(cfg)


def load_tokenizer(cfg: TextEncoderConfig | CLIPTextConfig) -> Tokenizer:
    """The tokenizer the text encoder was trained with, from the installed vocabularies."""
    if isinstance(cfg, CLIPTextConfig):
        return CLIPTokenizer(max_length=cfg.max_seq_len)
    return load_bert_tokenizer(cfg.max_seq_len)


def open_tokenizer(folder: str | Path, max_length: int) -> Tokenizer:
    """The tokenizer `save(folder)` wrote: CLIP's vocabulary file, else a BERT folder."""
    folder = Path(folder)
    if (folder / CLIP_VOCAB_FILE).is_file():
        return CLIPTokenizer(folder / CLIP_VOCAB_FILE, max_length=max_length)
    return BERTTokenizer(folder, max_length=max_length)
