"""Request batching around one ONNX Runtime session: the logic of our Triton `model.py`.

Triton's dynamic batcher hands the Python backend a *list* of requests per `execute()` call
(for the UNet: denoising steps of different client requests that arrived together). Running
them one by one would waste the batch, so `OnnxBatchModel.run_requests`:

1. validates each request on its own (input names, dtypes, ranks, static dims, one batch size
   per request, each dynamic axis within the exported profile and integer values within
   their range, e.g. token ids within the vocabulary): a bad request gets its own error
   (INVALID_ARG, saying what is allowed), the others still run, and no request can take the
   model past the shapes it was built for (nor its memory with it);
2. groups the valid requests by their non-batch shapes (requests at different resolutions
   cannot share a tensor) and concatenates each group along the batch axis;
3. runs one ONNX Runtime call per group and splits the outputs back, one result per request;
4. if a merged run fails anyway, re-runs that group's requests one at a time so the error
   lands only on the request that caused it (an internal error: validation passed).

Pure numpy + onnxruntime: importable and tested without Triton. `model.py` is a thin wrapper
that imports this module from the installed package.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from export.ort import make_session, usable_cores

log = logging.getLogger(__name__)

# ONNX Runtime's type strings -> numpy dtypes, for the ones our specs use.
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}

Request = Mapping[str, np.ndarray]
Result = dict[str, np.ndarray] | Exception


class RequestError(ValueError):
    """A request that cannot run; its message goes back to that request's client."""


class InferenceError(RuntimeError):
    """A valid request that ONNX Runtime failed to run: ours, not the client's."""


def instance_count(model_config: dict) -> int:
    """Instances of a model, from its config (the JSON Triton hands `initialize`)."""
    return sum(int(g.get("count", 1)) for g in model_config.get("instance_group", [])) or 1


def threads_for(parameter: str | int | None, instances: int) -> int:
    """Intra-op threads per instance: the configured number, or the cores shared evenly."""
    value = int(parameter or 0)
    return value if value > 0 else max(1, usable_cores() // max(1, instances))


class OnnxBatchModel:
    """One ONNX model; runs lists of requests as few merged batches as their shapes allow."""

    def __init__(self, path: str | Path, threads: int | None = None,
                 limits: Mapping | None = None):
        self.session = make_session(path, threads)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        # ExportSpec.serving_limits(): {"axes": {name: [min, max]}, "values": {input: [lo, hi)}}
        limits = limits or {}
        self.axes = {k: tuple(v) for k, v in limits.get("axes", {}).items()}
        self.values = {k: tuple(v) for k, v in limits.get("values", {}).items()}

    def _validate(self, request: Request) -> dict[str, np.ndarray]:
        """The request's arrays fitted to the graph's ranks; RequestError if they cannot be."""
        missing = sorted(set(self.inputs) - set(request))
        if missing:
            raise RequestError(f"missing input(s) {missing}")
        unknown = sorted(set(request) - set(self.inputs))
        if unknown:
            raise RequestError(f"unknown input(s) {unknown} (expected {list(self.inputs)})")
        arrays, batch = {}, None
        for name, meta in self.inputs.items():
            a = np.asarray(request[name])
            want = ORT_DTYPES.get(meta.type)
            if want is not None and a.dtype != want:
                raise RequestError(f"{name}: dtype {a.dtype}, expected {np.dtype(want)}")
            rank = len(meta.shape)
            # A (B,) graph input reaches us as (B, 1) when Triton's `reshape` is bypassed.
            if a.ndim == rank + 1 and a.shape[-1] == 1:
                a = a.reshape(a.shape[:-1])
            if a.ndim != rank:
                raise RequestError(f"{name}: shape {a.shape}, expected rank {rank} "
                                   f"{list(meta.shape)}")
            for axis, (have, dim) in enumerate(zip(a.shape, meta.shape, strict=True)):
                self._check_axis(name, axis, have, dim)
            self._check_values(name, a)
            if batch is None:
                batch = a.shape[0]
            elif a.shape[0] != batch:
                raise RequestError(f"{name}: batch {a.shape[0]} differs from the other inputs' "
                                   f"{batch}")
            arrays[name] = a
        if not batch:
            raise RequestError("empty batch")
        return arrays

    def _check_axis(self, name: str, axis: int, have: int, dim) -> None:
        if isinstance(dim, int) and have != dim:
            raise RequestError(f"{name}: size {have} on axis {axis}, expected {dim}")
        if isinstance(dim, str) and dim in self.axes:
            lo, hi = self.axes[dim]
            if not lo <= have <= hi:
                raise RequestError(f"{name}: {dim} {have} on axis {axis} is outside what the "
                                   f"model was built for: {lo}..{hi}")

    def _check_values(self, name: str, a: np.ndarray) -> None:
        if name not in self.values or a.size == 0:
            return
        lo, hi = self.values[name]
        if a.min() < lo or a.max() >= hi:
            bad = a[(a < lo) | (a >= hi)].reshape(-1)[0]
            raise RequestError(f"{name}: value {bad} is outside [{lo}, {hi - 1}]")

    def _run(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, dict(arrays))
        return dict(zip(self.output_names, outputs, strict=True))

    def run_requests(self, requests: Sequence[Request]) -> list[Result]:
        """One result per request, in order: a dict of output arrays, or the exception."""
        results: list[Result | None] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = {}
        for i, request in enumerate(requests):
            try:
                arrays = self._validate(request)
            except RequestError as e:
                results[i] = e
                continue
            key = tuple((n, a.shape[1:]) for n, a in arrays.items())
            groups.setdefault(key, []).append((i, arrays))
        for members in groups.values():
            self._run_group(members, results)
        return results  # type: ignore[return-value]

    def _run_group(self, members: list[tuple[int, dict[str, np.ndarray]]],
                   results: list[Result | None]) -> None:
        if len(members) == 1:
            i, arrays = members[0]
            try:
                results[i] = self._run(arrays)
            except Exception as e:  # noqa: BLE001 - reported on this request's response
                log.exception("inference failed")
                results[i] = InferenceError(f"inference failed: {type(e).__name__}")
            return
        merged = {name: np.concatenate([a[name] for _, a in members])
                  for name in members[0][1]}
        try:
            out = self._run(merged)
        except Exception as e:  # noqa: BLE001 - isolate the culprit below
            log.warning("merged batch of %d requests failed (%s); running them one by one",
                        len(members), e)
            for member in members:
                self._run_group([member], results)
            return
        start = 0
        for i, arrays in members:
            n = next(iter(arrays.values())).shape[0]
            results[i] = {k: v[start:start + n] for k, v in out.items()}
            start += n
