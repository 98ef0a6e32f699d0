"""The training loop shared by both stages: optimizers, accumulation, clipping, checkpoints.

A `Task` (autoencoder or LDM) says what the parameters and losses are; this file owns the
mechanics: AdamW with warm-up and a schedule, gradient accumulation and clipping, bf16
autocast, data-parallel gradient all-reduce, a progress bar, JSONL metrics, periodic
validation, sample grids, atomic checkpoints, exact `--resume`, and a clean stop on
Ctrl-C / SIGTERM (finish the step, save, exit).

`metrics.jsonl` reads as one run across resumes: `--resume` drops the lines logged after the
checkpoint's step (a crash or `kill -9` loses those steps, which are then trained again), and
`time` counts on from the wall time the checkpoint had trained for.
"""
from __future__ import annotations

import json
import logging
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ldm.config import ConfigError
from ldm.data.imagefolder import collate
from ldm.training import randomness
from ldm.training.checkpoint import atomic_save, atomic_write, load_state
from ldm.training.config import LoopConfig, OptimConfig
from ldm.training.schedule import BatchSchedule, TimeBudget, clock, lr_lambda

log = logging.getLogger(__name__)


class Task(Protocol):
    """What a training stage provides to the loop."""

    model: torch.nn.Module

    def param_groups(self) -> list[list[torch.nn.Parameter]]:
        """Parameters of each optimizer, in optimizer_idx order."""

    def loss(
        self, batch: dict, gens: list[torch.Generator], step: int, opt_idx: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss over the micro-batch for optimizer `opt_idx`, and scalars to log."""

    def active_optimizers(self, step: int) -> list[int]:
        """Which optimizers step at `step` (e.g. the discriminator only after disc_start)."""

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (EMA update)."""

    def validate(self, batches: Iterator[dict]) -> dict[str, float]: ...

    def sample_grid(self, step: int) -> np.ndarray: ...

    def save_model(self, folder: Path) -> None:
        """Write the inference checkpoint (our safetensors format)."""

    def extra_state(self) -> dict: ...

    def load_extra_state(self, state: dict) -> None: ...


def allreduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over processes in one flat buffer (data parallelism)."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class _StopFlag:
    """First Ctrl-C / SIGTERM asks for a clean stop at the end of the step; a second one aborts."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested (signal %d): finishing the step, saving, exiting", signum)


class Trainer:
    def __init__(self, task: Task, loop: LoopConfig, optim: OptimConfig, data_seed: int,
                 train_set: Dataset, val_set: Dataset | None, config: dict, num_workers: int = 0):
        self.task, self.cfg, self.optim_cfg = task, loop, optim
        self.train_set, self.val_set, self.config = train_set, val_set, config
        self.data_seed, self.num_workers = data_seed, num_workers
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if loop.batch_size % (self.world * loop.grad_accum):
            raise ConfigError(
                f"train.batch_size={loop.batch_size} must divide by processes x grad_accum "
                f"= {self.world} x {loop.grad_accum}"
            )
        self.out = Path(loop.out_dir)
        self.optimizers = [
            torch.optim.AdamW(ps, lr=optim.lr, betas=tuple(optim.betas),
                              weight_decay=optim.weight_decay)
            for ps in task.param_groups()
        ]
        # The step the LR schedule ends at and the run stops: max_steps, or fewer when a time
        # budget (max_minutes) cannot reach it (set by `budget`, kept in the checkpoint).
        self.horizon = loop.max_steps
        self.schedulers = [
            torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(optim, lambda: self.horizon))
            for o in self.optimizers
        ]
        self.budget = TimeBudget(60 * loop.max_minutes)
        self.step = 0
        self.elapsed = 0.0  # training wall time (s) before this invocation, from the checkpoint
        self._t0: float | None = None  # time.time() that the `time` metric counts from
        self.resumed = False

    # --- checkpoints -------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoints" / "last.pt"

    def save(self) -> None:
        if self.rank != 0:
            return
        state = {
            "step": self.step,
            "model": self.task.model.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "torch_rng": torch.get_rng_state(),
            "extra": self.task.extra_state(),
            "elapsed": time.time() - self._t0 if self._t0 is not None else self.elapsed,
            "horizon": self.horizon,
            "budgeted": self.budget.seconds > 0 and self.budget.settled,
        }
        atomic_save(state, self.ckpt_path)
        self.task.save_model(self.out / "model")
        log.info("saved step %d to %s", self.step, self.ckpt_path)

    def resume(self) -> None:
        if not self.ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {self.ckpt_path}")
        state = load_state(self.ckpt_path)
        self.task.model.load_state_dict(state["model"])
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, state["schedulers"], strict=True):
            sch.load_state_dict(s)
        torch.set_rng_state(state["torch_rng"])
        self.task.load_extra_state(state["extra"])
        self.step = state["step"]
        if state.get("budgeted") and self.cfg.max_minutes > 0:  # the schedule it started
            self.horizon = min(int(state["horizon"]), self.cfg.max_steps)
            self.budget.settled = True
        self.resumed = True
        kept = self._truncate_metrics() if self.rank == 0 else []
        # Checkpoints from before "elapsed" was saved: the last kept `time` is the best guess.
        self.elapsed = float(state.get("elapsed", max(
            (r["time"] for r in kept if isinstance(r.get("time"), (int, float))), default=0.0)))
        log.info("resumed from %s at step %d", self.ckpt_path, self.step)

    def _truncate_metrics(self) -> list[dict]:
        """Drop metrics lines after the checkpoint's step (atomically); returns those kept.

        They were logged by the run that died after its last checkpoint; the resumed run logs
        those steps again, so keeping them would repeat steps. A torn last line (a crash
        mid-write) is dropped too.
        """
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return []
        kept, lines, dropped = [], [], 0
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                dropped += 1
                continue
            if step > self.step:
                dropped += 1
                continue
            kept.append(record)
            lines.append(line + "\n")
        if dropped:
            atomic_write(path, lambda f: f.write("".join(lines).encode()))
            log.info("metrics.jsonl: dropped %d lines logged after step %d", dropped, self.step)
        return kept

    # --- one step ----------------------------------------------------------------------
    def _train_step(self, batch: dict) -> dict[str, float]:
        local = len(batch["caption"])
        micro = local // self.cfg.grad_accum
        logs: dict[str, float] = {}
        autocast = torch.autocast(
            "cuda" if torch.cuda.is_available() else "cpu",
            dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16",
        )
        for idx in self.task.active_optimizers(self.step):
            opt = self.optimizers[idx]
            opt.zero_grad(set_to_none=True)
            for m in range(self.cfg.grad_accum):
                sl = slice(m * micro, (m + 1) * micro)
                part = {"image": batch["image"][sl], "caption": batch["caption"][sl]}
                first = self.rank * local + m * micro
                gens = randomness.sample_generators(
                    self.cfg.seed, self.step, list(range(first, first + micro)))
                with autocast:
                    loss, part_logs = self.task.loss(part, gens, self.step, idx)
                (loss / self.cfg.grad_accum).backward()
                for k, v in part_logs.items():
                    logs[k] = logs.get(k, 0.0) + v / self.cfg.grad_accum
            params = [p for g in opt.param_groups for p in g["params"]]
            allreduce_grads(params, self.world)
            if self.optim_cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.grad_clip)
                logs[f"grad_norm_{idx}"] = float(norm)
            opt.step()
        with warnings.catch_warnings():
            # An optimizer that has not started yet (discriminator before disc_start) still
            # advances its schedule, so warm-up and decay stay aligned with the global step.
            warnings.simplefilter("ignore", UserWarning)
            for sch in self.schedulers:
                sch.step()
        if self.world > 1:  # report the global-batch mean, not this process's share
            keys = sorted(logs)
            values = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(values)
            logs = {k: float(v) / self.world for k, v in zip(keys, values, strict=True)}
        logs["lr"] = self.schedulers[0].get_last_lr()[0]
        self.task.after_step(self.step)
        return logs

    # --- periodic work -----------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def _validate(self) -> None:
        if self.val_set is None or self.rank != 0:
            return
        loader = DataLoader(self.val_set, batch_size=self.cfg.batch_size, collate_fn=collate)
        self.task.model.eval()
        with torch.no_grad():
            metrics = self.task.validate(iter(loader))
        self.task.model.train()
        self._log({"step": self.step, "time": time.time() - self._t0, **metrics})
        log.info("step %d validation: %s", self.step,
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def _samples(self) -> None:
        if self.rank != 0:
            return
        from PIL import Image

        self.task.model.eval()
        with torch.no_grad():
            grid = self.task.sample_grid(self.step)
        self.task.model.train()
        path = self.out / "samples" / f"step_{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)

    def _open_tensorboard(self):
        if self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        # As metrics.jsonl: events after the checkpoint's step are from the run that died.
        return SummaryWriter(str(self.out / "tensorboard"),
                             purge_step=self.step + 1 if self.resumed else None)

    # --- the loop ----------------------------------------------------------------------
    def fit(self) -> int:
        """Train until the horizon (max_steps, or what fits in max_minutes), a stop request or
        stop_after_steps; then validate, sample and save, however it stopped."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (self.out / "config.json").write_text(json.dumps(self.config, indent=2))
        self.tb = self._open_tensorboard()
        stop = _StopFlag()
        old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        sampler = BatchSchedule(len(self.train_set), self.cfg, self.data_seed, self.step,
                                self.rank, self.world)
        loader = DataLoader(self.train_set, batch_sampler=sampler, collate_fn=collate,
                            num_workers=self.num_workers, persistent_workers=False)
        # A progress bar on a terminal; a log line per log_every steps otherwise (a redirected
        # bar is one ever-growing line of carriage returns).
        lines = self.rank == 0 and not sys.stderr.isatty()
        bar = tqdm(total=self.horizon, initial=self.step, disable=self.rank != 0 or lines,
                   dynamic_ncols=True, desc="train")
        t0, self._first = time.time(), self.step
        self._t0 = t0 - self.elapsed
        self.task.model.train()
        try:
            for batch in loader:
                logs = self._train_step(batch)
                self.step += 1
                bar.update(1)
                shown = self._shown(logs)
                bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in shown.items()})
                self._periodic(logs, shown, t0, lines, bar)
                if self._should_stop(stop, t0):
                    break
        finally:
            bar.close()
            for s, h in old.items():
                signal.signal(s, h)
        self._finish()
        return self.step

    def _periodic(self, logs: dict, shown: dict, t0: float, lines: bool, bar) -> None:
        if self.step % self.cfg.log_every == 0:
            self._log({"step": self.step, "time": time.time() - self._t0, **logs})
            if lines:
                self._log_line(shown, t0)
        if self.step % self.cfg.val_every == 0:
            self._validate()
        if self.step % self.cfg.sample_every == 0:
            self._samples()
        if self.step % self.cfg.ckpt_every == 0:
            self.save()
        horizon = self.budget.horizon(self.step, self._first, t0, time.time() - self._t0,
                                      self.cfg.max_steps)
        if horizon is not None:
            self.horizon, bar.total = horizon, horizon
            log.info("time budget %g min: about %d steps fit (at %.2f steps/s); the LR "
                     "schedule and the progress now end at step %d", self.cfg.max_minutes,
                     horizon, self.budget.rate, horizon)

    def _shown(self, logs: dict) -> dict[str, float]:
        """The few numbers the bar and the log lines show (Task.progress_keys)."""
        keys = getattr(self.task, "progress_keys", None)
        if keys is None:
            return {k: v for k, v in logs.items() if "loss" in k[-9:]}
        return {k: logs[k] for k in keys if k in logs}

    def _log_line(self, shown: dict, t0: float) -> None:
        done = self.step - self._first
        rate = done / max(time.time() - t0, 1e-9)
        left = (self.horizon - self.step) / rate if rate > 0 else float("inf")
        values = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in shown.items())
        log.info("step %d/%d %s lr=%.3g | %.2f steps/s, %s left", self.step, self.horizon,
                 values, self.schedulers[0].get_last_lr()[0], rate, clock(left))

    def _should_stop(self, stop: _StopFlag, t0: float) -> bool:
        overtime = bool(self.budget.seconds and time.time() - self._t0 > self.budget.seconds)
        sliced = bool(self.cfg.stop_after_steps
                      and self.step - self._first >= self.cfg.stop_after_steps)
        if self.step >= self.horizon:
            return True
        if stop.requested or overtime or sliced:
            why = "stop requested" if stop.requested else (
                "time budget spent" if overtime else "stop_after_steps reached")
            log.warning("stopped at step %d of %d (%s); continue with --resume", self.step,
                        self.horizon, why)
            return True
        return False

    def _finish(self) -> None:
        """Validation, samples and the checkpoint at the last step, whatever stopped the run."""
        if self.step == self._first and self.resumed:
            return  # nothing trained since the checkpoint: it already holds all of this
        if self.step % self.cfg.ckpt_every:  # first: a second Ctrl-C may cut what follows
            self.save()
        if self.step % self.cfg.val_every:
            self._validate()
        if self.step % self.cfg.sample_every:
            self._samples()
