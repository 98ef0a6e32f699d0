"""build_engines end to end on the tiny LDM: repositories per backend, reuse, --force,
atomic replacement, EMA weights, CLI errors."""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.build_engines import main
from export.cache import clean_orphan_homes, staged_directory
from export.repository import MODEL_CONFIG
from export.specs import GRAPHS, build_specs
from export.tensorrt import trt_status

ROOT = Path(__file__).resolve().parents[2]
MODELS = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("build")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def base_args(ckpt: Path, root: Path, out: str = "repo") -> list[str]:
    return ["--checkpoint", str(ckpt), "--out", str(root / out), "--work-dir",
            str(root / "work"), "--quiet"]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def parse_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


@pytest.fixture(scope="module")
def python_repo(tiny_ldm_dir, build_dir):
    """The python-backend repository of the tiny model (built once; the CLI's first run)."""
    rc = main(base_args(tiny_ldm_dir, build_dir))
    assert rc == 0
    return build_dir / "repo"


def test_python_repository(python_repo, tiny_model):
    repo = python_repo
    assert set(MODELS) <= {p.name for p in repo.iterdir() if p.is_dir()}
    for name in MODELS:
        cfg = parse_config(repo / name / "config.pbtxt")
        assert (cfg.name, cfg.backend) == (name, "python")
        version = repo / name / "1"
        # model.py imports the installed package: no copies of our code beside it.
        assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.py"]
        graph = onnx.load(str(version / "model.onnx"))
        assert not [n for n in graph.graph.node if n.domain == "com.microsoft.nchwc"]
    manifest = json.loads((repo / "manifest.json").read_text())
    assert (manifest["backend"], manifest["weights"]) == ("python", "ema")
    for name in MODELS:
        entry = manifest["models"][name]
        assert entry["parity"]["max_rel"] < 1e-4 and entry["ort_level"] in ("extended", "all")
        assert entry["file"] == "model.py"
    assert manifest["models"]["unet"]["max_batch_size"] == 16
    # model_config.yaml: our checkpoint format, readable by ldm.pretrained.read_config.
    from ldm.config import to_dict
    from ldm.pretrained import read_config

    kind, cfg = read_config(_as_checkpoint(repo))
    assert kind == "ldm" and to_dict(cfg) == to_dict(tiny_model.config)
    assert cfg.diffusion.scale_factor == 0.5
    assert manifest["model_config"] == MODEL_CONFIG
    # The export writes the networks; the pipeline models are the serving side's step.
    assert not (repo / "ldm_txt2img").exists()


def _as_checkpoint(repo: Path) -> Path:
    """read_config reads <folder>/config.yaml: point a folder at model_config.yaml."""
    folder = repo.parent / "model_config_as_checkpoint"
    folder.mkdir(exist_ok=True)
    (folder / "config.yaml").write_text((repo / "model_config.yaml").read_text())
    return folder


def test_rerun_reuses_and_force_rebuilds(python_repo, tiny_ldm_dir, build_dir, capsys):
    before = snapshot(python_repo)
    rc, out, _ = run(capsys, *base_args(tiny_ldm_dir, build_dir))
    assert rc == 0 and "up to date, nothing rebuilt" in out
    assert snapshot(python_repo) == before  # not even rewritten
    rc, out, _ = run(capsys, *base_args(tiny_ldm_dir, build_dir), "--force")
    assert rc == 0
    for name in MODELS:
        assert f"{name}: onnx export" in out and f"{name}: onnxruntime graph" in out
        assert f"parity {name}: max abs" in out
    assert "relative = max|onnx - torch| / max|torch|" in out
    assert "exported the UNet's EMA weights (model_ema)" in out
    assert "reused:" not in out


