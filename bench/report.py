"""Summaries of the raw timings, the targets, and the tables (plain text or Markdown)."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Row labels, in the order the brief numbers the contenders.
E2E_LABELS = {
    "pytorch_eager": "1 PyTorch eager, in process (ldm.pipeline)",
    "diffusers": "2 diffusers, in process (same architecture)",
    "onnxruntime": "3 ONNX Runtime, in process (Txt2ImgService)",
    "openvino_fp32": "3b OpenVINO fp32, in process (Txt2ImgService)",
    "openvino_bf16": "3c OpenVINO bf16, in process (Txt2ImgService)",
    "triton_http": "4 Triton, HTTP, 1 client (ldm_txt2img)",
    "triton_http_openvino_fp32": "4b Triton, HTTP, networks: openvino fp32",
    "triton_http_openvino_bf16": "4c Triton, HTTP, networks: openvino bf16",
}
STEP_LABELS = {
    "pytorch_eager": "PyTorch eager (ours)",
    "diffusers": "diffusers UNet2DConditionModel",
    "onnxruntime": "ONNX Runtime (exported unet)",
    "openvino_fp32": "OpenVINO fp32 (exported unet)",
    "openvino_bf16": "OpenVINO bf16 (exported unet)",
}


def summary(values: Sequence[float]) -> dict[str, float]:
    """median, p95, mean, min, max and n of `values` (seconds)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "median": math.nan, "p95": math.nan, "mean": math.nan,
                "min": math.nan, "max": math.nan}
    return {"n": int(a.size), "median": float(np.median(a)),
            "p95": float(np.percentile(a, 95)), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max())}


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    value: float
    limit: float
    kind: str  # "max" (value <= limit) or "min" (value >= limit)

    @property
    def met(self) -> bool:
        if not math.isfinite(self.value):
            return False
        return self.value <= self.limit if self.kind == "max" else self.value >= self.limit

    @property
    def limit_text(self) -> str:
        return f"{'<=' if self.kind == 'max' else '>='} {self.limit:g}"

    def to_dict(self) -> dict:
        return {"description": self.description, "value": self.value, "limit": self.limit,
                "kind": self.kind, "met": self.met}


def ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan


def targets(e2e: dict[str, dict], load: dict[int, dict]) -> list[Target]:
    """The brief's targets from the end-to-end medians and the load throughputs."""
    triton = e2e.get("triton_http", {}).get("median", math.nan)
    out = [
        Target("triton_vs_onnxruntime", "Triton 1 client latency / ONNX Runtime in process",
               ratio(triton, e2e.get("onnxruntime", {}).get("median", math.nan)), 1.15, "max"),
        Target("triton_vs_pytorch_eager", "Triton 1 client latency / PyTorch eager",
               ratio(triton, e2e.get("pytorch_eager", {}).get("median", math.nan)), 0.6, "max"),
        Target("triton_vs_diffusers", "Triton 1 client latency / diffusers",
               ratio(triton, e2e.get("diffusers", {}).get("median", math.nan)), 0.6, "max"),
    ]
    if 1 in load and len(load) > 1:
        top = max(load)
        out.append(Target(f"load_{top}_vs_1", f"images/s with {top} clients / with 1 client",
                          ratio(load[top]["images_per_s"], load[1]["images_per_s"]), 1.8, "min"))
    return out


# --- tables -----------------------------------------------------------------------------------

def table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _f(x: float, digits: int = 1) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _met(t: Target | None) -> str:
    return "" if t is None else ("yes" if t.met else "NO")


def _nan(obj):
    """null (written for NaN) -> NaN, so a result read back from JSON renders."""
    if obj is None:
        return math.nan
    if isinstance(obj, dict):
        return {k: _nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan(v) for v in obj]
    return obj


Heading = Callable[[str], str]


def render(result: dict, markdown: bool) -> str:
    """All tables of a result dict (the JSON written by bench.run, or read back)."""
    result = _nan(result)
    tgt = {t["name"]: Target(t["name"], t["description"], t["value"], t["limit"], t["kind"])
           for t in result["targets"]}
    heading: Heading = (lambda s: f"\n### {s}\n") if markdown else (lambda s: f"\n{s}\n")
    return "\n".join([
        _meta_line(result["meta"]),
        *_e2e_section(result, tgt, heading, markdown),
        *_load_section(result, tgt, heading, markdown),
        *_step_section(result, heading, markdown),
        *_params_section(result, heading, markdown),
        *_verdict(result, tgt),
    ])


def _meta_line(meta: dict) -> str:
    """What was measured, and how."""
    return (
        f"Model: {meta['model']}; {meta['image_size']}x{meta['image_size']} images, "
        f"{meta['steps']} DDIM steps, guidance {meta['guidance_scale']:g} (CFG on); "
        f"{meta['threads']} thread(s) on {meta['cores']} usable core(s) ({meta['cpu']}); "
        f"median (p95) of {meta['repetitions']} repetitions after {meta['warmup']} warm-up, "
        f"contenders interleaved round-robin."
    )


def _e2e_section(result: dict, tgt: dict[str, Target], heading: Heading,
                 markdown: bool) -> list[str]:
    """Contenders 1-4: one request at a time."""
    triton = result["e2e"].get("triton_http", {}).get("median", math.nan)
    by_row = {"pytorch_eager": "triton_vs_pytorch_eager", "diffusers": "triton_vs_diffusers",
              "onnxruntime": "triton_vs_onnxruntime"}
    rows = []
    for name, label in E2E_LABELS.items():
        s = result["e2e"].get(name)
        if s is None:
            continue
        t = tgt.get(by_row.get(name, ""))
        rows.append([label, _f(s["median"] * 1e3), _f(s["p95"] * 1e3), _f(1 / s["median"], 2),
                     _f(ratio(triton, s["median"]), 2), t.limit_text if t else "", _met(t)])
    return [heading("End to end, one request at a time (1 image)"),
            table(["contender", "median ms", "p95 ms", "images/s", "Triton/this",
                   "target", "met"], rows, markdown)]


