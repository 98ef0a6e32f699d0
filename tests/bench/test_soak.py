"""bench.soak against the real gateway and Triton of the server tests, for a few seconds."""
from __future__ import annotations

import os

from bench.soak import main
from tests.server.conftest import gateway, served_ldm_dir, triton  # noqa: F401 - fixtures


def test_soak_reports_a_clean_short_run(gateway, capsys):  # noqa: F811
    rc = main(["--url", gateway, "--pid", str(os.getpid()), "--minutes", "0.1",
               "--clients", "2", "--timeout", "60"])
    out = capsys.readouterr().out
    assert rc == 0, out
    row = [line for line in out.splitlines() if line.startswith("| 1 |")]
    assert row, out
    requests, errors, timeouts = (int(x) for x in row[0].split("|")[2:5])
    assert requests > 0 and errors == 0 and timeouts == 0
    assert "tritonserver" in row[0] and "stub ldm_txt2img_stream" in row[0]
    assert "0 errors, 0 timeouts" in out
