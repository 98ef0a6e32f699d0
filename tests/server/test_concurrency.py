"""RequestPool: the bounded pool every pipeline model runs its requests on."""
from __future__ import annotations

import threading
import time

import pytest

from server.concurrency import RequestPool


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_at_most_workers_run_and_the_rest_wait_in_order():
    pool = RequestPool(3, "t")
    lock, running, peak, order = threading.Lock(), [0], [0], []
    release = threading.Event()

    def run(i: int) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            order.append(i)
        release.wait(5)
        with lock:
            running[0] -= 1

    for i in range(10):
        pool.submit(run, lambda i: None, i)
    time.sleep(0.2)
    assert pool.running == 3 and sorted(order) == [0, 1, 2]  # the others queue
    release.set()
    wait_until(lambda: len(order) == 10 and pool.running == 0)
    pool.shutdown()
    assert peak[0] == 3 and sorted(order) == list(range(10)) and order[3:] == list(range(3, 10))


def test_a_burst_after_sequential_requests_runs_concurrently():
    # Requests whose UNet steps should share a batch must run at the same time.
    pool = RequestPool(4, "t")
    for _ in range(20):
        done = threading.Event()
        pool.submit(lambda e: e.set(), None, done)
        assert done.wait(5)
    barrier = threading.Barrier(4, timeout=5)
    met = []
    for _ in range(4):
        pool.submit(lambda: met.append(barrier.wait()), None)
    wait_until(lambda: len(met) == 4)
    pool.shutdown()
    assert sorted(met) == [0, 1, 2, 3]  # all four were in the barrier at once


def test_shutdown_rejects_what_waits_and_lets_running_requests_finish():
    pool = RequestPool(1, "t")
    started, release = threading.Event(), threading.Event()
    done, rejected = [], []

    def run(i: int) -> None:
        started.set()
        release.wait(5)
        done.append(i)

    for i in range(3):
        pool.submit(run, rejected.append, i)
    assert started.wait(5)
    closer = threading.Thread(target=pool.shutdown)
    closer.start()
    time.sleep(0.1)
    release.set()
    closer.join(5)
    assert done == [0] and rejected == [1, 2]


def test_workers_must_be_positive():
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        RequestPool(0, "t")