def _load_section(result: dict, tgt: dict[str, Target], heading: Heading,
                  markdown: bool) -> list[str]:
    """Contender 5: Triton under 1..N concurrent clients."""
    meta = result["meta"]
    rows = []
    load = {int(k): v for k, v in result["load"].items()}
    base = load.get(1, {}).get("images_per_s", math.nan)
    top = max(load) if load else None
    for n in sorted(load):
        s = load[n]
        t = tgt.get(f"load_{n}_vs_1") if n == top else None
        rows.append([f"5 Triton, {n} client(s)", _f(s["images_per_s"], 2),
                     _f(ratio(s["images_per_s"], base), 2), _f(s["latency"]["median"] * 1e3),
                     _f(s["latency"]["p95"] * 1e3), str(s["errors"]),
                     _f(s["unet_avg_batch"], 2), _f(s["unet_requests_per_execution"], 2),
                     _f(s["unet_compute_ms_per_execution"], 2), t.limit_text if t else "", _met(t)])
    return [heading(f"Triton under load ({meta['requests_per_client']} request(s) per "
                    f"client per repetition; ldm_txt2img instances: "
                    f"{meta['pipeline_instances']})"),
            table(["load", "images/s", "x 1 client", "p50 ms", "p95 ms", "errors",
                   "unet batch", "requests/exec", "unet ms/exec", "target", "met"],
                  rows, markdown)]


def gemm_peaks_of(result: dict) -> dict:
    """The result's GEMM peaks (`bench.flops.gemm_peaks`); a result written before they were
    measured has only torch's fp32 matmul peak, which is then the fp32 peak."""
    if "gemm_peaks" in result:
        return result["gemm_peaks"]
    old = result["matmul_peak"]
    return {"n": old["n"], "threads": old["threads"],
            "fp32": {"gflops": old["gflops"], "runtime": "torch"}, "bf16": None}


def _peak_entry(precision: str, peaks: dict) -> dict | None:
    # A peak that was not measured is None, or NaN once the result went through JSON (_nan).
    entry = peaks.get(precision)
    return entry if isinstance(entry, dict) else None


def percent_of_peak(gflops: float, precision: str, peaks: dict) -> float:
    """`gflops` as a percentage of the `precision` ("fp32", "bf16") GEMM peak of `peaks`
    (`gemm_peaks_of`); NaN when that peak was not measured."""
    entry = _peak_entry(precision, peaks)
    return 100 * ratio(gflops, entry["gflops"]) if entry else math.nan


def peaks_text(peaks: dict) -> str:
    """"fp32 GEMM peak 462 GFLOP/s (onnxruntime), bf16 peak 910 GFLOP/s (openvino)"."""
    parts = []
    for precision, label in (("fp32", "fp32 GEMM peak"), ("bf16", "bf16 peak")):
        entry = _peak_entry(precision, peaks)
        parts.append(f"{label} n/a" if entry is None else
                     f"{label} {entry['gflops']:.0f} GFLOP/s ({entry['runtime']})")
    return ", ".join(parts)


def _step_section(result: dict, heading: Heading, markdown: bool) -> list[str]:
    """One UNet step per runtime, against the best GEMM of any runtime in its precision (a
    step entry may say "precision": "bf16"; fp32 otherwise)."""
    meta = result["meta"]
    peaks = gemm_peaks_of(result)
    rows = []
    for name, label in STEP_LABELS.items():
        s = result["unet_step"].get(name)
        if s is None:
            continue
        gflop = s["flops"] / 1e9
        achieved = gflop / s["median"]
        pct = percent_of_peak(achieved, s.get("precision", "fp32"), peaks)
        rows.append([label, _f(s["median"] * 1e3, 2), _f(s["p95"] * 1e3, 2), _f(gflop, 3),
                     _f(achieved, 1), _f(pct, 1)])
    return [heading(f"UNet step (CFG batch 2; {peaks_text(peaks)}, {meta['threads']} "
                    f"thread(s), n={peaks['n']})"),
            table(["runtime", "ms/step", "p95 ms", "GFLOP/step", "GFLOP/s", "% of peak"],
                  rows, markdown)]


def _params_section(result: dict, heading: Heading, markdown: bool) -> list[str]:
    """Parameter counts of our model and its diffusers twin."""
    rows = [[part, f"{c['ours']:,}", f"{c['diffusers']:,}", _f(c["diffusers"] / c["ours"], 3)]
            for part, c in result["params"].items()]
    return [heading("Parameters: ours vs the diffusers twin"),
            table(["part", "ours", "diffusers", "ratio"], rows, markdown)]


def _verdict(result: dict, tgt: dict[str, Target]) -> list[str]:
    """The same-image check (when measured) and which targets were missed."""
    parts = []
    agree = result.get("agreement", {})
    if agree:
        parts.append("\nSame image check (PSNR vs PyTorch eager, same prompt and seed; 100 = "
                     "identical): " + ", ".join(f"{k.split('_vs_')[0]} {_f(v)} dB"
                                                for k, v in agree.items()))
    failed = [t for t in tgt.values() if not t.met]
    parts.append("\nTargets: " + ("all met" if not failed else
                                  "NOT met: " + ", ".join(f"{t.name} = {_f(t.value, 2)} "
                                                          f"(want {t.limit_text})"
                                                          for t in failed)))
    return parts
