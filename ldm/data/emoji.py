"""Pack the Noto and Twemoji emoji into an imagefolder: `python -m ldm.data.emoji --out DIR`.

    python -m ldm.data.emoji --out data/emoji                     # downloads 136 MB from npm
    python -m ldm.data.emoji --out data/emoji --tarball a.tgz --tarball b.tgz   # offline

The artwork comes from iamcal's emoji-data packages on npm, `emoji-datasource-google@16.0.0`
(Noto Emoji, Apache-2.0) and `emoji-datasource-twitter@16.0.0` (Twemoji, CC-BY-4.0): 64x64
RGBA PNGs and `emoji.json` (names, categories, skin-tone variations). The tarballs are
checked against pinned sha256 digests. Written into DIR:

- `<style>/<code points>.png`: the PNGs as they are (RGBA: the training data loader
  composites them over `data.background`, white by default);
- `metadata.jsonl`: one line per image, `{"file_name", "text", "name", "category",
  "subcategory", "style"}`; `text` is the caption: the emoji's name in lower case, with its
  skin tones ("waving hand sign, medium skin tone"); `name` is the base name without them;
- `ATTRIBUTION.md`: the licences and the attribution CC-BY-4.0 requires for Twemoji.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

VERSION = "16.0.0"
STYLES = ("google", "twitter")
# sha256 of the npm tarballs (registry.npmjs.org), checked after download.
SHA256 = {
    "google": "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438",
    "twitter": "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877",
}
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium",
              "1F3FE": "medium-dark", "1F3FF": "dark"}
ATTRIBUTION = """# Emoji artwork in this folder

Packed by `python -m ldm.data.emoji` from the npm packages emoji-datasource-google@{v} and
emoji-datasource-twitter@{v} (https://github.com/iamcal/emoji-data, MIT for the data files).

- `google/`: Noto Emoji, Copyright Google Inc., licensed under the Apache License 2.0
  (https://github.com/googlefonts/noto-emoji/blob/main/LICENSE).
- `twitter/`: Twemoji graphics, Copyright 2019 Twitter, Inc and other contributors
  (https://github.com/jdecked/twemoji), licensed under CC-BY 4.0
  (https://creativecommons.org/licenses/by/4.0/). The images were not modified here;
  models trained on them and images they make must carry this attribution too.
"""


def tarball_url(style: str) -> str:
    name = f"emoji-datasource-{style}"
    return f"https://registry.npmjs.org/{name}/-/{name}-{VERSION}.tgz"


def download(style: str, cache: Path) -> Path:
    """The style's tarball in `cache`, downloaded unless already there with the right digest."""
    path = cache / f"emoji-datasource-{style}-{VERSION}.tgz"
    if path.is_file() and digest(path.read_bytes()) == SHA256[style]:
        return path
    print(f"downloading {tarball_url(style)}", file=sys.stderr)
    with urllib.request.urlopen(tarball_url(style), timeout=120) as r:
        data = r.read()
    if digest(data) != SHA256[style]:
        raise ValueError(f"{tarball_url(style)}: sha256 {digest(data)} is not the pinned "
                         f"{SHA256[style]}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def captions(entry: dict) -> list[tuple[str, str, str]]:
    """(image file, caption, base name) of an emoji.json entry and of its skin variations."""
    name = entry["name"].lower()
    out = [(entry["image"], name, name)]
    for key, variation in (entry.get("skin_variations") or {}).items():
        tones = [SKIN_TONES[t] for t in key.split("-") if t in SKIN_TONES]
        caption = name + "".join(f", {t} skin tone" for t in dict.fromkeys(tones))
        out.append((variation["image"], caption, name))
    return out


def style_of(tar: tarfile.TarFile) -> str:
    """Which style a tarball holds (its package.json name)."""
    meta = json.load(tar.extractfile("package/package.json"))
    style = meta["name"].removeprefix("emoji-datasource-")
    if style not in STYLES:
        raise ValueError(f"{tar.name}: package {meta['name']!r} is not one of "
                         f"{[f'emoji-datasource-{s}' for s in STYLES]}")
    return style


def pack_style(tar: tarfile.TarFile, style: str, out: Path) -> list[dict]:
    """Write one style's PNGs into out/<style>/; its metadata rows."""
    entries = json.load(tar.extractfile("package/emoji.json"))
    folder = out / style
    folder.mkdir(parents=True, exist_ok=True)
    rows, flag = [], f"has_img_{style}"
    for entry in entries:
        for image, text, name in captions(entry):
            member = f"package/img/{style}/64/{image}"
            try:
                data = tar.extractfile(member).read()
            except KeyError:  # no artwork of this emoji in this style
                continue
            if not entry.get(flag, True):
                continue
            (folder / image).write_bytes(data)
            rows.append({"file_name": f"{style}/{image}", "text": text, "name": name,
                         "category": entry["category"], "subcategory": entry["subcategory"],
                         "style": style})
    return rows


def pack(tarballs: list[Path], out: Path) -> list[dict]:
    """Every tarball's images and one metadata.jsonl in `out`; the rows written."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for path in tarballs:
        with tarfile.open(fileobj=io.BytesIO(Path(path).read_bytes()), mode="r:gz") as tar:
            rows += pack_style(tar, style_of(tar), out)
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "ATTRIBUTION.md").write_text(ATTRIBUTION.format(v=VERSION))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm.data.emoji",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the imagefolder to write")
    p.add_argument("--styles", default=",".join(STYLES), help="google, twitter or both")
    p.add_argument("--tarball", type=Path, action="append",
                   help="an emoji-datasource-*.tgz already downloaded (repeatable)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ldm-emoji")
    args = p.parse_args(argv)
    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    bad = [s for s in styles if s not in STYLES]
    if bad or not styles:
        p.error(f"--styles {args.styles!r}: each must be one of {', '.join(STYLES)}")
    try:
        tarballs = args.tarball or [download(s, args.cache) for s in styles]
        missing = [t for t in tarballs if not Path(t).is_file()]
        if missing:
            raise FileNotFoundError(f"--tarball {missing[0]}: no such file")
        rows = pack(tarballs, args.out)
    except (OSError, ValueError, KeyError, tarfile.TarError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = {s: sum(r["style"] == s for r in rows) for s in STYLES}
    print(f"wrote {len(rows)} images to {args.out} ({counts}); see {args.out}/ATTRIBUTION.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
