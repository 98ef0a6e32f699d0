"""Read checkpoint files without copying their weights, and build models around them.

    state = read_checkpoint("model.ckpt")            # {key: tensor}, memory-mapped
    with empty_weights():
        model = LatentDiffusion(cfg)                 # parameters on "meta": no memory, no init
    assign_state(model, state, "model.ckpt")         # strict keys; the model now *is* the file

Why: a 1.45 B-parameter model is 6 GB of float32. Reading the file (a copy) and building a
randomly initialised model beside it (a second copy) doubles the peak. Here the file is
mapped (`torch.load(mmap=True)`, or the safetensors layout mapped directly), the model is
built with parameters on the meta device, and `load_state_dict(assign=True)` makes each
parameter the mapped tensor. Pages are read from disk as the weights are first used and can
be dropped again by the kernel (the mapping is private: writes, e.g. fine-tuning, copy).

Lightning checkpoints (`.ckpt`). The CompVis releases were saved by PyTorch Lightning 1.4,
whose `callbacks` dict is keyed by the `ModelCheckpoint` class object itself, so unpickling
needs that global. Lightning is not needed (nor imported): its classes are mapped to inert
stand-ins through torch's safe-globals allowlist and `torch.load(weights_only=True)` reads the
file; only the tensors of `state_dict` are used. Any other global is refused with a message
naming it; `allow_pickle=True` (`--unsafe-allow-pickle`) lifts that for files you trust.
"""
from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
import sys
import types
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

PICKLE_FLAG = "allow_pickle=True (CLI: --unsafe-allow-pickle)"


def _stand_in(path: str, base: type = object) -> type:
    """An empty class that pickles and unpickles as the global `path` ("pkg.mod.Name")."""
    module, _, name = path.rpartition(".")
    return type(name, (base,), {"__module__": module, "__qualname__": name,
                                "__doc__": f"Inert stand-in for {path} (never imported)."})


