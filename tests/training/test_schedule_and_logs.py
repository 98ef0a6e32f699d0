"""Time budgets set the schedule and the ETA; a run ends with validation, samples and a
checkpoint however it stops; logs are lines off a terminal; --resume reads the run's config."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from ldm.train import grid_captions, main
from ldm.training.config import OptimConfig
from ldm.training.schedule import TimeBudget, clock, lr_lambda

FIX = Path(__file__).parents[1] / "fixtures"
AE = str(FIX / "tiny_train_ae.yaml")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_budget_sets_the_horizon_once_from_the_measured_speed(monkeypatch):
    budget = TimeBudget(1000.0)
    now = [100.0]
    monkeypatch.setattr("ldm.training.schedule.time.time", lambda: now[0])
    now[0] = 140.0  # 40 steps in 40 s: too early (under 5 % of the budget)
    assert budget.horizon(40, 0, 100.0, 40.0, 10**6) is None
    now[0] = 160.0  # 60 steps in 60 s: 1 step/s, 940 s left
    assert budget.horizon(60, 0, 100.0, 60.0, 10**6) == 60 + int(940 * 0.98)
    assert budget.horizon(70, 0, 100.0, 70.0, 10**6) is None  # measured once
    capped = TimeBudget(1000.0)
    assert capped.horizon(60, 0, 100.0, 60.0, 500) == 500  # never past max_steps


def test_the_cosine_schedule_ends_at_a_moving_horizon():
    cfg = OptimConfig(warmup_steps=0, schedule="cosine", min_lr_ratio=0.1)
    horizon = [100]
    f = lr_lambda(cfg, lambda: horizon[0])
    assert f(50) == pytest.approx(0.55)
    horizon[0] = 50
    assert f(50) == pytest.approx(0.1)  # the end of the schedule
    assert lr_lambda(cfg, 100)(100) == pytest.approx(0.1)  # a plain number still works
    assert clock(3725) == "1:02:05" and clock(float("inf")) == "?"


def test_a_time_budget_fits_the_run_and_it_ends_with_validation_and_samples(tmp_path,
                                                                              caplog):
    caplog.set_level(logging.INFO, logger="ldm")  # bench mains quiet "ldm" in-process
    out = tmp_path / "ae"
    assert main(["autoencoder", "--config", AE, f"train.out_dir={out}", "train.max_steps=100000",
                 "train.max_minutes=0.08", "train.log_every=5", "train.val_every=100000",
                 "train.sample_every=100000", "train.ckpt_every=100000"]) == 0
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["budgeted"] and 20 <= state["horizon"] < 100000
    assert "time budget 0.08 min: about" in caplog.text
    rows = metrics(out)
    assert rows[-1]["step"] == state["step"] and "val/psnr" in rows[-1]  # final validation
    assert (out / "samples" / f"step_{state['step']:07d}.png").is_file()
    # Not a terminal (pytest captures stderr): a line per log_every steps, with the ETA.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 5/")]
    assert lines and "loss_per_px=" in lines[0] and "steps/s" in lines[0] and "left" in lines[0]
    # The autoencoder's loss is shown per pixel, not as CompVis's sum over the image.
    train_rows = [r for r in rows if "train/loss_per_px" in r]
    assert train_rows and all(r["train/loss_per_px"] < 10 < r["train/total_loss"]
                              for r in train_rows)


def test_resume_reads_the_runs_own_config(tmp_path, capsys):
    out = tmp_path / "ae"
    first = ["autoencoder", "--config", AE, f"train.out_dir={out}", "train.max_steps=3",
             "optim.lr=3.0e-4", "data.val_length=4"]
    assert main(first) == 0
    # No --config and no repeated overrides: the run's config.json has them; a new override
    # (more steps) applies on top.
    assert main(["autoencoder", "--resume", str(out), "train.max_steps=5"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["optim"]["lr"], saved["data"]["val_length"],
            saved["train"]["max_steps"]) == (3.0e-4, 4, 5)
    assert max(r["step"] for r in metrics(out)) == 5
    assert main(["autoencoder", "--resume", str(out), f"train.out_dir={tmp_path / 'x'}"]) == 2
    assert "train.out_dir=" in capsys.readouterr().err


def test_grid_captions_come_from_the_data(tmp_path):
    from torch.utils.data import Subset

    from ldm.data.imagefolder import ImageFolderDataset
    from tests.data.test_imagefolder import write_folder

    ds = ImageFolderDataset(write_folder(tmp_path / "d", 12), 16)
    assert grid_captions(Subset(ds, [3, 1, 1, 5]), 8) == ["image 3", "image 1", "image 5"]
    assert grid_captions(ds, 2) == ["image 0", "image 1"]
