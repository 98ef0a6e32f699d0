"""Work per UNet step (counted FLOPs) and the machine's fp32 matrix-multiply peak.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` on one UNet call. Its formulas
cover convolutions, matmuls and the CUDA attention kernels, but not the CPU flash-attention
kernel that `scaled_dot_product_attention` runs on here
(`aten._scaled_dot_product_flash_attention_for_cpu`), which it would count as 0: that op is
added with torch's own SDPA formula, 2 * (B H Lq Lk d) for q k^T plus the same for the
weighted sum of v. Softmax, norms and activations are not counted (as in every FLOP counter
of this kind), so the achieved fraction slightly understates the real work.

Peak (`gemm_peaks`): the machine's fp32 (and bf16) peak is the best GEMM any runtime here
reaches, not torch's alone: on some CPUs (AMD EPYC Zen 5 with MKL) `torch.matmul` gets under
half of what ONNX Runtime's own GEMM does, and a "% of peak" against it would flatter every
contender. Each runtime does best-of-`tries` (n, n) @ (n, n) products at the thread count the
contenders use, 2 n^3 FLOPs each, into a preallocated output. `matmul_peak` is the older
torch-only fp32 measurement, kept for its callers.

    python -m bench.flops --n 2048          # every runtime x precision, as a Markdown table
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_mapping() -> dict:
    ops = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        ops[op] = _cpu_sdpa_flops
    return ops


@torch.no_grad()
def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """(total FLOPs of one `fn()` call, FLOPs by aten op name)."""
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    with counter:
        fn()
    by_op: dict[str, int] = {}
    for ops in counter.get_flop_counts().values():
        for op, n in ops.items():
            by_op[str(op)] = max(by_op.get(str(op), 0), int(n))
    return int(counter.get_total_flops()), by_op


def matmul_peak(threads: int, n: int = 2048, tries: int = 5) -> dict[str, float]:
    """Best-of-`tries` fp32 GFLOP/s of an (n, n) @ (n, n) matmul with `threads` threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g)
        b = torch.randn(n, n, generator=g)
        out = torch.empty(n, n)
        torch.matmul(a, b, out=out)  # warm-up: thread pool, pages
        best = float("inf")
        for _ in range(tries):
            t0 = time.perf_counter()
            torch.matmul(a, b, out=out)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return {"n": n, "threads": threads, "best_s": best, "gflops": 2 * n**3 / best / 1e9}


# --- the best GEMM of every runtime ----------------------------------------------------------

PRECISIONS = ("fp32", "bf16")
# Idle between runtimes: the last one's spinning thread pool would otherwise steal cores
# from the next one's first products.
SETTLE_S = 0.1
ORT_NO_BF16 = ("ONNX Runtime's CPU execution provider has no bf16 MatMul kernel "
               "(NOT_IMPLEMENTED; its bf16 fast-math GEMM is ARM64 only)")


class GemmUnavailable(Exception):
    """This runtime cannot do this GEMM on this machine; the message says why."""


@dataclass
class Gemm:
    """One runtime's product of fixed inputs, ready to time."""

    run: Callable[[], object]  # one product into the preallocated output (what is timed)
    result: Callable[[], np.ndarray]  # a float32 copy of the last product


GemmBuilder = Callable[[np.ndarray, np.ndarray, int, str], AbstractContextManager[Gemm]]


@contextmanager
def _torch_gemm(a: np.ndarray, b: np.ndarray, threads: int, precision: str) -> Iterator[Gemm]:
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ta, tb = torch.from_numpy(a).to(dtype), torch.from_numpy(b).to(dtype)
        out = torch.empty(a.shape[0], b.shape[1], dtype=dtype)
        gemm = Gemm(lambda: torch.matmul(ta, tb, out=out), lambda: out.float().numpy().copy())
        try:
            gemm.run()  # a build without a bf16 matmul kernel fails here, not while timed
        except RuntimeError as e:
            raise GemmUnavailable(f"torch {precision} matmul failed: {e}") from e
        yield gemm
    finally:
        torch.set_num_threads(old)


@contextmanager
def _ort_gemm(a: np.ndarray, b: np.ndarray, threads: int, precision: str) -> Iterator[Gemm]:
    if precision != "fp32":
        raise GemmUnavailable(ORT_NO_BF16)
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from export.ort import session_options  # the serving settings: intra = threads, 1 inter

    (n, k), m = a.shape, b.shape[1]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, k]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [k, m])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, m])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                   providers=["CPUExecutionProvider"])
    # Bound output, like torch's out=: `session.run` would also time allocating and
    # handing back a fresh (n, n) array, which is not GEMM work.
    out = np.empty((n, m), np.float32)
    binding = session.io_binding()
    binding.bind_cpu_input("a", a)
    binding.bind_cpu_input("b", b)
    binding.bind_output("c", "cpu", 0, np.float32, out.shape, out.ctypes.data)
    yield Gemm(lambda: session.run_with_iobinding(binding), lambda: out.copy())


OV_HINTS = {"fp32": "f32", "bf16": "bf16"}


