"""The serving defaults a built repository implies: request limits its graphs can take,
memory caps for large networks, and the runtime of the pipeline's networks. Read from the
model's config and the manifest's networks
(`manifest.json` "models": {name: {"max_batch_size", "inputs", "outputs", "profile"}}).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.contract import Limits

# A UNet this large fills the cores at batch 1-2 on a CPU: the paper's (3.5 GB) took the same
# time per item at batch 2, 4 and 8 (0.95-1.05 s), while its activations grew with the batch
# (+0.4 GB at 2, +0.8 GB at 4, +1.4 GB at 8; the VAE decoder +0.9 GB for 4 images at 256 px).
# At SD v1's 64x64 latents four items held 1.39x the weights under 4 requests; two, one
# guided request, keep the time per item and half the activations.
LARGE_UNET_BYTES = 1 << 30


def large_model_caps(unet_bytes: int, latent: int = 32) -> dict[str, int]:
    """Serving defaults that bound activation memory for a large model on the CPU: UNet runs
    of at most 4 items (two guided requests) up to 32x32 latents, 2 above; VAE decodes one
    image at a time. `latent`: the largest latent side the UNet is served at."""
    if unet_bytes <= LARGE_UNET_BYTES:
        return {}
    return {"unet_max_batch": 4 if latent <= 32 else 2, "vae_max_batch": 1}


def default_networks(backend: str, chosen: Mapping[str, Any] | None = None) -> dict[str, str]:
    """`networks` and `precision` over `chosen` (ServingOptions fields a user set). Unless told,
    the python backend runs them in process on OpenVINO at bf16 where the CPU has it, else
    fp32 (issue 13: on the demo model bf16 keeps the judged accuracy within a point of fp32,
    bench/RESULTS.md); other backends through Triton's own models (BLS), which is how
    TensorRT engines are served. `networks: torch` runs on the GPU where there is one."""
    networks = (chosen or {}).get("networks") or ("openvino" if backend == "python" else "bls")
    if networks == "torch":  # fp16 on a GPU, fp32 on the CPU; the loop where the GPU is
        return {"networks": networks, "precision": "auto", "device": "auto"}
    if networks == "bls" and backend == "tensorrt":  # keep the loop beside the engines
        return {"networks": networks, "device": "auto"}
    if networks != "openvino":
        return {"networks": networks}
    return {"networks": networks, "precision": "auto" if backend == "python" else "fp32"}


def num_timesteps(cfg) -> int:
    """T of the model's schedule (its given betas, else `timesteps`)."""
    given = cfg.diffusion.given_betas
    return len(given) if given is not None else int(cfg.diffusion.timesteps)


def supported_sizes(cfg, networks: Mapping[str, dict]) -> list[int]:
    """Image sizes (pixels, per side) the exported UNet covers; the trained size first."""
    lo, opt, hi = networks["unet"]["profile"]["height"]
    step = 2 ** (len(cfg.unet.channel_mult) - 1)  # the UNet halves h this often
    f = 2 ** (len(cfg.first_stage.ddconfig.ch_mult) - 1)
    sizes = [s * f for s in range(lo, hi + 1) if s % step == 0]
    return sorted(sizes, key=lambda s: (s != opt * f, s))


def max_images(networks: Mapping[str, dict]) -> int:
    """Images per request the graphs can take: guided UNet calls carry twice as many."""
    return min(networks["vae_decoder"]["profile"]["batch"][2],
               networks["unet"]["profile"]["batch"][2] // 2)


def default_limits(cfg, networks: Mapping[str, dict],
                   overrides: Mapping[str, Any] | None = None) -> Limits:
    """Limits derived from the graphs, with `overrides` (Limits fields) checked against them."""
    sizes = supported_sizes(cfg, networks)
    cap, steps = max_images(networks), num_timesteps(cfg)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(Limits.model_fields))
    if unknown:
        raise ValueError(f"unknown limit(s) {unknown}; allowed: {sorted(Limits.model_fields)}")
    if "sizes" in overrides:
        overrides["sizes"] = tuple(int(s) for s in overrides["sizes"])
        bad = [s for s in overrides["sizes"] if s not in sizes]
        if bad:
            raise ValueError(f"sizes {bad} are not covered by the exported UNet; allowed: {sizes}")
    if overrides.get("max_images", 1) > cap:
        raise ValueError(f"max_images {overrides['max_images']} exceeds what the exported "
                         f"graphs take ({cap}; export with a larger max_batch)")
    if overrides.get("max_steps", 1) > steps:
        raise ValueError(f"max_steps {overrides['max_steps']} exceeds the model's "
                         f"{steps} timesteps")
    if "samplers" in overrides:
        overrides["samplers"] = tuple(overrides["samplers"])
    merged = {"sizes": tuple(sizes), "max_images": min(4, cap), "max_steps": min(100, steps),
              **overrides}
    if "default_steps" not in overrides:  # keep the default inside a lowered max_steps
        merged["default_steps"] = min(Limits.model_fields["default_steps"].default,
                                      merged["max_steps"])
    return Limits(**merged)
