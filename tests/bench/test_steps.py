"""`python -m bench.steps` on the tiny LDM: the table, the rule, the JSON and `--no-timing`.

One timed run for the module (2 samplers x 2 step counts, 1 seed, 1 repetition; about 20 s
on 2 cores, most of it the ONNX export) and one untimed run of a single configuration; the
rule is also checked on hand-made rows.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from bench import steps
from bench.steps import Row, choose_default, within_tolerance

pytestmark = pytest.mark.timeout(180)
GRID = {("ddim", 5), ("ddim", 25), ("dpmpp_2m", 5), ("dpmpp_2m", 25)}
VERDICT = re.compile(r"^Verdict: (\w+) at (\d+) steps: all three ([\d.]+) \(best ([\d.]+)\), "
                     r"([\d.]+) ms per image, ([\d.]+)x the DDIM-25 time\.$", re.M)


def run_main(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = steps.main(argv)
    return code, out.getvalue()


def table(stdout: str) -> dict[tuple[str, int], list[str]]:
    """(sampler, steps) -> the row's remaining printed cells."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[1].isdigit():
            key = (cells[0], int(cells[1]))
            assert key not in rows, f"two rows for {key}"
            rows[key] = cells[2:]
    return rows


@pytest.fixture(scope="module")
def timed(tiny_ldm_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("steps")
    out = tmp / "steps.json"
    code, stdout = run_main(["--checkpoint", str(tiny_ldm_dir), "--seeds", "1",
                             "--samplers", "ddim,dpmpp_2m", "--steps", "5,25",
                             "--repetitions", "1", "--threads", "1",
                             "--work-dir", str(tmp / "work"), "--out", str(out)])
    assert code == 0
    return stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_one_row_per_config_with_accuracies_and_times(timed):
    stdout, result = timed
    printed = table(stdout)
    assert set(printed) == GRID
    for key, cells in printed.items():
        accuracies = [float(c) for c in cells[:4]]
        assert all(0.0 <= a <= 1.0 for a in accuracies), key
        assert float(cells[4]) > 0, key
        assert cells[5].endswith("x") and float(cells[5][:-1]) > 0, key
    assert printed[("ddim", 25)][5] == "1.00x"  # the served default is the reference
    rows = {(r["sampler"], r["steps"]): r for r in result["rows"]}
    assert set(rows) == GRID
    for key, r in rows.items():
        assert r["images"] == 120 and len(r["times_ms"]) == 1 and r["ms_per_image"] > 0
        assert f"{r['acc_all']:.4f}" == printed[key][3]
    assert result["meta"]["timing"] is True and result["meta"]["threads"] == 1


@pytest.mark.slow
def test_printed_default_satisfies_the_rule_on_printed_numbers(timed):
    stdout, result = timed
    printed = table(stdout)
    match = VERDICT.search(stdout)
    assert match, stdout
    chosen = (match[1], int(match[2]))
    acc = {k: float(c[3]) for k, c in printed.items()}
    ms = {k: float(c[4]) for k, c in printed.items()}
    best = max(acc.values())
    assert float(match[4]) == best and float(match[3]) == acc[chosen]
    # Printed accuracies carry 4 decimals: allow their rounding, nothing more.
    assert acc[chosen] >= best - 0.01 - 1e-4
    surely_within = [k for k in acc if acc[k] >= best - 0.01 + 1e-4]
    assert all(ms[chosen] <= ms[k] for k in surely_within)
    assert float(match[5]) == ms[chosen]
    assert result["chosen"] == {"sampler": chosen[0], "steps": chosen[1]}


@pytest.mark.slow
def test_accuracy_matches_ldm_evaluate(timed, tiny_ldm_dir):
    from ldm.evaluate import evaluate_ldm

    ref = evaluate_ldm(str(tiny_ldm_dir), 1, 5, steps.DEFAULT_GUIDANCE, "ddim")
    row = next(r for r in timed[1]["rows"] if (r["sampler"], r["steps"]) == ("ddim", 5))
    for k in ("color", "shape", "position", "all"):
        assert row[f"acc_{k}"] == ref[f"acc_{k}"], k


@pytest.mark.slow
def test_no_timing_skips_export_and_timing(tiny_ldm_dir, tmp_path):
    work, out = tmp_path / "work", tmp_path / "steps.json"
    code, stdout = run_main(["--checkpoint", str(tiny_ldm_dir), "--seeds", "1",
                             "--samplers", "ddim", "--steps", "5", "--no-timing",
                             "--work-dir", str(work), "--out", str(out), "--threads", "1"])
    assert code == 0
    assert not work.exists()  # no repository was looked for or built
    assert table(stdout)[("ddim", 5)][4:] == ["n/a", "n/a"]
    assert "Verdict: none (no timing)" in stdout
    result = json.loads(out.read_text())
    assert result["meta"]["timing"] is False and result["chosen"] is None
    assert result["rows"][0]["ms_per_image"] is None and result["rows"][0]["times_ms"] == []


# --- the rule on hand-made rows --------------------------------------------------------------

def row(sampler: str, n: int, acc_all: float, ms: float | None) -> Row:
    return Row(sampler, n, 480, 1.0, 1.0, 1.0, acc_all, 0.0, ms)


def pick(rows: list[Row]) -> tuple[str, int] | None:
    chosen = choose_default(rows)
    return None if chosen is None else chosen.key


def test_rule_picks_the_fastest_within_one_point():
    rows = [row("ddim", 25, 0.950, 100.0), row("ddim", 10, 0.945, 40.0),
            row("ddim", 5, 0.930, 10.0)]
    assert pick(rows) == ("ddim", 10)


def test_rule_counts_exactly_one_point_below_as_within():
    rows = [row("ddim", 25, 0.95, 100.0), row("plms", 10, 0.94, 40.0)]
    assert 0.95 - 0.94 > 0.01  # in floats; the rule must still accept it
    assert pick(rows) == ("plms", 10)
    assert pick([row("ddim", 25, 0.95, 100.0), row("plms", 10, 0.9395, 40.0)]) == ("ddim", 25)


def test_rule_ties():
    # Two rows share the best accuracy: the faster one.
    assert pick([row("ddim", 25, 0.9, 50.0), row("plms", 15, 0.9, 30.0)]) == ("plms", 15)
    # Equal times: the more accurate, then fewer steps, then the earlier row.
    assert pick([row("ddim", 10, 0.895, 30.0), row("plms", 15, 0.9, 30.0)]) == ("plms", 15)
    assert pick([row("ddim", 15, 0.9, 30.0), row("plms", 10, 0.9, 30.0)]) == ("plms", 10)
    assert pick([row("ddpm", 10, 0.9, 30.0), row("plms", 10, 0.9, 30.0)]) == ("ddpm", 10)


def test_rule_needs_the_times_of_every_candidate():
    assert pick([row("ddim", 25, 0.9, 50.0), row("plms", 10, 0.9, None)]) is None
    # An untimed row too far below the best does not matter.
    assert pick([row("ddim", 25, 0.9, 50.0), row("plms", 5, 0.5, None)]) == ("ddim", 25)
    assert [r.key for r in within_tolerance([row("a", 1, 0.5, None), row("b", 1, 0.2, 1.0)])] \
        == [("a", 1)]


def test_render_reports_relative_time_and_verdict():
    text = steps.render([row("ddim", 25, 0.95, 100.0), row("dpmpp_2m", 10, 0.945, 40.0)])
    assert "| dpmpp_2m | 10 | 1.0000 | 1.0000 | 1.0000 | 0.9450 | 40.0 | 0.40x |" in text
    assert "| ddim | 25 | 1.0000 | 1.0000 | 1.0000 | 0.9500 | 100.0 | 1.00x |" in text
    match = VERDICT.search(text)
    assert match and (match[1], match[2], match[6]) == ("dpmpp_2m", "10", "0.40")


@pytest.mark.parametrize("argv", [["--samplers", "euler"], ["--steps", "0"],
                                  ["--steps", "five"], ["--seeds", "0"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        steps.parse_args(argv)


def test_defaults_are_the_served_ones():
    args = steps.parse_args([])
    assert args.samplers == ["ddim", "plms", "dpmpp_2m", "ddpm"]
    assert args.steps == [5, 10, 15, 25] and args.seeds == 4 and args.repetitions == 10
    assert args.guidance == steps.DEFAULT_GUIDANCE and args.timing is True
    assert args.checkpoint == Path(steps.PROJECT_ROOT, "checkpoints", "demo", "ldm")
    assert steps.REFERENCE == ("ddim", 25)  # what every time is compared to
    from ldm import evaluate

    assert (evaluate.DEFAULT_SAMPLER, evaluate.DEFAULT_STEPS) == ("ddim", 10)  # what it chose