# Globals that Lightning checkpoints reference besides tensors and builtins: the callback
# classes used as `callbacks` keys by 1.4.x (1.5+ keys them by strings and stores
# `hyper_parameters` as a plain dict).
LIGHTNING_GLOBALS: tuple[type, ...] = (
    _stand_in("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    _stand_in("pytorch_lightning.callbacks.early_stopping.EarlyStopping"),
)
MODEL_CHECKPOINT = LIGHTNING_GLOBALS[0]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as asked; the message says why and what to do."""


# --- reading -------------------------------------------------------------------------------

def read_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The tensors of a checkpoint's state dict, memory-mapped where the format allows.

    `.ckpt`/`.pt`/`.pth`: a torch pickle, Lightning layout (`state_dict` inside) or a bare
    state dict. `.safetensors`: mapped directly. Non-tensor entries of a state dict are
    dropped (Lightning keeps none; some tools add counters).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        return map_safetensors(path)
    obj = _torch_load(path, allow_pickle)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: no state_dict found (top-level keys: "
                              f"{sorted(obj)[:8] if isinstance(obj, dict) else type(obj)})")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def _torch_load(path: Path, allow_pickle: bool):
    """torch.load, mapped when the file is in the zip format (torch >= 1.6 writes it)."""
    try:
        return _load(path, allow_pickle, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e):
            raise
        log.info("%s is in torch's legacy format: reading it whole (no memory map)", path)
        return _load(path, allow_pickle, mmap=False)


def _load(path: Path, allow_pickle: bool, mmap: bool):
    """The safe reader first; the full unpickler only with `allow_pickle` and only when the
    safe one refuses the file (so Lightning files never need Lightning installed)."""
    try:
        with torch.serialization.safe_globals(list(LIGHTNING_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            raise CheckpointError(f"{path} needs {_refused(e)} to unpickle, which could run "
                                  f"code, so it was refused. If you trust the file, pass "
                                  f"{PICKLE_FLAG}.") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except ModuleNotFoundError as e:
        raise CheckpointError(f"{path}: unpickling it needs the module {e.name!r}, which is "
                              "not installed here") from None
    except AttributeError as e:
        raise CheckpointError(f"{path}: unpickling it failed: {e}") from None


def _refused(e: pickle.UnpicklingError) -> str:
    """What torch's safe unpickler refused, in a few words."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    if found:
        return f"the global {found.group(1)}"
    detail = re.search(r"WeightsUnpickler error: *\n*(.+)", str(e))
    return f"objects beyond tensors ({detail.group(1).strip()})" if detail else "objects"


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def map_safetensors(path: str | Path) -> dict[str, Tensor]:
    """A `.safetensors` file's tensors as views of one private memory map of the file.

    Layout: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets: [begin, end]}} and the data; offsets count from the end of the header.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= size - 8:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,))
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        begin, end = meta["data_offsets"]
        chunk = raw[base + begin: base + end]
        if (base + begin) % dtype.itemsize:  # unaligned: a copy is the only way to view it
            chunk = chunk.clone()
        out[name] = chunk.view(dtype).reshape(meta["shape"])
    return out


def tensor_bytes(state: Mapping[str, Tensor]) -> int:
    """Bytes of the tensors in `state` (numel x element size, summed)."""
    return sum(t.numel() * t.element_size() for t in state.values())


# --- building ------------------------------------------------------------------------------

@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device: no memory, no init.

    Buffers stay real (the diffusion schedule is computed, not loaded). A module's
    `torch.empty` weight is moved to meta as it is registered, before `reset_parameters`
    would fill it, so its pages are never touched.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def check_keys(model: nn.Module, state: Mapping[str, Tensor], name: str) -> None:
    """Strict key and shape check, with a message that names the offending keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(
            f"{name}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        first = bad[0]
        raise ValueError(f"{name}: shape mismatch for {bad[:5]} (model "
                         f"{tuple(own[first].shape)}, checkpoint {tuple(state[first].shape)})")


def assign_state(model: nn.Module, state: Mapping[str, Tensor], name: str) -> nn.Module:
    """Load `state` strictly by assignment: parameters and buffers become its tensors (cast
    to the model's dtype where they differ, e.g. a float16 file into a float32 model)."""
    check_keys(model, state, name)
    own = model.state_dict()
    cast = {k: v.to(own[k].dtype) if v.dtype != own[k].dtype else v for k, v in state.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    left = [k for k, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{name}: no weights for {left[:5]} (built empty, not in the file)")
    return model


# --- writing Lightning layouts (tests and the scale trial) ---------------------------------

@contextlib.contextmanager
def _importable(classes: tuple[type, ...]) -> Iterator[None]:
    """Make the stand-ins importable under their module paths while pickling references."""
    added = []
    for cls in classes:
        parts = cls.__module__.split(".")
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod not in sys.modules:
                sys.modules[mod] = types.ModuleType(mod)
                added.append(mod)
        setattr(sys.modules[cls.__module__], cls.__qualname__, cls)
    try:
        yield
    finally:
        for mod in added:
            sys.modules.pop(mod, None)


def save_lightning_checkpoint(path: str | Path, state_dict: Mapping[str, Tensor],
                              layout: str = "1.4", global_step: int = 0) -> None:
    """Write `state_dict` as PyTorch Lightning saves a checkpoint, without Lightning.

    layout "1.4": `callbacks` keyed by the ModelCheckpoint class (as the CompVis releases);
    "1.5": keyed by strings, with `loops` and `hyper_parameters` (an AttributeDict).
    """
    if layout not in ("1.4", "1.5"):
        raise ValueError(f"layout {layout!r}; allowed: 1.4, 1.5")
    ckpt_state = {"monitor": "val/loss_simple_ema", "best_model_score": torch.tensor(0.123),
                  "best_model_path": "logs/checkpoints/last.ckpt", "current_score": None,
                  "dirpath": "logs/checkpoints"}
    optimizer = {"state": {}, "param_groups": [{"lr": 5e-5, "betas": (0.9, 0.999),
                                                "eps": 1e-8, "weight_decay": 0.0,
                                                "amsgrad": False, "params": [0, 1]}]}
    checkpoint = {
        "epoch": 3, "global_step": global_step,
        "pytorch-lightning_version": "1.4.2" if layout == "1.4" else "1.5.10",
        "state_dict": dict(state_dict),
        "optimizer_states": [optimizer],
        "lr_schedulers": [{"base_lrs": [5e-5], "last_epoch": global_step,
                           "_step_count": global_step + 1, "lr_lambdas": [None]}],
    }
    if layout == "1.4":
        checkpoint["callbacks"] = {MODEL_CHECKPOINT: ckpt_state}
    else:
        checkpoint["callbacks"] = {"ModelCheckpoint{'monitor': 'val/loss_simple_ema'}":
                                   ckpt_state}
        checkpoint["loops"] = {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}}
        checkpoint["hparams_name"] = "kwargs"
        checkpoint["hyper_parameters"] = {"base_learning_rate": 5e-5}
    with _importable(LIGHTNING_GLOBALS):
        torch.save(checkpoint, path)