def test_onnxruntime_backend_reuses_the_onnx_files(python_repo, tiny_ldm_dir, build_dir,
                                                   capsys):
    rc, out, _ = run(capsys, *base_args(tiny_ldm_dir, build_dir, "repo_ort"),
                     "--backend", "onnxruntime")
    assert rc == 0 and "onnx export" not in out
    assert all(f"{name}: onnx" in out for name in MODELS)  # listed under "reused:"
    repo = build_dir / "repo_ort"
    for name in MODELS:
        cfg = parse_config(repo / name / "config.pbtxt")
        assert cfg.platform == "onnxruntime_onnx"
        assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert sorted(p.name for p in (repo / name / "1").iterdir()) == ["model.onnx"]
        # The raw export (standard ops only) goes to Triton's ONNX Runtime backend.
        graph = onnx.load(str(repo / name / "1" / "model.onnx"))
        assert {n.domain for n in graph.graph.node} == {""}


def test_tensorrt_backend_without_tensorrt_falls_back(python_repo, tiny_ldm_dir, build_dir,
                                                      capsys, caplog):
    caplog.set_level(logging.WARNING)
    rc, _, _ = run(capsys, *base_args(tiny_ldm_dir, build_dir, "repo_trt"),
                   "--backend", "tensorrt")
    assert rc == 0
    manifest = json.loads((build_dir / "repo_trt" / "manifest.json").read_text())
    assert manifest["requested_backend"] == "tensorrt"
    available, why = trt_status()
    if available:  # a GPU host: real plans
        assert manifest["backend"] == "tensorrt"
        cfg = parse_config(build_dir / "repo_trt" / "unet" / "config.pbtxt")
        assert cfg.platform == "tensorrt_plan"
        assert (build_dir / "repo_trt" / "unet" / "1" / "model.plan").is_file()
    else:
        assert manifest["backend"] == "onnxruntime"
        notes = [r.getMessage() for r in caplog.records if "TensorRT" in r.getMessage()]
        assert notes == [f"TensorRT engines skipped ({why}); writing the onnxruntime backend "
                         "instead"]


def test_failed_build_keeps_the_previous_repository(python_repo, tiny_ldm_dir, build_dir,
                                                    capsys):
    before = snapshot(python_repo)
    rc, _, err = run(capsys, *base_args(tiny_ldm_dir, build_dir), "--force",
                     "--parity-tol", "1e-12")
    assert rc == 1 and "FAIL (> 1e-12)" in err
    assert snapshot(python_repo) == before
    assert not [p for p in build_dir.iterdir() if p.name.startswith(".repo.build-")]


