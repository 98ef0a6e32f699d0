"""Small data sets, `val_length=0`, metadata paths outside the folder, metrics across `kill -9`."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.imagefolder import ImageFolderDataset
from ldm.train import main

FIX = Path(__file__).parents[1] / "fixtures"
ROOT = Path(__file__).parents[2]
AE = str(FIX / "tiny_train_ae.yaml")


def image_folder(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((20, 30, 3), 20 * i, np.uint8)).save(folder / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "text": f"image {i}"} for i in range(n)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_imagefolder_of_fewer_than_10_images_trains_without_validation(tmp_path, caplog):
    data, out = image_folder(tmp_path / "data", 5), tmp_path / "out"
    assert main(["autoencoder", "--config", AE, "data.name=imagefolder", f"data.root={data}",
                 f"train.out_dir={out}"]) == 0
    assert "5 images" in caplog.text and "validation is off" in caplog.text
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert not any(k.startswith("val/") for r in rows for k in r)
    assert (out / "model" / "model.safetensors").is_file()
    assert any((out / "samples").glob("*.png"))  # reconstructions of training images


@pytest.mark.parametrize("data", ["shapes", "imagefolder"])
def test_val_length_0_means_no_validation(tmp_path, data):
    args = ["data.val_length=0", "train.val_every=2"]
    if data == "imagefolder":  # enough images that the 1-in-10 cap would hold some out
        args += ["data.name=imagefolder", f"data.root={image_folder(tmp_path / 'data', 20)}"]
    out = tmp_path / "out"
    assert main(["autoencoder", "--config", AE, f"train.out_dir={out}", *args]) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert not any(k.startswith("val/") for r in rows for k in r)
    assert any((out / "samples").glob("*.png"))


def test_negative_val_length_is_a_clear_error(tmp_path, capsys):
    assert main(["autoencoder", "--config", AE, f"train.out_dir={tmp_path}",
                 "data.val_length=-1"]) == 2
    assert "data.val_length=-1 must be >= 0" in capsys.readouterr().err


def test_metadata_entries_outside_the_folder_are_skipped(tmp_path, caplog):
    data = image_folder(tmp_path / "data", 2)
    (data / "sub").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "secret.png")
    rows = [
        {"file_name": "../secret.png", "text": "up"},                    # line 3
        {"file_name": str(tmp_path / "secret.png"), "text": "absolute"},  # line 4
        {"file_name": "../../../../etc/passwd", "text": "passwd"},        # line 5
        {"file_name": "sub/../../data/1.png", "text": "out and back"},    # line 6
        {"file_name": "sub/../1.png", "text": "stays inside"},            # line 7
    ]
    with open(data / "metadata.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    ds = ImageFolderDataset(data, size=16)
    assert [text for _, text, _ in ds.items] == ["image 0", "image 1", "stays inside"]
    assert all(path.resolve().is_relative_to(data.resolve()) for path, _, _ in ds.items)
    for lineno, name in [(3, "../secret.png"), (4, str(tmp_path / "secret.png")),
                         (5, "../../../../etc/passwd"), (6, "sub/../../data/1.png")]:
        assert f"line {lineno} skipped: file_name {name!r} is outside" in caplog.text
    assert ds[2]["image"].shape == (3, 16, 16)


def test_metadata_file_name_that_is_not_a_string_is_skipped(tmp_path, caplog):
    data = image_folder(tmp_path / "data", 1)
    with open(data / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": 5, "text": "not a name"}) + "\n")
    assert len(ImageFolderDataset(data, size=16)) == 1
    assert "line 2 skipped: file_name must be a string" in caplog.text


def test_metrics_stay_monotonic_after_kill_9_and_resume(tmp_path):
    out = tmp_path / "run"
    args = ["autoencoder", "--config", AE, f"train.out_dir={out}", "train.max_steps=1000",
            "train.ckpt_every=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "ldm.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.time() + 60
    try:  # kill once a step after the first checkpoint (step 3) is logged
        while not (out / "metrics.jsonl").is_file() or not any(
                '"step": 4,' in line for line in (out / "metrics.jsonl").read_text().splitlines()):
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < end, "timed out"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "ti')  # as if killed mid-write
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    saved = state["step"]
    assert saved % 3 == 0
    before = (out / "metrics.jsonl").read_text().splitlines()[:-1]
    assert max(json.loads(line)["step"] for line in before) > saved  # lines to drop

    assert main([*args, "--resume", "train.stop_after_steps=3"]) == 0
    every = metrics(out)
    rows = [r for r in every if "lr" in r]  # the training steps' lines
    # However a run stops, it ends with a validation at its last step.
    assert every[-1]["step"] == saved + 3 and "val/psnr" in every[-1]
    steps, times = [r["step"] for r in rows], [r["time"] for r in rows]
    assert steps == list(range(1, saved + 4))
    assert rows[:saved] == [json.loads(line) for line in before[:saved]]
    assert all(a < b for a, b in zip(times[:-1], times[1:], strict=True)), times
    assert times[saved] > state["elapsed"] > 0  # the resumed run counts on from the checkpoint
    assert not list(out.glob(".metrics.jsonl.*"))


def test_the_ldm_stage_trains_without_validation_too(tmp_path):
    from ldm.config import AutoencoderConfig, from_dict
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.pretrained import save_pretrained

    cfg = from_dict(AutoencoderConfig, {"embed_dim": 4, "ddconfig": {
        "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "resolution": 16}})
    save_pretrained(tmp_path / "ae", AutoencoderKL(cfg), "autoencoder", cfg)
    data, out = image_folder(tmp_path / "data", 20), tmp_path / "out"
    ldm = str(FIX / "tiny_train_ldm.yaml")
    assert main(["ldm", "--config", ldm, f"first_stage={tmp_path / 'ae'}", "data.val_length=0",
                 "data.name=imagefolder", f"data.root={data}", f"train.out_dir={out}",
                 "train.max_steps=2", "train.val_every=1"]) == 0
    assert not any(k.startswith("val/") for r in metrics(out) for k in r)
    assert any((out / "samples").glob("*.png"))  # the grid shows training captions
