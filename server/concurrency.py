"""The one way a pipeline model runs its requests: a bounded pool of threads.

Triton's Python backend calls `execute` with a list of requests and, for a decoupled model or
one that answers through response senders, lets it return at once. Each request then runs on
one of at most `workers` threads; the rest wait their turn in arrival order, so a burst of
clients costs queue entries, not threads. On unload, requests still waiting are answered
with `reject` (the model is going away) and running ones are let finish.

    pool = RequestPool(8, "ldm_txt2img_stream")
    pool.submit(self.run, self.reject, request)   # in execute()
    pool.shutdown()                                # in finalize()
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable

_STOP = object()


class RequestPool:
    """`workers` threads, started with the pool, taking requests from one FIFO queue: a
    burst finds its threads already waiting, and an exception in `run` never costs one."""

    def __init__(self, workers: int, name: str):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._running = 0
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    @property
    def running(self) -> int:
        """Requests running now (at most `workers`)."""
        return self._running

    def submit(self, run: Callable[..., object], reject: Callable[..., object], *args) -> None:
        """Run `run(*args)` on a pool thread, or `reject(*args)` if the pool closes first."""
        self._queue.put((run, reject, args))

    def _work(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            run, reject, args = item
            if self._closing.is_set():
                reject(*args)
                continue
            with self._lock:
                self._running += 1
            try:
                run(*args)
            except Exception:  # noqa: BLE001 - `run` answers its own errors; keep the thread
                pass
            finally:
                with self._lock:
                    self._running -= 1

    def shutdown(self) -> None:
        """Reject what waits, let what runs finish, then return."""
        self._closing.set()
        for _ in self._threads:
            self._queue.put(_STOP)  # after every waiting request: those are rejected first
        for thread in self._threads:
            thread.join()
