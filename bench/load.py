"""Concurrent clients against the Triton deployment, and the batches Triton formed meanwhile.

One burst: `clients` threads, each with its own HTTP `Txt2ImgClient`, start together (a
barrier) and send `per_client` requests back to back. Throughput is successful images over the
burst's wall time; latencies are per request. Every wait is bounded by `timeout`; a client
that has not finished by then counts its unfinished requests as errors.

`unet_stats` reads `/v2/models/unet/stats` (BLS networks: Triton's dynamic batcher merges
the steps) or, when the pipeline runs the networks in process, the `ldm_network_*` counters
its batcher publishes on `/metrics` (server/bls.py). The difference over a burst gives the
UNet executions and the batch items they held: items / executions is the average batch
(each guided request contributes 2: uncond and cond), and requests / executions how many
client requests one execution merged.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class UNetStats:
    executions: int
    inferences: int  # batch items (2 per guided request step)
    requests: int  # successful model requests
    compute_ns: int  # time spent in the model's execute
    batches: dict[int, int]  # batch size -> executions

    def __sub__(self, other: UNetStats) -> UNetStats:
        sizes = set(self.batches) | set(other.batches)
        return UNetStats(self.executions - other.executions,
                         self.inferences - other.inferences,
                         self.requests - other.requests,
                         self.compute_ns - other.compute_ns,
                         {s: self.batches.get(s, 0) - other.batches.get(s, 0) for s in sizes
                          if self.batches.get(s, 0) != other.batches.get(s, 0)})

    def __add__(self, other: UNetStats) -> UNetStats:
        sizes = set(self.batches) | set(other.batches)
        return UNetStats(self.executions + other.executions,
                         self.inferences + other.inferences,
                         self.requests + other.requests,
                         self.compute_ns + other.compute_ns,
                         {s: self.batches.get(s, 0) + other.batches.get(s, 0) for s in sizes})


def network_stats(metrics_url: str, model: str = "ldm_txt2img_stream", network: str = "unet",
                  timeout: float = 10.0) -> UNetStats | None:
    """The in-process batcher's counters for `network` of `model`; None if it published none."""
    from server.batching import parse_network_metrics

    with urllib.request.urlopen(metrics_url, timeout=timeout) as r:
        values = parse_network_metrics(r.read().decode()).get((model, network))
    if not values:
        return None
    return UNetStats(executions=int(values.get("ldm_network_executions_total", 0)),
                     inferences=int(values.get("ldm_network_batch_items_total", 0)),
                     requests=int(values.get("ldm_network_calls_total", 0)),
                     compute_ns=int(values.get("ldm_network_compute_us_total", 0) * 1000),
                     batches={})


def pipeline_unet_stats(http_url: str, metrics_url: str) -> UNetStats:
    """The UNet's batching stats, wherever the pipeline runs it (see module docstring)."""
    return network_stats(metrics_url) or unet_stats(http_url)


def unet_stats(http_url: str, model: str = "unet", timeout: float = 10.0) -> UNetStats:
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/stats",
                                timeout=timeout) as r:
        entry = json.loads(r.read())["model_stats"][0]
    infer = entry.get("inference_stats", {})
    return UNetStats(
        executions=int(entry.get("execution_count", 0)),
        inferences=int(entry.get("inference_count", 0)),
        requests=int(infer.get("success", {}).get("count", 0)),
        compute_ns=int(infer.get("compute_infer", {}).get("ns", 0)),
        batches={int(b["batch_size"]): int(b.get("compute_infer", {}).get("count", 0))
                 for b in entry.get("batch_stats", [])},
    )


@dataclass
class Burst:
    clients: int
    wall_s: float
    images: int
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unet: UNetStats | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0


def burst(url: str, clients: int, per_client: int,
          request: Callable[[int, int], dict], timeout: float) -> Burst:
    """Run one burst; `request(client, i)` gives the `generate` kwargs (prompt, seed, ...)."""
    from server.client import Txt2ImgClient

    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    images = [0] * clients

    def worker(i: int) -> None:
        try:
            with Txt2ImgClient(url, protocol="http", timeout=timeout) as client:
                barrier.wait(timeout)
                for j in range(per_client):
                    kwargs = request(i, j)
                    t0 = time.perf_counter()
                    try:
                        out = client.generate(**kwargs)
                    except Exception as e:  # noqa: BLE001 - counted, not fatal
                        with lock:
                            errors.append(f"{type(e).__name__}: {e}")
                        continue
                    latencies[i].append(time.perf_counter() - t0)
                    images[i] += len(out.images)
        except threading.BrokenBarrierError:
            with lock:
                errors.append("client did not start (barrier broken)")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for th in threads:
        th.start()
    try:
        barrier.wait(timeout)
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    deadline = t0 + timeout * per_client
    for th in threads:
        th.join(max(0.0, deadline - time.perf_counter()))
    wall = time.perf_counter() - t0
    with lock:
        done = sum(len(lat) for lat in latencies)
        # Every request that did not succeed is one error: failed, never started, or still
        # running at the deadline.
        unfinished = clients * per_client - done - len(errors)
        errs = list(errors) + [f"request unfinished after {timeout * per_client:.0f} s"] * max(
            0, unfinished)
        return Burst(clients, wall, sum(images), [x for lat in latencies for x in lat], errs)


def load_summary(bursts: list, per_client: int) -> dict:
    from bench.report import summary

    latencies = [x for b in bursts for x in b.latencies_s]
    stats = sum((b.unet for b in bursts), UNetStats(0, 0, 0, 0, {}))
    ex = stats.executions
    return {
        "images_per_s": summary([b.images_per_s for b in bursts])["median"],
        "images_per_s_overall": (sum(b.images for b in bursts)
                                 / max(1e-9, sum(b.wall_s for b in bursts))),
        "bursts": len(bursts),
        "requests_per_client": per_client,
        "latency": summary(latencies),
        "errors": sum(len(b.errors) for b in bursts),
        "error_examples": sorted({e for b in bursts for e in b.errors})[:5],
        "unet_executions": ex,
        "unet_avg_batch": stats.inferences / ex if ex else float("nan"),
        "unet_requests_per_execution": stats.requests / ex if ex else float("nan"),
        "unet_batch_histogram": {str(k): v for k, v in sorted(stats.batches.items()) if v},
        "unet_compute_ms_per_execution": stats.compute_ns / ex / 1e6 if ex else float("nan"),
    }
