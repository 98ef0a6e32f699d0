"""Latent diffusion (Rombach et al. 2022) in clean PyTorch, checkpoint-compatible with CompVis."""

__version__ = "0.1.0"
