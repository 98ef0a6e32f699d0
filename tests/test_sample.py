"""`python -m ldm.sample`: one row per prompt, prompts given repeatedly or in a file."""
from __future__ import annotations

import pytest
from PIL import Image

from ldm.sample import main


def test_a_row_per_prompt(tiny_ldm_dir, tmp_path, capsys):
    more = tmp_path / "prompts.txt"
    more.write_text("a blue square\n\n  a green disc  \n")
    out = tmp_path / "grid.png"
    assert main(["--checkpoint", str(tiny_ldm_dir), "--prompt", "a red circle", "--prompt",
                 "a tree", "--prompts-file", str(more), "--num-images", "2", "--steps", "2",
                 "--scale", "1", "-o", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (2 * 16, 4 * 16)  # 2 images per row, 4 prompts
    assert "4 prompt(s) x 2 image(s)" in capsys.readouterr().out


def test_no_prompt_is_a_clear_error(tiny_ldm_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tiny_ldm_dir), "-o", str(tmp_path / "x.png")])
    assert "give at least one --prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tiny_ldm_dir), "--prompts-file", str(tmp_path / "none.txt")])
    assert "--prompts-file" in capsys.readouterr().err


def test_steps_guidance_and_sampler_default_to_the_checkpoints_own(tiny_ldm_dir, tmp_path,
                                                                    capsys):
    import shutil

    import numpy as np
    import yaml

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_ldm_dir, folder)
    header = yaml.safe_load((folder / "config.yaml").read_text())
    header["sampling"] = {"steps": 3, "guidance_scale": 6.0, "sampler": "plms"}
    (folder / "config.yaml").write_text(yaml.safe_dump(header))

    def sample(name: str, *flags: str) -> np.ndarray:
        out = tmp_path / name
        assert main(["--checkpoint", str(folder), "--prompt", "a red circle", "--scale", "1",
                     "-o", str(out), *flags]) == 0
        return np.asarray(Image.open(out))

    own = sample("own.png")
    assert "plms, 3 steps, guidance 6)" in capsys.readouterr().out
    same = sample("same.png", "--steps", "3", "--guidance-scale", "6", "--sampler", "plms")
    np.testing.assert_array_equal(own, same)
    other = sample("other.png", "--guidance-scale", "1")
    assert "plms, 3 steps, guidance 1)" in capsys.readouterr().out
    assert not np.array_equal(own, other)
