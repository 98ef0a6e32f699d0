"""The emoji pack command on tarballs laid out as the npm packages are (built here)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data import emoji
from ldm.data.imagefolder import ImageFolderDataset

ENTRIES = [
    {"name": "GRINNING FACE", "image": "1f600.png", "category": "Smileys & Emotion",
     "subcategory": "face-smiling", "has_img_google": True, "has_img_twitter": True},
    {"name": "WAVING HAND SIGN", "image": "1f44b.png", "category": "People & Body",
     "subcategory": "hand-fingers-open", "has_img_google": True, "has_img_twitter": True,
     "skin_variations": {"1F3FD": {"image": "1f44b-1f3fd.png"},
                         "1F3FB-1F3FF": {"image": "1f44b-1f3fb-1f3ff.png"}}},
    {"name": "NO ARTWORK", "image": "ffff.png", "category": "Symbols", "subcategory": "x",
     "has_img_google": False, "has_img_twitter": False},
]


def png(color) -> bytes:
    a = np.zeros((64, 64, 4), np.uint8)
    a[16:48, 16:48] = (*color, 255)
    buf = io.BytesIO()
    Image.fromarray(a, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def npm_tarball(path: Path, style: str) -> Path:
    files = {"package/package.json": json.dumps({"name": f"emoji-datasource-{style}"}).encode(),
             "package/emoji.json": json.dumps(ENTRIES).encode()}
    for image in ("1f600.png", "1f44b.png", "1f44b-1f3fd.png", "1f44b-1f3fb-1f3ff.png"):
        files[f"package/img/{style}/64/{image}"] = png((255, 200, 0))
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_pack_writes_an_imagefolder_with_captions_and_attribution(tmp_path):
    tarballs = [npm_tarball(tmp_path / f"{s}.tgz", s) for s in ("google", "twitter")]
    out = tmp_path / "emoji"
    assert emoji.main(["--out", str(out), "--tarball", str(tarballs[0]),
                       "--tarball", str(tarballs[1])]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["style"] for r in rows} == {"google", "twitter"}
    texts = [r["text"] for r in rows if r["style"] == "twitter"]
    assert texts == ["grinning face", "waving hand sign", "waving hand sign, medium skin tone",
                     "waving hand sign, light skin tone, dark skin tone"]
    assert {r["name"] for r in rows} == {"grinning face", "waving hand sign"}
    assert rows[0] == {"file_name": "google/1f600.png", "text": "grinning face",
                       "name": "grinning face", "category": "Smileys & Emotion",
                       "subcategory": "face-smiling", "style": "google"}
    with Image.open(out / "twitter" / "1f600.png") as im:
        assert im.mode == "RGBA"  # as published; the loader composites it
    attribution = (out / "ATTRIBUTION.md").read_text()
    assert "Twemoji" in attribution and "CC-BY 4.0" in attribution and "Apache" in attribution
    image = ImageFolderDataset(out, 32)[0]["image"]  # trains as it is
    assert image.shape == (3, 32, 32) and float(image[:, 0, 0].min()) == 1.0  # white corner


def test_a_tarball_of_another_package_is_refused(tmp_path, capsys):
    bad = tmp_path / "x.tgz"
    with tarfile.open(bad, "w:gz") as tar:
        data = json.dumps({"name": "left-pad"}).encode()
        info = tarfile.TarInfo("package/package.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert emoji.main(["--out", str(tmp_path / "o"), "--tarball", str(bad)]) == 2
    assert "package 'left-pad' is not one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        emoji.main(["--out", str(tmp_path / "o"), "--styles", "apple"])
    assert "--styles 'apple': each must be one of google, twitter" in capsys.readouterr().err


def test_a_download_that_is_not_the_pinned_package_is_refused(tmp_path, monkeypatch):
    # No downloads in tests: the registry is replaced by one serving other bytes.
    served = []

    def urlopen(url, timeout):
        served.append(url)
        return io.BytesIO(b"not the package")

    monkeypatch.setattr(emoji.urllib.request, "urlopen", urlopen)
    try:
        emoji.download("google", tmp_path)
    except ValueError as e:
        assert "is not the pinned fb5fd131" in str(e)
    else:
        raise AssertionError("a wrong download was accepted")
    assert served == [emoji.tarball_url("google")] == [
        "https://registry.npmjs.org/emoji-datasource-google/-/emoji-datasource-google-"
        f"{emoji.VERSION}.tgz"]
