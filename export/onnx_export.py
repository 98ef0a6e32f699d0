"""PyTorch graph -> checked ONNX file, one `ExportSpec` at a time.

    path = export_onnx(UNetGraph(model), specs["unet"], Path("build/unet/model.onnx"))

Choices, and why:
- The TorchScript-based exporter (`dynamo=False`): it exports our attention and the spec's
  dynamic axes cleanly with onnx 1.23 / torch 2.13, without needing onnxscript.
- The UNet's attention runs on the "math" backend during export (explicit MatMul + Softmax):
  ONNX Runtime fuses that pattern itself and TensorRT's parser accepts it at every opset, while
  a fused SDPA node would need a runtime-specific contrib op. The VAE's single attention block
  calls `scaled_dot_product_attention` directly; the exporter decomposes it into the same
  MatMul/Softmax ops.
- Opset 17: the first with `LayerNormalization`, which TensorRT and ONNX Runtime keep in fp32.
- Models whose weights pass `external_data_threshold` bytes (protobuf's hard limit is 2 GiB)
  keep their weights in one `model.onnx.data` file beside `model.onnx`; ONNX Runtime, TensorRT's
  parser and Triton resolve it by that relative name, so the two files travel together.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from export.specs import ExportSpec
from ldm.modules.attention import attention_backend

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 17
EXTERNAL_DATA_NAME = "model.onnx.data"
# Below protobuf's 2 GiB: the graph itself and tensor headers need room too.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers (what ends up as ONNX initializers)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def export_onnx(
    module: nn.Module,
    spec: ExportSpec,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Export `module` (one of `export.specs.GRAPHS`) to `path` with the spec's names and axes.

    Writes `path` (and `model.onnx.data` beside it for large models), then runs
    `onnx.checker.check_model(full_check=True)` on the file. Returns `path`.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: need >= {MIN_OPSET} (LayerNormalization)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    external = parameter_bytes(module) > external_data_threshold
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        _trace(module, spec, raw, opset)
        staged = _stage(raw, spec, external)
        # A path (not a proto) so the checker also reads models beyond 2 GiB.
        onnx.checker.check_model(str(staged), full_check=True)
        _check_io(staged, spec)
        for f in staged.parent.iterdir():
            target = path if f.name == "model.onnx" else path.parent / f.name
            shutil.move(str(f), target)
    log.info("exported %s -> %s%s", spec.name, path, " (+ external data)" if external else "")
    return path


def _trace(module: nn.Module, spec: ExportSpec, raw: Path, opset: int) -> None:
    """torch.onnx.export of `module` on the spec's batch-1 sample inputs, into `raw`."""
    example = spec.sample_inputs(which=1, generator=torch.Generator().manual_seed(0))
    with attention_backend("math"), torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings (Python scalars baked in as constants) are expected here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(
            module,
            tuple(example.values()),
            str(raw),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=spec.dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _stage(raw: Path, spec: ExportSpec, external: bool) -> Path:
    """Write the traced `raw` model as `out/model.onnx` beside it, with the spec's dim names
    and, when `external`, its weights in `out/model.onnx.data`. Returns out/model.onnx."""
    tmp = raw.parent
    # torch writes one file per tensor for > 2 GiB models: gather them into one data file
    # (streamed, never the whole model in memory); below the threshold, one piece.
    staged = tmp / "out"
    staged.mkdir()
    proto = onnx.load(str(raw), load_external_data=False)
    proto.doc_string = f"ldm export: {spec.name}"
    _name_dims(proto.graph, spec)
    if _has_external(proto):
        _gather_external_data(proto, tmp, staged / EXTERNAL_DATA_NAME)
        onnx.save_model(proto, str(staged / "model.onnx"))
    elif external:
        onnx.load_external_data_for_model(proto, str(tmp))
        onnx.save_model(proto, str(staged / "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=EXTERNAL_DATA_NAME,
                        size_threshold=1024)
    else:
        onnx.save_model(proto, str(staged / "model.onnx"))
    return staged / "model.onnx"


# Tensors start on page boundaries in the data file, so runtimes can map them in place.
DATA_ALIGNMENT = 4096


def _has_external(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def _gather_external_data(proto: onnx.ModelProto, src_dir: Path, data_file: Path) -> None:
    """Append every external tensor's bytes to `data_file` (page-aligned) and point the
    proto at it; one tensor in memory at a time."""
    with open(data_file, "wb") as out:
        for tensor in proto.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            with open(src_dir / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                length = info.get("length")
                blob = f.read(int(length)) if length is not None else f.read()
            pad = -out.tell() % DATA_ALIGNMENT
            out.write(b"\0" * pad)
            offset = out.tell()
            out.write(blob)
            del tensor.external_data[:]
            for key, value in (("location", data_file.name), ("offset", str(offset)),
                               ("length", str(len(blob)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value


def _name_dims(graph: onnx.GraphProto, spec: ExportSpec) -> None:
    """Write the spec's dims onto the graph's outputs where the exporter left them symbolic
    (e.g. the text encoder's 77 tokens come out of a Range op as "LayerNormalization..._1").
    Fixed sizes that disagree with the spec are left alone for `_check_io` to report."""
    for v, t in zip(graph.output, spec.outputs, strict=False):
        for d, want in zip(v.type.tensor_type.shape.dim, t.shape, strict=False):
            if isinstance(want, int) and not d.HasField("dim_value"):
                d.dim_value = want
            elif isinstance(want, str) and not d.HasField("dim_value"):
                d.dim_param = want


def _check_io(path: Path, spec: ExportSpec) -> None:
    """The graph's inputs/outputs carry the spec's names, ranks and static dims."""
    graph = onnx.load(str(path), load_external_data=False).graph
    for kind, actual, expected in (("input", graph.input, spec.inputs),
                                   ("output", graph.output, spec.outputs)):
        names = [v.name for v in actual]
        if names != [t.name for t in expected]:
            raise ValueError(f"{spec.name}: ONNX {kind}s {names} != spec "
                             f"{[t.name for t in expected]}")
        for v, t in zip(actual, expected, strict=True):
            dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            want = list(t.shape)
            if dims != want:
                raise ValueError(f"{spec.name}: {kind} {t.name} has dims {dims}, spec {want}")


def onnx_files(path: str | Path) -> list[Path]:
    """`model.onnx` and its external data file, if any."""
    path = Path(path)
    data = path.parent / EXTERNAL_DATA_NAME
    return [path, data] if data.is_file() else [path]


def file_digest(paths: list[Path], chunk: int = 1 << 20) -> str:
    """sha256 over the contents of `paths` (with their names), in order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def onnx_digest(path: str | Path) -> str:
    """Content hash of an exported model, external data included."""
    return file_digest(onnx_files(path))


def copy_onnx(src: str | Path, dst_dir: str | Path, name: str = "model.onnx") -> Path:
    """Copy (hard-link when possible) a model and its external data file into `dst_dir`."""
    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in onnx_files(src):
        target = dst_dir / (name if f.suffix == ".onnx" else f.name)
        link_or_copy(f, target)
    return dst_dir / name


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (instant, no extra disk for GB-sized weights), else copy."""
    if dst.exists():
        dst.unlink()
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)
