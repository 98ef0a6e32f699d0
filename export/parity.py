"""A runtime (ONNX Runtime, OpenVINO) vs PyTorch on fresh random inputs, at several points of
the spec's profile.

Error measures, per output tensor, then the maximum over outputs and profile points:
    max_abs = max |a - b|
    max_rel = max |a - b| / max |b|        (a: ONNX Runtime, b: PyTorch)
The relative error is normalised by the reference's largest magnitude, not element-wise:
element-wise |a - b| / |b| explodes where b crosses zero (every UNet output has such
elements), while a graph that is wrong anywhere shows up as a large max_rel. The check fails
above `tol` (1e-4 for fp32: reordered float32 sums stay near 1e-6).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from export.ort import make_session
from export.specs import ExportSpec

log = logging.getLogger(__name__)

DEFAULT_TOL = 1e-4


class ParityError(AssertionError):
    """The ONNX graph disagrees with PyTorch beyond the tolerance."""


@dataclass
class ParityReport:
    name: str
    max_abs: float
    max_rel: float
    tol: float
    seed: int
    points: list[dict] = field(default_factory=list)  # axis sizes and errors per point
    # Outputs whose PyTorch reference was all zeros somewhere: agreement there proves little
    # (e.g. a freshly initialised UNet, whose output convolution starts at zero).
    all_zero_outputs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.max_rel <= self.tol)

    def summary(self) -> str:
        verdict = "ok" if self.ok else f"FAIL (> {self.tol:g})"
        return (f"{self.name}: max abs {self.max_abs:.2e}, max rel {self.max_rel:.2e} over "
                f"{len(self.points)} shapes, {verdict}")

    def to_dict(self) -> dict:
        return asdict(self)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|); the second is max_abs when b is all zeros."""
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
    if not np.isfinite(diff):  # NaN/inf anywhere in the ONNX output is a failure, not a max
        return float("inf"), float("inf")
    scale = float(np.max(np.abs(expected)))
    return diff, diff / scale if scale > 0 else diff


def parity_points(spec: ExportSpec) -> list[dict[str, int]]:
    """Axis sizes to test: the profile's min, opt and max, plus max batch at min resolution
    (the shapes where a wrongly-fixed axis shows up), without duplicates."""
    points = [{axis: v[i] for axis, v in spec.profile.items()} for i in range(3)]
    if len(spec.profile) > 1:
        points.append({axis: v[2] if axis == "batch" else v[0]
                       for axis, v in spec.profile.items()})
    unique = []
    for p in points:
        if p not in unique:
            unique.append(p)
    return unique


def check_parity(
    module: nn.Module,
    model: str | Path | ort.InferenceSession,
    spec: ExportSpec,
    tol: float = DEFAULT_TOL,
    seed: int | None = None,
    points: list[dict[str, int]] | None = None,
) -> ParityReport:
    """Run `module` (PyTorch, default attention kernel) and the ONNX model on the same fresh
    random inputs at each profile point; raise ParityError when max_rel > tol.

    `seed` None draws a new one (logged and reported, so a failure can be replayed).
    """
    references = reference_outputs(module, spec, seed, points)
    return compare_with_onnx(model, spec, references, tol)


@dataclass
class References:
    """PyTorch's outputs on seeded random inputs, kept so the module can go before ONNX
    Runtime loads the graph (a 3.5 GB UNet then is never resident twice)."""

    seed: int
    cases: list[tuple[dict[str, int], dict[str, torch.Tensor], tuple[torch.Tensor, ...]]]


# (batch, generator) -> a UNet `context` input (text_contexts).
Contexts = Callable[[int, torch.Generator], torch.Tensor]


def reference_outputs(module: nn.Module | Callable[..., Any], spec: ExportSpec,
                      seed: int | None = None,
                      points: list[dict[str, int]] | None = None,
                      contexts: Contexts | None = None,
                      ) -> References:
    """`module`'s outputs at each profile point on fresh random inputs from `seed` (a module
    is put in eval mode; any callable taking the inputs in spec order will do). `contexts`
    (batch, generator) -> a `context` input in place of a N(0, 1) one (see text_contexts)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    generator = torch.Generator().manual_seed(seed)
    if isinstance(module, nn.Module):
        module = module.eval()
    cases = []
    for point in points or parity_points(spec):
        inputs = spec.sample_inputs(generator=generator, **point)
        if contexts is not None and "context" in inputs:
            inputs["context"] = contexts(inputs["context"].shape[0], generator)
        with torch.no_grad():
            expected = module(*inputs.values())
        cases.append((point, inputs, expected if isinstance(expected, tuple) else (expected,)))
    return References(seed, cases)


def compare_with_onnx(model: str | Path | ort.InferenceSession, spec: ExportSpec,
                      references: References, tol: float = DEFAULT_TOL) -> ParityReport:
    """The ONNX model on the references' inputs; ParityError when max_rel > tol."""
    session = model if isinstance(model, ort.InferenceSession) else make_session(model)
    names = [t.name for t in spec.outputs]
    return compare_outputs(lambda inputs: session.run(names, inputs), spec, references, tol)


def compare_outputs(run: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
                    spec: ExportSpec, references: References, tol: float = DEFAULT_TOL,
                    label: str = "") -> ParityReport:
    """`run(inputs by name) -> outputs in spec order` (any runtime) on the references'
    inputs; ParityError when max_rel > tol or any output holds NaN or Inf."""
    report = ParityReport(spec.name + label, 0.0, 0.0, tol, references.seed)
    for point, inputs, expected in references.cases:
        actual = run({k: v.numpy() for k, v in inputs.items()})
        errors = {}
        for t, a, b in zip(spec.outputs, actual, expected, strict=True):
            b = b.numpy()
            if a.shape != b.shape:
                raise ParityError(f"{spec.name}.{t.name}: runtime shape {a.shape} != PyTorch "
                                  f"{b.shape} at {point}")
            errors[t.name] = relative_error(a, b)
            if not np.any(b) and t.name not in report.all_zero_outputs:
                report.all_zero_outputs.append(t.name)
        max_abs = max(e[0] for e in errors.values())
        max_rel = max(e[1] for e in errors.values())
        report.points.append({**point, "max_abs": max_abs, "max_rel": max_rel})
        report.max_abs = max(report.max_abs, max_abs)
        report.max_rel = max(report.max_rel, max_rel)
    log.info("parity %s (seed %d)", report.summary(), references.seed)
    if report.all_zero_outputs:
        log.warning("parity %s: PyTorch output(s) %s are all zeros: the check is vacuous there",
                    spec.name, report.all_zero_outputs)
    if not report.ok:
        raise ParityError(report.summary())
    return report


def text_contexts(text_encoder: nn.Module, te_spec: ExportSpec) -> Contexts:
    """UNet contexts made the way serving makes them: the model's own text encoder graph on
    random token ids. A reduced-precision check wants them: N(0, 1) contexts lie outside
    what the UNet ever sees, and at high t the emoji UNet's bf16 error on them reached 25 %
    of its output's range, against under 4 % on its own contexts (and equal judged images)."""
    low, high = te_spec.value_ranges.get("input_ids", (0, 1000))
    seq = te_spec.concrete_shape(te_spec.inputs[0], 1, batch=1)[1]
    text_encoder = text_encoder.eval()

    def make(batch: int, generator: torch.Generator) -> torch.Tensor:
        ids = torch.randint(low, high, (batch, seq), generator=generator)
        with torch.no_grad():
            return text_encoder(ids)

    return make
