"""Pack a trained model for serving: EMA weights in, EMA copy out, optional fp16 storage.

    python -m ldm.pack --ldm runs/shapes_ldm/model --first-stage runs/shapes_ae_ft/model \
        --out checkpoints/demo --dtype float16

Writes `OUT/ldm` (the text-to-image model) and `OUT/autoencoder` (the first stage alone,
without its training loss; `--no-autoencoder` leaves this copy out), both in our safetensors
format. `--first-stage` swaps in an autoencoder whose decoder was fine-tuned with a frozen
encoder; its encoder must equal the one the LDM was trained on, which is checked (same
latent space). Weights stored as fp16 are loaded back into fp32 modules; evaluate the packed
files, since they are what ships. `--default-steps`, `--default-guidance-scale` and
`--default-sampler` record the settings the model was evaluated at in `OUT/ldm/config.yaml`
(`sampling:`): the server and `ldm.sample` use them when a request leaves them out.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from ldm.pretrained import check_sampling, load_pretrained, save_pretrained


def pack(ldm_dir: str, out: str, first_stage_dir: str | None = None,
         dtype: torch.dtype = torch.float32, autoencoder: bool = True,
         sampling: dict | None = None) -> None:
    model = load_pretrained(ldm_dir)
    cfg = model.config
    if first_stage_dir:
        ae = load_pretrained(first_stage_dir, strict=True)
        fs = cfg.first_stage
        if ae.cfg.ddconfig != fs.ddconfig or ae.cfg.embed_dim != fs.embed_dim:
            raise ValueError(f"--first-stage {first_stage_dir}: not the LDM's architecture")
        own = model.first_stage_model.state_dict()
        new = {k: v for k, v in ae.state_dict().items() if not k.startswith("loss.")}
        for k in own:  # the latent space is defined by the encoder: it must be unchanged
            if k.startswith(("encoder.", "quant_conv.")) and not torch.equal(own[k], new[k]):
                raise ValueError(f"--first-stage {first_stage_dir}: encoder weight {k} differs "
                                 "(only a decoder fine-tuned on a frozen encoder can be swapped)")
        model.first_stage_model.load_state_dict(new)
    if model.model_ema is not None:
        model.model_ema.copy_to(model.model)  # serve the EMA weights, as CompVis samples with them
    cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, use_ema=False))
    packed = type(model)(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model_ema.")}
    packed.load_state_dict(state, strict=True)
    packed.to(dtype)
    save_pretrained(f"{out}/ldm", packed, "ldm", cfg, sampling)
    if autoencoder:  # a copy of the first stage, for tools that take an autoencoder folder
        ae_cfg = cfg.first_stage
        save_pretrained(f"{out}/autoencoder", packed.first_stage_model, "autoencoder", ae_cfg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm.pack", description=__doc__.split("\n")[0])
    p.add_argument("--ldm", required=True, help="our LDM checkpoint folder")
    p.add_argument("--first-stage", help="autoencoder folder whose weights replace the LDM's")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--no-autoencoder", action="store_true",
                   help="write OUT/ldm only (ldm.evaluate autoencoder reads an LDM's first "
                        "stage, so the copy is only for size-insensitive tools)")
    p.add_argument("--default-steps", type=int, help="sampling default: steps")
    p.add_argument("--default-guidance-scale", type=float, help="sampling default: guidance")
    p.add_argument("--default-sampler", help="sampling default: sampler")
    args = p.parse_args(argv)
    sampling = {"steps": args.default_steps, "guidance_scale": args.default_guidance_scale,
                "sampler": args.default_sampler}
    try:
        check_sampling(sampling, "--default-*")
        pack(args.ldm, args.out, args.first_stage, getattr(torch, args.dtype),
             not args.no_autoencoder, sampling)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
