"""Soak: the served demo model under steady load, with errors, latency and memory each minute.

    python -m bench.soak --minutes 10 --clients 8        # starts `python -m server` itself
    python -m bench.soak --url http://127.0.0.1:8080 --pid 1234   # or watches a running one

Each client loops on the gateway: a plain request, a streamed one, now and then a request
the server must refuse (bad size), varying prompts, seeds and steps. Every minute one line:
requests, errors (unexpected statuses), timeouts, p50/p95 latency, and the RSS of every
process of the served set (launcher + gateway, tritonserver, each stub). At the end, the
totals and the RSS drift over the second half of the run (target: 0 errors, 0 timeouts,
drift <= 5%).
"""
from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bench.procmem import process_rss
from bench.served import start_server

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [f"a {c} {s} in the {p}" for c in ("red", "green", "blue", "yellow")
           for s in ("circle", "square", "triangle") for p in ("top left", "center",
                                                               "bottom right")]


class Tally:
    """Thread-safe counts and latencies, per reporting interval and overall."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.total = {"requests": 0, "errors": 0, "timeouts": 0}
        self.window = dict(self.total)
        self.first_error = ""

    def add(self, seconds: float | None, ok: bool, detail: str = "") -> None:
        with self.lock:
            for d in (self.total, self.window):
                d["requests"] += 1
                d["errors"] += (not ok) and seconds is not None
                d["timeouts"] += seconds is None
            if seconds is not None and ok:
                self.latencies.append(seconds)
            if not ok and not self.first_error:
                self.first_error = detail

    def take(self) -> tuple[dict, list[float]]:
        with self.lock:
            window, lat = self.window, self.latencies
            self.window, self.latencies = {k: 0 for k in self.total}, []
        return window, lat


def client_loop(url: str, tally: Tally, stop: threading.Event, seed: int,
                timeout: float) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=timeout) as http:
        while not stop.is_set():
            kind = rng.choices(["plain", "stream", "bad"], [6, 3, 1])[0]
            body = {"prompt": rng.choice(PROMPTS), "steps": rng.randint(5, 25),
                    "seed": rng.randint(0, 10**6)}
            if kind == "bad":
                body["size"] = "7x7"
            t0 = time.perf_counter()
            try:
                if kind == "stream":
                    with http.stream("POST", "/v1/images/generations/stream", json=body) as r:
                        text = "".join(r.iter_text())
                    ok = r.status_code == 200 and "event: result" in text
                else:
                    r = http.post("/v1/images/generations", json=body)
                    ok = r.status_code == (400 if kind == "bad" else 200)
                    text = r.text
                tally.add(time.perf_counter() - t0, ok, f"{kind} {r.status_code} {text[:200]}")
            except httpx.TimeoutException:
                tally.add(None, False, f"{kind} timeout")
            except httpx.HTTPError as e:
                tally.add(time.perf_counter() - t0, False, f"{kind} {type(e).__name__}: {e}")


def report_line(minute: int, window: dict, lat: list[float], rss: dict[str, int]) -> str:
    p50, p95 = (np.percentile(lat, [50, 95]) if lat else (float("nan"),) * 2)
    procs = ", ".join(f"{k.rsplit(' (', 1)[0]} {v / 1e6:.0f}" for k, v in sorted(rss.items()))
    return (f"| {minute} | {window['requests']} | {window['errors']} | {window['timeouts']} | "
            f"{p50:.2f} | {p95:.2f} | {sum(rss.values()) / 1e6:.0f} | {procs} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--url", help="a running gateway (default: start python -m server)")
    p.add_argument("--pid", type=int, help="with --url: the launcher's pid, for RSS")
    p.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "demo" / "ldm")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "soak")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    args = p.parse_args(argv)
    if args.url and not args.pid:
        p.error("--url needs --pid (the process whose tree is measured)")
    served = None if args.url else start_server(
        ["--checkpoint", str(args.checkpoint), "--repository", str(args.work / "model_repository"),
         "--work-dir", str(args.work / "export")], timeout=600, quiet=True)
    url = args.url or served.url
    root = args.pid or served.proc.pid
    tally, stop = Tally(), threading.Event()
    threads = [threading.Thread(target=client_loop, args=(url, tally, stop, i, args.timeout),
                                daemon=True) for i in range(args.clients)]
    print(f"soak: {args.clients} clients for {args.minutes:g} min on {url}\n")
    print("| minute | requests | errors | timeouts | p50 s | p95 s | RSS MB | per process MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|", flush=True)
    samples: list[tuple[float, int]] = []
    try:
        for t in threads:
            t.start()
        t0 = time.monotonic()
        minute = 0
        while minute < args.minutes:
            time.sleep(min(60.0, args.minutes * 60 - minute * 60))
            minute += 1
            rss = process_rss(root)
            samples.append((time.monotonic() - t0, sum(rss.values())))
            window, lat = tally.take()
            print(report_line(minute, window, lat, rss), flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(args.timeout)
        if served is not None:
            served.stop()
    half = [r for s, r in samples if s >= samples[-1][0] / 2] or [samples[-1][1]]
    drift = (half[-1] - half[0]) / half[0]
    total = tally.total
    print(f"\ntotal: {total['requests']} requests, {total['errors']} errors, "
          f"{total['timeouts']} timeouts; RSS drift over the second half {drift:+.1%} "
          f"({half[0] / 1e6:.0f} -> {half[-1] / 1e6:.0f} MB)")
    if tally.first_error:
        print(f"first error: {tally.first_error}")
    return 0 if total["errors"] == 0 and total["timeouts"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
