"""Stable Diffusion v1's text encoder: CLIP ViT-L/14's text transformer (CompVis
`FrozenCLIPEmbedder`, which wraps Hugging Face's `CLIPTextModel`).

tau_theta(y) is the last layer's hidden states after the final LayerNorm, for all 77
positions (not CLIP's pooled end-of-text vector). The modules mirror `CLIPTextModel`'s, with
its state-dict keys under CompVis's `transformer.` prefix, so SD checkpoints load strictly:

    transformer.text_model.embeddings.token_embedding.weight        (49408, 768)
    transformer.text_model.embeddings.position_embedding.weight     (77, 768)
    transformer.text_model.encoder.layers.{i}.layer_norm1.{weight,bias}
    transformer.text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
    transformer.text_model.encoder.layers.{i}.layer_norm2.{weight,bias}
    transformer.text_model.encoder.layers.{i}.mlp.fc{1,2}.{weight,bias}
    transformer.text_model.final_layer_norm.{weight,bias}

Each layer is pre-norm: x + attn(LN1 x), then x + mlp(LN2 x); attention is causal (a token
sees itself and those before it) and nothing masks the padding, as in CompVis. The MLP uses
quick-GELU, x * sigmoid(1.702 x), as OpenAI trained CLIP. `embed_tokens` (ids -> context) is
what is exported to ONNX as `text_encoder`.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.config import CLIPTextConfig
from ldm.modules.clip_tokenizer import CLIPTokenizer
from ldm.modules.text_conditioner import TextConditioner

LAYER_NORM_EPS = 1e-5  # CLIP's


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention, softmax(q k^T / sqrt(d_head) + mask) v."""

    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not a multiple of {heads} heads")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        # -inf above the diagonal; a buffer, not in the state dict (CLIP computes it too).
        mask = torch.full((max_len, max_len), float("-inf")).triu(1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D)."""
        b, n, d = x.shape
        q, k, v = (proj(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # The scale goes on q before the product, as in CLIPAttention; softmax in fp32.
        scores = (q * self.scale) @ k.transpose(-2, -1) + self.causal_mask[:n, :n]
        attn = scores.float().softmax(dim=-1).to(v.dtype)
        return self.out_proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), QuickGELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.self_attn = CLIPAttention(dim, heads, max_len)
        self.layer_norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = CLIPMLP(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg.n_embed, cfg.n_head, cfg.max_seq_len)
                                    for _ in range(cfg.n_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.n_embed)
        self.position_embedding = nn.Embedding(cfg.max_seq_len, cfg.n_embed)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPTextTransformer(nn.Module):
    """Embeddings -> encoder -> final LayerNorm: (B, N) ids -> (B, N, D)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.n_embed, eps=LAYER_NORM_EPS)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids)))


class CLIPTextModel(nn.Module):
    """The `text_model` holder, so keys read `transformer.text_model.*` as in SD files."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids)


class FrozenCLIPEmbedder(TextConditioner):
    """tau_theta for SD v1: prompts -> (B, 77, 768) context. Frozen: SD never trains it
    (`cond_stage_trainable: false`). Tokenizer, forward and encode: TextConditioner."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__(cfg)
        self.transformer = CLIPTextModel(cfg)

    def load_tokenizer(self) -> CLIPTokenizer:
        return CLIPTokenizer(max_length=self.cfg.max_seq_len)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, 77) int64 -> context (B, 77, n_embed): the exported `text_encoder`."""
        return self.transformer(input_ids)
