"""`python -m ldm.evaluate` on any image folder: reconstructions, a trained judge and its
calibration, text-to-image on a folder's captions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.evaluate import main

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230)}
SHAPES = ("square", "disc")


def draw(colour, shape: str, style: str) -> np.ndarray:
    """A 32 px RGBA picture: filled (style a) or outlined on a tint (style b)."""
    a = np.zeros((32, 32, 4), np.uint8)
    yy, xx = np.mgrid[:32, :32]
    inside = ((abs(yy - 16) < 9) & (abs(xx - 16) < 9) if shape == "square"
              else (yy - 16) ** 2 + (xx - 16) ** 2 < 81)
    if style == "b":
        a[..., :3] = np.array(colour) // 4 + 190
        a[..., 3] = 255
        ring = inside & ~(((abs(yy - 16) < 6) & (abs(xx - 16) < 6)) if shape == "square"
                          else (yy - 16) ** 2 + (xx - 16) ** 2 < 36)
        a[ring] = (*colour, 255)
    else:
        a[inside] = (*colour, 255)
    return a


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("art")
    rows = []
    for style in "ab":
        for c, rgb in COLOURS.items():
            for s in SHAPES:
                name = f"{c}_{s}_{style}.png"
                Image.fromarray(draw(rgb, s, style), "RGBA").save(root / name)
                rows.append({"file_name": name, "text": f"a {c} {s}", "name": f"{c} {s}",
                             "category": c, "style": style})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run(tmp_path: Path, *argv) -> dict:
    out = tmp_path / f"result{len(list(tmp_path.glob('result*')))}.json"
    assert main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_an_autoencoder_on_a_folder(tmp_path, folder, tiny_ldm_dir):
    # An LDM checkpoint is measured through its first stage; --where picks rows.
    got = run(tmp_path, "autoencoder", "--checkpoint", str(tiny_ldm_dir), "--data", str(folder),
              "--where", "style=a", "--size", "16")
    assert got["images"] == 6
    assert set(got) == {"images", "psnr_db", "ssim", "perceptual", "colour_error"}
    assert 0 < got["psnr_db"] < 60 and -1 <= got["ssim"] <= 1 and got["perceptual"] > 0
    capped = run(tmp_path, "autoencoder", "--checkpoint", str(tiny_ldm_dir), "--data",
                 str(folder), "--images", "4", "--size", "16")
    assert capped["images"] == 4


def test_the_held_out_images_of_a_training_run(folder, tmp_path):
    from ldm.train import main as train

    out = tmp_path / "run"
    ae = str(Path(__file__).parent / "fixtures" / "tiny_train_ae.yaml")
    assert train(["autoencoder", "--config", ae, "data.name=imagefolder", f"data.root={folder}",
                  "data.val_length=1", f"train.out_dir={out}", "train.max_steps=1"]) == 0
    got = run(tmp_path, "autoencoder", "--checkpoint", str(out / "model"), "--val-of", str(out))
    assert got["images"] == 1  # 12 images: at most 1 in 10 held out


def test_judge_calibration_and_text_to_image_on_captions(folder, tiny_ldm_dir, tmp_path):
    judge = tmp_path / "judge"
    got = run(tmp_path, "judge", "--data", str(folder), "--train-where", "style=a",
              "--test-where", "style=b", "--out", str(judge), "--size", "32")
    assert (got["train_images"], got["test_images"], got["judge_images"]) == (6, 6, 12)
    assert (got["category_labels"], got["name_labels"]) == (3, 6)
    for variant in ("real", "blurred", "random"):
        assert 0 <= got[f"{variant}_category_top1"] <= 1
    # An unseen style is still read better than noise.
    assert got["real_category_top1"] > got["random_category_top1"]
    assert got["real_name_top5"] > got["random_name_top5"]
    scored = run(tmp_path, "ldm", "--checkpoint", str(tiny_ldm_dir), "--data", str(folder),
                 "--judge", str(judge), "--captions", "4", "--seeds", "2", "--steps", "2")
    assert (scored["captions"], scored["images"]) == (4, 8)
    assert 0 <= scored["category_top1"] <= 1 and 0 <= scored["name_top5"] <= 1


def test_clear_errors(capsys, folder, tiny_ldm_dir, tmp_path):
    with pytest.raises(SystemExit):
        main(["ldm", "--checkpoint", str(tiny_ldm_dir), "--data", str(folder)])
    assert "ldm needs --judge" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["judge", "--data", str(folder)])
    assert "judge needs --out" in capsys.readouterr().err
    assert main(["autoencoder", "--checkpoint", str(tiny_ldm_dir), "--data", str(folder),
                 "--where", "style=z"]) == 2
    assert "no image of" in capsys.readouterr().err
    assert main(["ldm", "--checkpoint", str(tiny_ldm_dir), "--data", str(folder), "--judge",
                 str(tmp_path)]) == 2
    assert "no judge here" in capsys.readouterr().err
