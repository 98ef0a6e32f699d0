"""CallBatcher: calls from concurrent threads merged into batched runs, results split back."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from server.batching import CallBatcher, parse_network_metrics

JOIN_S = 30  # generous bound on thread joins: a hang fails the test instead of the suite


class Affine:
    """y = 2x + b row by row; records the batch size of every run; refuses rows holding NaN."""

    def __init__(self):
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, x: np.ndarray, b: np.ndarray) -> np.ndarray:
        with self.lock:
            self.sizes.append(x.shape[0])
        if np.isnan(x).any():
            raise ValueError("NaN in x")
        return 2 * x + b[:, None]


def run_members(batcher: CallBatcher, fn, n_threads: int, calls: int, rows: int = 1,
                poison: int | None = None) -> list[list]:
    """n_threads members, each making `calls` calls of `rows` rows; their results or errors."""
    results: list[list] = [[] for _ in range(n_threads)]
    start = threading.Barrier(n_threads)

    def member(i: int) -> None:
        with batcher.member():
            start.wait(JOIN_S)
            for k in range(calls):
                x = np.full((rows, 3), 10.0 * i + k, dtype=np.float32)
                if i == poison:
                    x[0, 0] = np.nan
                b = np.full((rows,), float(i), dtype=np.float32)
                try:
                    results[i].append((x, b, fn(x, b)))
                except ValueError as e:
                    results[i].append(e)

    threads = [threading.Thread(target=member, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "a member thread hung"
    return results


def test_single_caller_runs_at_once_and_unchanged():
    f = Affine()
    batcher = CallBatcher(max_wait_s=60.0)  # no member waits: the wait never applies
    call = batcher.wrap(f, max_batch=8, name="affine")
    x, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1.0, -1.0], np.float32)
    np.testing.assert_array_equal(call(x, b), 2 * x + b[:, None])
    assert f.sizes == [2]
    assert batcher.stats["affine"].executions == 1 and batcher.stats["affine"].items == 2


def test_concurrent_members_are_merged_and_get_their_own_rows():
    f = Affine()
    batcher = CallBatcher(max_wait_s=5.0)
    call = batcher.wrap(f, max_batch=16, name="affine")
    results = run_members(batcher, call, n_threads=4, calls=5, rows=2)
    for per_thread in results:
        assert len(per_thread) == 5
        for x, b, y in per_thread:
            np.testing.assert_array_equal(y, 2 * x + b[:, None])
    # Every member waits for the others, so calls are merged: fewer runs than calls, and at
    # least one run with all four members' rows.
    assert sum(f.sizes) == 4 * 5 * 2
    assert len(f.sizes) < 20 and max(f.sizes) == 8
    stats = batcher.stats["affine"]
    assert stats.calls == 20 and stats.items == 40 and stats.executions == len(f.sizes)


def test_runs_never_exceed_max_batch():
    f = Affine()
    batcher = CallBatcher(max_wait_s=5.0)
    call = batcher.wrap(f, max_batch=6)
    results = run_members(batcher, call, n_threads=4, calls=3, rows=3)
    assert all(len(r) == 3 for r in results)
    assert max(f.sizes) <= 6 and sum(f.sizes) == 36


def test_a_call_larger_than_max_batch_runs_in_slices():
    # max_batch bounds every run (and so a network's activation memory), even a lone call's.
    f = Affine()
    call = CallBatcher().wrap(f, max_batch=2)
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    b = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(call(x, b), 2 * x + b[:, None])
    assert f.sizes == [2, 2, 1]


def test_different_shapes_and_functions_run_separately():
    f, g = Affine(), Affine()
    batcher = CallBatcher(max_wait_s=5.0)
    call_f, call_g = batcher.wrap(f, 16, "f"), batcher.wrap(g, 16, "g")
    out: dict[str, np.ndarray] = {}
    start = threading.Barrier(3)

    def member(key, fn, width):
        with batcher.member():
            start.wait(JOIN_S)
            x = np.ones((1, width), np.float32)
            out[key] = fn(x, np.zeros(1, np.float32))

    threads = [threading.Thread(target=member, args=a) for a in
               [("f3", call_f, 3), ("f4", call_f, 4), ("g3", call_g, 3)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert {k: v.shape for k, v in out.items()} == {"f3": (1, 3), "f4": (1, 4), "g3": (1, 3)}
    assert f.sizes == [1, 1] and g.sizes == [1]


def test_a_failing_call_fails_alone():
    f = Affine()
    batcher = CallBatcher(max_wait_s=5.0)
    call = batcher.wrap(f, max_batch=16)
    results = run_members(batcher, call, n_threads=3, calls=2, poison=1)
    assert all(isinstance(r, ValueError) for r in results[1])
    for i in (0, 2):
        for x, b, y in results[i]:
            np.testing.assert_array_equal(y, 2 * x + b[:, None])


def test_an_idle_member_delays_others_only_up_to_max_wait():
    f = Affine()
    batcher = CallBatcher(max_wait_s=0.05)
    call = batcher.wrap(f, max_batch=16)
    answered = threading.Event()

    def idle_member():
        with batcher.member():
            answered.wait(JOIN_S)  # stays registered until the other call was answered

    idle = threading.Thread(target=idle_member)
    idle.start()
    with batcher.member():
        y = call(np.ones((1, 2), np.float32), np.zeros(1, np.float32))
    answered.set()
    idle.join(JOIN_S)
    np.testing.assert_array_equal(y, [[2.0, 2.0]])


def test_a_leaving_member_releases_the_waiting_call():
    f = Affine()
    batcher = CallBatcher(max_wait_s=600.0)  # only the other member's leaving can release it
    call = batcher.wrap(f, max_batch=16)
    entered, out = threading.Event(), []

    def caller():
        with batcher.member():
            entered.set()
            out.append(call(np.ones((1, 2), np.float32), np.zeros(1, np.float32)))

    with batcher.member():  # registered first, never calls
        t = threading.Thread(target=caller)
        t.start()
        entered.wait(JOIN_S)
    t.join(JOIN_S)
    assert not t.is_alive() and len(out) == 1


def test_on_run_reports_each_merged_run():
    seen = []
    batcher = CallBatcher(max_wait_s=5.0, on_run=lambda *a: seen.append(a[:3]))
    call = batcher.wrap(Affine(), max_batch=16, name="unet")
    run_members(batcher, call, n_threads=2, calls=1, rows=2)
    assert sum(sizes[0] for _, sizes, _ in seen) == 4
    assert all(name == "unet" for name, _, _ in seen)
    assert sum(calls for _, _, calls in seen) == 2


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_wait_s"):
        CallBatcher(max_wait_s=-1)
    with pytest.raises(ValueError, match="max_batch"):
        CallBatcher().wrap(Affine(), max_batch=0)


def test_network_metrics_are_parsed_by_model_and_network():
    page = "\n".join([
        "# HELP ldm_network_executions_total network runs of the pipeline's in-process batcher",
        "# TYPE ldm_network_executions_total counter",
        'ldm_network_executions_total{model="ldm_txt2img",network="unet"} 25',
        'ldm_network_calls_total{model="ldm_txt2img",network="unet"} 50',
        'ldm_network_executions_total{model="ldm_txt2img_stream",network="unet"} 3',
        'ldm_network_compute_us_total{network="vae_decoder",model="ldm_txt2img"} 1.5e+04',
        'nv_inference_count{model="unet",version="1"} 7',
    ])
    assert parse_network_metrics(page) == {
        ("ldm_txt2img", "unet"): {"ldm_network_executions_total": 25.0,
                                  "ldm_network_calls_total": 50.0},
        ("ldm_txt2img_stream", "unet"): {"ldm_network_executions_total": 3.0},
        ("ldm_txt2img", "vae_decoder"): {"ldm_network_compute_us_total": 15000.0},
    }
