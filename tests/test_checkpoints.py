"""Checkpoint files as users bring them: every Lightning layout and safetensors, read safely,
memory-mapped, into a model built without weights of its own (ldm/checkpoints.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from ldm.checkpoints import (
    CheckpointError,
    assign_state,
    empty_weights,
    map_safetensors,
    read_checkpoint,
    save_lightning_checkpoint,
)
from ldm.compat import ldm_config, load_compvis

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "fixtures" / "compvis_tiny_txt2img.yaml"


@pytest.fixture(scope="module")
def state():
    """A tiny CompVis-keyed LatentDiffusion state dict with random non-zero weights."""
    from ldm.models.diffusion import LatentDiffusion

    torch.manual_seed(0)
    model = LatentDiffusion(ldm_config(yaml.safe_load(CONFIG.read_text())["model"]))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return {k: v.clone() for k, v in model.state_dict().items()}


def mapped_from(tensor: torch.Tensor, path: Path) -> bool:
    """Whether the tensor's memory is a mapping of `path` (per /proc/self/maps)."""
    addr = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == str(path.resolve()):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


def assert_same(model, state):
    own = model.state_dict()
    assert set(own) == set(state)
    for k, v in state.items():
        assert torch.equal(own[k], v), k


@pytest.mark.parametrize("layout", ["1.4", "1.5"])
def test_lightning_layouts_load_safely_without_lightning(tmp_path, state, layout):
    path = tmp_path / "model.ckpt"
    save_lightning_checkpoint(path, state, layout=layout, global_step=11)
    raw = torch.load(path, weights_only=False) if layout == "1.5" else None
    if raw is not None:  # the 1.5 layout really has Lightning's other keys
        assert {"loops", "hyper_parameters", "optimizer_states", "lr_schedulers",
                "pytorch-lightning_version", "callbacks"} <= set(raw)
    # A fresh interpreter: nothing of Lightning importable, and weights_only loading.
    code = (f"import sys; from ldm.compat import load_compvis; "
            f"m = load_compvis({str(CONFIG)!r}, {str(path)!r}); "
            "assert 'pytorch_lightning' not in sys.modules; print(m.num_timesteps)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "1000", r.stderr
    assert_same(load_compvis(CONFIG, path), state)


def test_the_1_4_layout_keys_callbacks_by_the_class(tmp_path, state):
    # What makes the CompVis releases need a global: the class object itself is a dict key.
    path = tmp_path / "model.ckpt"
    save_lightning_checkpoint(path, {"w": torch.ones(1)}, layout="1.4")
    with pytest.raises(Exception, match="ModelCheckpoint"):
        torch.load(path, weights_only=True)  # torch's reader alone refuses it
    assert set(read_checkpoint(path)) == {"w"}


def test_compvis_keyed_safetensors_load_mapped(tmp_path, state):
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    model = load_compvis(CONFIG, path)
    assert_same(model, state)
    # The weights are the file's pages, not a copy.
    assert mapped_from(model.model.diffusion_model.out[2].weight, path)
    assert mapped_from(model.cond_stage_model.transformer.token_emb.weight, path)


def test_ckpt_weights_are_memory_mapped(tmp_path, state):
    path = tmp_path / "model.ckpt"
    save_lightning_checkpoint(path, state)
    model = load_compvis(CONFIG, path)
    # torch.load(mmap=True) maps the file; the parameters are views into it.
    assert all(mapped_from(p, path) for p in model.model.parameters())
    assert not any(t.is_meta for t in model.parameters())


def test_other_globals_are_refused_naming_the_global_and_the_flag(tmp_path, state):
    class Evil:
        def __reduce__(self):
            return (print, ("this would run code",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "callbacks": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"the global \S*print.*--unsafe-allow-pickle"):
        read_checkpoint(path)
    assert set(read_checkpoint(path, allow_pickle=True)) == set(state)


def test_unsafe_flag_with_a_missing_module_is_one_clear_line(tmp_path):
    from ldm.checkpoints import _importable, _stand_in

    thing = _stand_in("not_installed_pkg.sub.Thing")
    path = tmp_path / "needs_module.ckpt"
    with _importable((thing,)):
        torch.save({"state_dict": {"w": torch.ones(1)}, "extra": thing}, path)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path, allow_pickle=True)
    assert "not_installed_pkg" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="not_installed_pkg.sub.Thing"):
        read_checkpoint(path)


def test_legacy_non_zip_files_still_load(tmp_path, state):
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": state}, path, _use_new_zipfile_serialization=False)
    model = load_compvis(CONFIG, path)
    assert_same(model, state)
    assert not mapped_from(model.model.diffusion_model.out[2].weight, path)  # read whole


def test_empty_weights_builds_parameters_on_meta_and_keeps_buffers():
    with empty_weights():
        layer = nn.Linear(4096, 4096)
        layer.register_buffer("table", torch.arange(3.0))
    assert layer.weight.is_meta and layer.bias.is_meta
    assert torch.equal(layer.table, torch.arange(3.0))
    assert not nn.Linear(2, 2).weight.is_meta  # the patch is gone after the block


def test_assign_state_casts_and_refuses_missing_weights():
    with empty_weights():
        layer = nn.Linear(3, 2)
    half = {"weight": torch.randn(2, 3).half(), "bias": torch.randn(2).half()}
    assign_state(layer, half, "half.ckpt")
    assert layer.weight.dtype == torch.float32
    torch.testing.assert_close(layer.weight, half["weight"].float())
    with empty_weights():
        other = nn.Linear(3, 2)
    with pytest.raises(KeyError, match="missing keys.*bias"):
        assign_state(other, {"weight": torch.zeros(2, 3)}, "partial.ckpt")


def test_map_safetensors_reads_every_dtype(tmp_path):
    tensors = {"f": torch.randn(3, 2), "h": torch.randn(5).half(), "i": torch.arange(7),
               "b": torch.tensor([True, False]), "bf": torch.randn(2).bfloat16()}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    got = map_safetensors(tmp_path / "t.safetensors")
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        map_safetensors(tmp_path / "bad.safetensors")