@contextmanager
def _openvino_gemm(a: np.ndarray, b: np.ndarray, threads: int, precision: str) -> Iterator[Gemm]:
    import openvino as ov

    core = ov.Core()
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise GemmUnavailable("OpenVINO: this CPU has no BF16 in OPTIMIZATION_CAPABILITIES")
    ops = ov.opset13
    pa = ops.parameter(list(a.shape), ov.Type.f32, name="a")
    pb = ops.parameter(list(b.shape), ov.Type.f32, name="b")
    model = ov.Model([ops.matmul(pa, pb, False, False)], [pa, pb], "gemm")
    hint = OV_HINTS[precision]
    config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads,
              "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    try:
        compiled = core.compile_model(model, "CPU", config)
    except RuntimeError as e:
        raise GemmUnavailable(f"OpenVINO could not compile a {precision} MatMul: {e}") from e
    # The CPU plugin may fall back to another precision: then this is not a `precision` peak.
    used = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if used != hint:
        raise GemmUnavailable(f"OpenVINO compiled the {precision} MatMul as {used}")
    request = compiled.create_infer_request()
    inputs = {0: a, 1: b}  # float32 in both precisions: the plugin converts inside
    yield Gemm(lambda: request.infer(inputs, share_inputs=True, share_outputs=True),
               lambda: np.array(request.get_output_tensor(0).data, np.float32))


BUILDERS: dict[str, GemmBuilder] = {
    "torch": _torch_gemm, "onnxruntime": _ort_gemm, "openvino": _openvino_gemm}


def gemm_inputs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two (n, n) float32 standard-normal matrices."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, n), dtype=np.float32),
            rng.standard_normal((n, n), dtype=np.float32))


def gemm_product(runtime: str, precision: str, a: np.ndarray, b: np.ndarray,
                 threads: int = 1) -> np.ndarray:
    """a @ b as `runtime` computes it in `precision` (float32 result); raises
    GemmUnavailable or ImportError where it cannot."""
    with BUILDERS[runtime](a, b, threads, precision) as gemm:
        gemm.run()
        return gemm.result()


def _best_seconds(gemm: Gemm, tries: int) -> float:
    gemm.run()  # warm-up: thread pool, pages, kernel selection
    best = math.inf
    for _ in range(tries):
        t0 = time.perf_counter()
        gemm.run()
        best = min(best, time.perf_counter() - t0)
    return best


def _peak(runs: dict[str, float | None], precision: str) -> dict | None:
    done = {k: v for k, v in runs.items() if k.endswith(f"/{precision}") and v is not None}
    if not done:
        return None
    key = max(done, key=done.__getitem__)
    return {"gflops": done[key], "runtime": key.split("/")[0]}


def gemm_peaks(threads: int, n: int = 2048, tries: int = 5) -> dict:
    """Best-of-`tries` GFLOP/s of an (n, n) @ (n, n) product with `threads` threads in every
    runtime and precision, and the peak of each precision with the runtime that set it:
    {"n", "threads", "tries", "runs": {"torch/fp32": GFLOP/s or None, ...},
     "skipped": {"onnxruntime/bf16": why, ...}, "fp32": {"gflops", "runtime"} or None,
     "bf16": the same or None}."""
    a, b = gemm_inputs(n)
    runs: dict[str, float | None] = {}
    skipped: dict[str, str] = {}
    for runtime, builder in BUILDERS.items():
        for precision in PRECISIONS:
            key = f"{runtime}/{precision}"
            try:
                with builder(a, b, threads, precision) as gemm:
                    runs[key] = 2 * n**3 / _best_seconds(gemm, tries) / 1e9
                time.sleep(SETTLE_S)
            except GemmUnavailable as e:
                runs[key], skipped[key] = None, str(e)
            except ImportError as e:  # the runtime is not installed
                runs[key], skipped[key] = None, f"{runtime} not installed ({e})"
    return {"n": n, "threads": threads, "tries": tries, "runs": runs, "skipped": skipped,
            "fp32": _peak(runs, "fp32"), "bf16": _peak(runs, "bf16")}


def torch_matmul_peak(peaks: dict) -> dict[str, float]:
    """`matmul_peak`'s result (torch fp32) taken from `gemm_peaks`' (NaN if torch failed)."""
    g = peaks["runs"].get("torch/fp32") or math.nan
    return {"n": peaks["n"], "threads": peaks["threads"],
            "best_s": 2 * peaks["n"] ** 3 / g / 1e9, "gflops": g}


def gemm_table(peaks: dict) -> str:
    """Every runtime x precision as a Markdown table, then the peaks and who set them."""
    lines = [f"GEMM ({peaks['n']}, {peaks['n']}) @ ({peaks['n']}, {peaks['n']}), "
             f"{peaks['threads']} thread(s), best of {peaks['tries']}", "",
             "| runtime | precision | GFLOP/s | note |", "|---|---|---:|---|"]
    for key, gflops in peaks["runs"].items():
        runtime, precision = key.split("/")
        peak = peaks[precision]
        note = peaks["skipped"].get(key, "")
        if peak is not None and gflops is not None and peak["runtime"] == runtime:
            note = f"{precision} peak"
        value = "skipped" if gflops is None else f"{gflops:.1f}"
        lines.append(f"| {runtime} | {precision} | {value} | {note} |")
    lines.append("")
    for precision in PRECISIONS:
        peak = peaks[precision]
        lines.append(f"{precision} peak: " + ("none measured" if peak is None else
                                              f"{peak['gflops']:.1f} GFLOP/s ({peak['runtime']})"))
    return "\n".join(lines)


def _usable_cores() -> int:
    try:
        from export.ort import usable_cores
    except ImportError:  # no ONNX Runtime: the same rule, here
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    return usable_cores()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flops",
                                description="fp32 and bf16 GEMM GFLOP/s of every runtime here")
    p.add_argument("--threads", type=int, default=0, help="threads (0: usable cores)")
    p.add_argument("--n", type=int, default=2048, help="square matrix size")
    p.add_argument("--tries", type=int, default=5, help="timed products per runtime (best)")
    args = p.parse_args(argv)
    if args.threads < 0 or args.n < 1 or args.tries < 1:
        p.error("--threads must be >= 0, --n and --tries >= 1")
    print(gemm_table(gemm_peaks(args.threads or _usable_cores(), args.n, args.tries)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
