"""Merging the network calls of concurrent requests inside one pipeline model.

When the pipeline model runs the networks itself (ONNX Runtime in the stub, no BLS), nothing
in Triton batches the UNet steps of different requests any more. `CallBatcher` does it
in process: each request runs its own sampler loop in its own thread (its own seed, sampler,
step count and guidance), and every network call goes through the batcher:

    batcher = CallBatcher(max_wait_s=0.01)
    unet = batcher.wrap(unet_fn, max_batch=16, name="unet")  # same signature, merged
    with batcher.member():                         # around each request's loop
        ... unet(x, t, c) ...

A call waits until every member thread is blocked in a call (nothing else can join the
batch), or until `max_wait_s` passed; then one of the waiting threads runs all pending calls,
grouped by function and by non-batch shapes, concatenated on axis 0 in chunks of at most
`max_batch` items (a single call larger than that runs in slices of `max_batch`, so no run
exceeds it: `max_batch` bounds a network's activation memory as well as its graph's batch).
With one request in flight a call runs at once, in its own thread.

Runs are serialised (one network at a time, with all of the session's threads), like Triton's
one-execution-per-instance rule. If a merged run fails, its calls re-run one by one so that an
error reaches only the call that caused it. `stats[name]` counts the runs per function, and
`on_run(name, sizes, calls, seconds)` (optional) is told of each group of merged calls: the
batch sizes it ran (one, or one per call after a failure), the calls and the time taken, e.g.
to feed Prometheus counters.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The networks' functions: numpy arrays in and out (ONNX Runtime, OpenVINO, BLS), or torch
# tensors on the pipeline's device (server/txt2img.py), batched on axis 0 either way.
Batch = Any  # np.ndarray | torch.Tensor
NumpyFn = Callable[..., Batch]

# What the pipeline models publish of `on_run` on Triton's /metrics (server/bls.py), as
# counters labelled {model, network}: name -> description.
NETWORK_METRICS: dict[str, str] = {
    "ldm_network_executions_total": "network runs of the pipeline's in-process batcher",
    "ldm_network_batch_items_total": "batch items those runs held",
    "ldm_network_calls_total": "request calls those runs merged",
    "ldm_network_compute_us_total": "microseconds those runs took",
}


def parse_network_metrics(text: str) -> dict[tuple[str, str], dict[str, float]]:
    """{(model, network): {metric: value}} of the NETWORK_METRICS in a /metrics page."""
    # Imported here: this module also runs inside the pipeline models, which never parse a page.
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        # A counter's family is named without "_total" but its samples keep it, as do the keys
        # of NETWORK_METRICS: match sample names.
        for sample in family.samples:
            if sample.name not in NETWORK_METRICS:
                continue
            key = (sample.labels.get("model", ""), sample.labels.get("network", ""))
            out.setdefault(key, {})[sample.name] = float(sample.value)
    return out


@dataclass(eq=False)
class _Call:
    name: str
    fn: NumpyFn
    max_batch: int
    arrays: tuple[Batch, ...]
    result: Batch | None = None
    error: BaseException | None = None
    done: bool = False

    @property
    def key(self) -> tuple:
        return (id(self.fn), tuple((tuple(a.shape[1:]), str(a.dtype), _device(a))
                                   for a in self.arrays))

    @property
    def size(self) -> int:
        return int(self.arrays[0].shape[0])


@dataclass
class BatchStats:
    """Runs of one wrapped function."""

    executions: int = 0  # runs of the function
    calls: int = 0  # calls they served
    items: int = 0  # batch items they held
    sizes: dict[int, int] = field(default_factory=dict)  # items per run -> runs

    def add(self, sizes: list[int], calls: int) -> None:
        self.executions += len(sizes)
        self.calls += calls
        for n in sizes:
            self.items += n
            self.sizes[n] = self.sizes.get(n, 0) + 1


class CallBatcher:
    """Merges calls of batched network functions made from several threads (module docstring)."""

    def __init__(self, max_wait_s: float = 0.01,
                 on_run: Callable[[str, list[int], int, float], object] | None = None):
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.max_wait_s = max_wait_s
        self.on_run = on_run
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[_Call] = []
        self._members = 0
        self._running = False
        self.stats: dict[str, BatchStats] = {}

    @contextmanager
    def member(self) -> Iterator[None]:
        """Marks this thread as one that will make calls: others wait for it (bounded)."""
        with self._cond:
            self._members += 1
        try:
            yield
        finally:
            with self._cond:
                self._members -= 1
                self._cond.notify_all()  # the waiting ones may now be all there is

    def wrap(self, fn: NumpyFn, max_batch: int, name: str | None = None) -> NumpyFn:
        """`fn` (arrays batched on axis 0 in, one array batched on axis 0 out), merged; `name`
        keys its stats (default: the function's name)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        name = name or getattr(fn, "__name__", "fn")
        self.stats.setdefault(name, BatchStats())

        def call(*arrays: Batch) -> Batch:
            return self._submit(_Call(name, fn, max_batch, tuple(
                a if hasattr(a, "shape") else np.asarray(a) for a in arrays)))

        return call

    def _submit(self, call: _Call) -> Batch:
        deadline = time.monotonic() + self.max_wait_s
        with self._cond:
            self._pending.append(call)
            self._cond.notify_all()
            while not call.done:
                waited_out = time.monotonic() >= deadline
                if not self._running and call in self._pending and (
                        len(self._pending) >= self._members or waited_out):
                    self._run_pending()
                    continue
                timeout = None if self._running else max(deadline - time.monotonic(), 0.0)
                self._cond.wait(timeout)
        if call.error is not None:
            raise call.error
        return call.result

    def _run_pending(self) -> None:
        """Run every pending call; entered and left holding the lock, runs without it."""
        batch, self._pending, self._running = self._pending, [], True
        self._cond.release()
        runs: list[tuple[str, list[int], int]] = []
        try:
            for group in _chunks(batch):
                t0 = time.perf_counter()
                sizes = _run_group(group)
                runs.append((group[0].name, sizes, len(group)))
                if self.on_run is not None:
                    self.on_run(group[0].name, sizes, len(group), time.perf_counter() - t0)
        finally:
            self._cond.acquire()
            self._running = False
            for name, sizes, calls in runs:
                self.stats[name].add(sizes, calls)
            for c in batch:
                c.done = True
            self._cond.notify_all()


def _chunks(calls: list[_Call]) -> list[list[_Call]]:
    """Calls grouped by function and non-batch shapes (arrival order kept), each group cut so
    that a chunk holds at most its function's max_batch items (a larger call runs alone, in
    slices)."""
    groups: dict[tuple, list[list[_Call]]] = {}
    for c in calls:
        chunks = groups.setdefault(c.key, [[]])
        last = chunks[-1]
        if last and sum(x.size for x in last) + c.size > c.max_batch:
            chunks.append(last := [])
        last.append(c)
    return [chunk for chunks in groups.values() for chunk in chunks]


def _run_group(calls: list[_Call]) -> list[int]:
    """Run one chunk as one call of its function; the batch sizes run (more after a failure)."""
    fn = calls[0].fn
    if len(calls) == 1:
        _run_one(calls[0])
        return [calls[0].size]
    try:
        merged = [_concat(parts) for parts in zip(*(c.arrays for c in calls), strict=True)]
        out = fn(*merged)
        start = 0
        for c in calls:
            c.result = out[start:start + c.size]
            start += c.size
        return [sum(c.size for c in calls)]
    except Exception:  # noqa: BLE001 - find the call that fails, and fail only that one
        for c in calls:
            _run_one(c)
        return [c.size for c in calls]


def _run_one(call: _Call) -> None:
    step = call.max_batch
    try:
        if call.size <= step:
            call.result = call.fn(*call.arrays)
        else:
            call.result = _concat([call.fn(*(a[i:i + step] for a in call.arrays))
                                   for i in range(0, call.size, step)])
    except Exception as e:  # noqa: BLE001 - re-raised in the calling thread
        call.error = e


def _concat(parts: list[Batch]) -> Batch:
    """Parts joined on axis 0: numpy arrays, or torch tensors (on their device)."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch  # only tensor networks get here, and they have it

    return torch.cat(parts)


def _device(a: Batch) -> str:
    """Where a batch lives: calls on different devices never merge."""
    return str(getattr(a, "device", "cpu"))
