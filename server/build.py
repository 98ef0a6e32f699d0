"""`python -m server.build`: the whole repository `python -m server` serves, in one command.

    python -m server.build --checkpoint checkpoints/demo/ldm --out model_repository

Runs export/build_engines.py (same arguments: the networks, checked and cached), then adds
the pipeline models on top (`server.repository.assemble`). Two arguments of its own choose
how the pipeline runs the networks: `--networks onnxruntime|openvino|torch|bls` (default: in
process on OpenVINO for the python backend, else BLS) and `--precision fp32|bf16|fp16|auto`
(default auto: OpenVINO bf16 where the CPU has it, torch fp16 on a GPU). The graphs are
checked against PyTorch on the runtime and precision that will run them; `torch` writes the
networks' PyTorch weights too (`pytorch/`). `--name NAME` names the served model: its
pipeline models are NAME_txt2img(_stream) and its networks NAME_unet..., so repositories of
several names are served by one Triton (`python -m server --model NAME=CHECKPOINT`). A
checkpoint's own sampling defaults (`sampling:` in its config.yaml, `ldm.pack
--default-guidance-scale ...`) become the served defaults for steps, guidance and sampler. The
launcher runs this in a child process, so the export's peak memory is returned to the system
before Triton loads.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from export import build_engines
from server.contract import (
    DEFAULT_NAME,
    NAME_PATTERN,
    NETWORK_MODES,
    PRECISIONS,
    ServingOptions,
    network_prefix,
)
from server.pipeline_facts import default_networks


def pipeline_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """(this step's own arguments, the rest for export/build_engines.py)."""
    p = argparse.ArgumentParser(prog="python -m server.build", add_help=False)
    p.add_argument("--networks", choices=NETWORK_MODES, default=None)
    p.add_argument("--precision", choices=PRECISIONS, default=None)
    p.add_argument("--name", default=DEFAULT_NAME,
                   help="the served model's name: <name>_txt2img, its networks <name>_unet... "
                        f"(default {DEFAULT_NAME}: plain network names)")
    own, rest = p.parse_known_args(argv)
    if not re.fullmatch(NAME_PATTERN, own.name):
        p.error(f"--name {own.name!r}: lower-case letters, digits and dashes")
    return own, rest


def sampling_limits(checkpoint: Path) -> dict:
    """The checkpoint's sampling defaults as Limits fields ({} for CompVis files and for
    checkpoints that record none)."""
    from ldm.pretrained import read_sampling

    return {f"default_{key}": value for key, value in read_sampling(checkpoint).items()}


def main(argv: list[str] | None = None) -> int:
    own, rest = pipeline_args(sys.argv[1:] if argv is None else argv)
    rest = [*rest, "--name-prefix", network_prefix(own.name)]
    args = build_engines.parse_args(rest)
    chosen = {k: v for k, v in vars(own).items() if v is not None and k != "name"}
    serving = {**default_networks(args.backend, chosen), **chosen}
    try:  # refused before exporting, as the pipeline models would refuse it after
        ServingOptions(**serving)
    except ValueError as e:
        print(f"server.build: error: {e}", file=sys.stderr)
        return 2
    if serving["networks"] == "openvino":  # check the graphs on the runtime that will run them
        rest = [*rest, "--openvino-parity", serving["precision"]]
    if serving["networks"] == "torch":  # the modules need their weights beside the graphs
        rest = [*rest, "--torch-weights"]
    code = build_engines.main(rest)
    if code != 0:
        return code
    from server.repository import PipelineOptions, assemble

    try:
        names = assemble(args.out, PipelineOptions(name=own.name, serving=serving,
                                                    limits=sampling_limits(args.checkpoint)))
    except (ValueError, FileNotFoundError) as e:
        print(f"server.build: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        logging.getLogger(__name__).info("pipeline models: %s", ", ".join(names) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
