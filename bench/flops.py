"""Work per UNet step (counted FLOPs) and the machine's fp32 matrix-multiply peak.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` on one UNet call. Its formulas
cover convolutions, matmuls and the CUDA attention kernels, but not the CPU flash-attention
kernel that `scaled_dot_product_attention` runs on here
(`aten._scaled_dot_product_flash_attention_for_cpu`), which it would count as 0: that op is
added with torch's own SDPA formula, 2 * (B H Lq Lk d) for q k^T plus the same for the
weighted sum of v. Softmax, norms and activations are not counted (as in every FLOP counter
of this kind), so the achieved fraction slightly understates the real work.

Peak: the best of several `torch.matmul` calls on large fp32 square matrices at the thread
count the contenders use, 2 n^3 FLOPs each.
"""
from __future__ import annotations

import time
from collections.abc import Callable

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
