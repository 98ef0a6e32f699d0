"""Exponential moving average of a model's trainable parameters (CompVis `LitEma`).

After update n the shadow copy is theta_ema <- d_n * theta_ema + (1 - d_n) * theta, with
d_n = min(decay, (1 + n) / (10 + n)) when `use_num_updates` (a warm-up that lets the average
follow the fast-moving early weights), else d_n = decay.

The shadows are buffers named like the parameters with the dots removed, next to the buffers
`decay` (float32) and `num_updates` (int32, -1 when counting is off), so an LDM checkpoint's
`model_ema.decay`, `model_ema.num_updates`, `model_ema.diffusion_modelinput_blocks00weight`, ...
load unchanged. Validate with EMA weights by `store` -> `copy_to` -> evaluate -> `restore`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class LitEma(nn.Module):
    """Shadow copy of `model`'s trainable parameters, updated by calling `ema(model)`."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        # model parameter name -> shadow buffer name ('.' is not allowed in buffer names)
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer(
            "num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int)
        )
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.detach().clone())
        self.collected_params: list[Tensor] = []

    def _current_decay(self) -> Tensor:
        """d_n for the update about to be made; advances `num_updates` when counting."""
        if self.num_updates < 0:
            return self.decay
        self.num_updates += 1
        n = self.num_updates
        # Tensor arithmetic in float32, exactly as CompVis evaluates it.
        return torch.minimum(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA step towards `model`'s current parameters."""
        one_minus_decay = 1.0 - self._current_decay()
        shadows = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if not p.requires_grad:
                self._check_untracked(name)
                continue
            shadow = shadows[self.m_name2s_name[name]]
            # theta_ema -= (1 - d) (theta_ema - theta), in the shadow's own dtype.
            shadow.sub_(one_minus_decay * (shadow - p.to(shadow.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite `model`'s trainable parameters with the averaged ones."""
        shadows = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if not p.requires_grad:
                self._check_untracked(name)
                continue
            p.copy_(shadows[self.m_name2s_name[name]])

    def store(self, parameters: Iterable[Tensor]) -> None:
        """Keep a copy of `parameters` (e.g. before `copy_to`) for `restore`."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[Tensor]) -> None:
        """Put back the values saved by `store`, in the same order."""
        for saved, p in zip(self.collected_params, parameters, strict=False):
            p.copy_(saved)

    def _check_untracked(self, name: str) -> None:
        # A frozen parameter must not have a shadow: it was frozen when the EMA was built.
        if name in self.m_name2s_name:
            raise RuntimeError(f"parameter {name} has an EMA shadow but no longer requires grad")
