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
