"""What both text encoders share: tau_theta(y) over prompts, through a tokenizer loaded on
first use (so building a model, loading a checkpoint or exporting `embed_tokens` needs no
vocabulary files). Subclasses give `load_tokenizer` and `embed_tokens` (ids -> context, the
part exported to ONNX as `text_encoder`)."""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class TextConditioner(nn.Module):
    """Prompts (or token ids when `use_tokenizer` is false) -> (B, max_seq_len, n_embed)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.use_tknz_fn = cfg.use_tokenizer
        self._tokenizer = None

    def load_tokenizer(self):
        raise NotImplementedError

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def tknz_fn(self):
        """The tokenizer (CompVis attribute name), loaded once."""
        if self._tokenizer is None:
            tokenizer = self.load_tokenizer()
            if tokenizer.vocab_size > self.cfg.vocab_size:
                raise ValueError(
                    f"tokenizer has {tokenizer.vocab_size} ids but the text encoder's "
                    f"vocab_size is {self.cfg.vocab_size}")
            self._tokenizer = tokenizer
        return self._tokenizer

    def tokenize(self, text: str | list[str]) -> tuple[torch.Tensor, list[bool]]:
        """Texts -> (input_ids (B, max_seq_len) on this model's device, truncated flags)."""
        ids, truncated = self.tknz_fn.tokenize(text)
        return ids.to(next(self.parameters()).device), truncated

    def forward(self, text: str | list[str] | torch.Tensor) -> torch.Tensor:
        if not self.use_tknz_fn:
            return self.embed_tokens(text)
        if isinstance(text, torch.Tensor):
            raise TypeError(f"{type(self).__name__} with use_tokenizer=True takes strings, not "
                            "ids (embed_tokens takes ids)")
        ids, truncated = self.tokenize(text)
        if any(truncated):
            log.debug("%d prompt(s) cut to %d tokens", sum(truncated), self.cfg.max_seq_len)
        return self.embed_tokens(ids)

    def encode(self, text: str | list[str] | torch.Tensor) -> torch.Tensor:
        """CompVis alias of `forward` (used by `get_learned_conditioning`)."""
        return self(text)
