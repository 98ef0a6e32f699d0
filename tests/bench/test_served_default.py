"""`python -m bench.served_default` on the tiny LDM: two real Triton servers (ONNX Runtime and
OpenVINO networks), one row per runtime and configuration, ratios to ONNX Runtime DDIM 25."""
from __future__ import annotations

import contextlib
import io
import re

import pytest

from bench import served_default

pytestmark = pytest.mark.timeout(300)
ROW = re.compile(r"^\| (\w+) \| (\w+):(\d+) \| ([\d.]+) \| ([\d.]+)x \|$", re.M)


def test_rows_for_both_runtimes_against_onnxruntime_ddim25(tiny_ldm_dir, tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = served_default.main(["--checkpoint", str(tiny_ldm_dir), "--steps", "4",
                                    "--repetitions", "1", "--warmup", "0", "--threads", "1",
                                    "--work-dir", str(tmp_path)])
    assert code == 0
    rows = {(rt, s, int(n)): (float(ms), float(x))
            for rt, s, n, ms, x in ROW.findall(out.getvalue())}
    openvino = "openvino_bf16" if ("openvino_bf16", "ddim", 4) in rows else "openvino_fp32"
    assert set(rows) == {(rt, "ddim", n) for rt in ("onnxruntime", openvino) for n in (4, 25)}
    assert rows[("onnxruntime", "ddim", 25)][1] == 1.0
    assert all(ms > 0 for ms, _ in rows.values())  # times are the bench's, never asserted
