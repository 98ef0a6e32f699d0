"""`python -m server.build`: the whole repository `python -m server` serves, in one command.

    python -m server.build --checkpoint checkpoints/demo/ldm --out model_repository

Runs export/build_engines.py (same arguments: the networks, checked and cached), then adds
the pipeline models on top (`server.repository.assemble`). The launcher runs this in a
child process, so the export's peak memory is returned to the system before Triton loads.
"""
from __future__ import annotations

import logging
import sys

from export import build_engines


def main(argv: list[str] | None = None) -> int:
    code = build_engines.main(argv)
    if code != 0:
        return code
    from server.repository import assemble

    args = build_engines.parse_args(argv)
    try:
        names = assemble(args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"server.build: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        logging.getLogger(__name__).info("pipeline models: %s", ", ".join(names) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
