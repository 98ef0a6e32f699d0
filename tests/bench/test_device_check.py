"""The prepared GPU check, run here on its CPU path: the payload it carries, and its one table.

`bench/device_check.py` runs as a file (as on a bare GPU machine), from another folder, with
the BERT vocabulary the payload copied; on this CPU its fp16/bf16 rows run the served loop's
PyTorch networks in those precisions on the CPU.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import device_payload

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]


def test_payload_and_the_cpu_run_of_the_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert device_payload.main(["payload", "--no-wheels"]) == 0
    assert (tmp_path / "payload" / "bert" / "vocab.txt").is_file()
    assert "--target payload/site payload/wheels/*.whl" in (
        tmp_path / "payload" / "run.sh").read_text()
    with pytest.raises(SystemExit):
        device_payload.main([str(tmp_path / "abs")])  # run.sh needs a relative folder

    env = {**os.environ, "LDM_BERT_VOCAB": str(tmp_path / "payload" / "bert"),
           "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "device_check.py"), "--device",
                        "cpu", "--quick"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", r.stdout, re.M)[1:])  # past the header
    assert len(rows) == 8, r.stdout
    for precision in ("fp16", "bf16"):
        result = rows[f"demo images, served loop (networks: torch), cpu {precision}"]
        assert "non-finite values 0" in result
        assert float(re.search(r"PSNR ([\d.]+) dB", result).group(1)) >= 30
    assert "non-finite values 0" in rows["demo VAE decoder, 16x16 latents, cpu fp16 autocast"]
    speed = rows["demo served loop (networks: torch), batch 2, cpu precision auto, DDIM 10"]
    assert float(speed.split()[0]) > 0
    step = rows["paper UNet step, batch 2, 32x32, cpu bf16"]
    assert re.match(r"[\d.]+ ms, \d+ GFLOP, \d+% of the \d+ GFLOP/s matmul peak", step)