def test_staged_directory_swaps_only_on_success(tmp_path):
    out = tmp_path / "repo"
    with staged_directory(out) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError), staged_directory(out) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("step failed")
    assert (out / "a.txt").read_text() == "one"
    with staged_directory(out) as tmp:
        (tmp / "b.txt").write_text("three")
    # `repo` links to its folder; the previous one is kept until the next swap, no other.
    homes = sorted(p for p in tmp_path.iterdir() if p.name.startswith(".repo@"))
    assert sorted(p.name for p in tmp_path.iterdir() if p not in homes) == ["repo"]
    assert len(homes) == 2 and out.is_symlink() and out.resolve() in homes
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_readers_see_the_old_repository_or_the_new_one(tmp_path):
    """Swapped 200 times while a thread reads: every read finds a whole repository."""
    import threading

    out = tmp_path / "repo"
    with staged_directory(out) as tmp:
        (tmp / "a.txt").write_text("0")
    seen, stop = [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append((out / "a.txt").read_text())
            except OSError as e:
                seen.append(repr(e))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(1, 200):
        with staged_directory(out) as tmp:
            (tmp / "a.txt").write_text(str(i))
    stop.set()
    reader.join()
    assert seen and all(s.isdigit() for s in seen), [s for s in seen if not s.isdigit()][:3]
    assert (out / "a.txt").read_text() == "199"
    assert len(list(tmp_path.iterdir())) == 3  # the link, its folder and the previous one


def test_a_real_folder_becomes_a_link_and_orphans_are_removed(tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "old.txt").write_text("written before repositories were links")
    with staged_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert out.is_symlink() and sorted(p.name for p in out.iterdir()) == ["new.txt"]
    orphan = tmp_path / ".repo@999999999-killed"  # a build killed before its flip
    orphan.mkdir()
    assert clean_orphan_homes(out) == [orphan]
    assert not orphan.exists() and (out / "new.txt").is_file()


def test_readme_is_kept_and_foreign_folders_are_refused(tiny_ldm_dir, build_dir, capsys):
    out = build_dir / "with_readme"
    out.mkdir()
    (out / "README.md").write_text("hello")
    rc, _, _ = run(capsys, *base_args(tiny_ldm_dir, build_dir, "with_readme"),
                   "--models", "text_encoder")
    assert rc == 0 and (out / "README.md").read_text() == "hello"
    assert (out / "text_encoder" / "config.pbtxt").is_file()
    foreign = build_dir / "foreign"
    (foreign / "some_model").mkdir(parents=True)
    rc, _, err = run(capsys, *base_args(tiny_ldm_dir, build_dir, "foreign"))
    assert rc == 1 and "no manifest.json" in err and str(foreign) in err
    assert (foreign / "some_model").is_dir()


def test_compvis_checkpoint_exports_the_ema_weights(tmp_path, capsys):
    """A CompVis .ckpt whose model_ema differs from the weights: the UNet graph must carry the
    EMA weights (and the training weights with --no-ema)."""
    from ldm.compat import ldm_config
    from ldm.models.diffusion import LatentDiffusion

    config = ROOT / "tests" / "fixtures" / "compvis_tiny_txt2img.yaml"
    cfg = ldm_config(yaml.safe_load(config.read_text())["model"])
    cfg.diffusion.use_ema = True
    torch.manual_seed(0)
    model = LatentDiffusion(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for name in model.model_ema.m_name2s_name.values():
            getattr(model.model_ema, name).add_(0.05)
        # The sampler uses the checkpoint's abar_t buffer, which need not be the config's
        # schedule exactly (ldm.pack --dtype float16 rounds it): the repository keeps it.
        model.alphas_cumprod.copy_(model.alphas_cumprod.half().float())
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "global_step": 1}, ckpt)

    spec = build_specs(cfg)["unet"]
    inputs = spec.sample_inputs(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        training = GRAPHS["unet"](model)(*inputs.values()).numpy()
        model.model_ema.copy_to(model.model)
        ema = GRAPHS["unet"](model)(*inputs.values()).numpy()
    assert np.abs(ema - training).max() > 1e-2

    outputs = {}
    for flag in ([], ["--no-ema"]):
        out = tmp_path / f"repo{len(flag)}"
        rc, said, err = run(capsys, "--checkpoint", str(ckpt), "--compvis-config", str(config),
                         "--out", str(out), "--work-dir", str(tmp_path / "work"),
                         "--models", "unet", "--quiet", *flag)
        assert rc == 0, err
        assert ("exported the training weights" if flag else "EMA weights") in said
        session = ort.InferenceSession(str(out / "unet" / "1" / "model.onnx"),
                                       providers=["CPUExecutionProvider"])
        outputs[bool(flag)] = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["weights"] == ("training" if flag else "ema")
        np.testing.assert_array_equal(np.load(out / manifest["schedule"]),
                                      model.alphas_cumprod.numpy())
        assert manifest["checkpoint"]["compvis_config"] == str(config)
    assert np.abs(outputs[False] - ema).max() < 1e-4 * np.abs(ema).max()
    assert np.abs(outputs[True] - training).max() < 1e-4 * np.abs(training).max()


def test_cli_errors_name_the_bad_value(tiny_ldm_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tiny_ldm_dir), "--backend", "triton"])
    assert e.value.code == 2
    assert "--backend 'triton' is not one of: python, onnxruntime, tensorrt" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tiny_ldm_dir), "--models", "unet,vae"])
    assert "--models entry 'vae' is not one of" in capsys.readouterr().err
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(ckpt)])
    assert f"--checkpoint {ckpt} is a file: a CompVis .ckpt needs --compvis-config" in \
        capsys.readouterr().err


def test_script_entry_point_names_a_missing_checkpoint(tmp_path):
    """`python export/build_engines.py` (not -m) from another folder."""
    missing = tmp_path / "no_such_checkpoint"
    proc = subprocess.run([sys.executable, str(ROOT / "export" / "build_engines.py"),
                           "--checkpoint", str(missing)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert f"--checkpoint {missing}: no such file or folder" in proc.stderr
