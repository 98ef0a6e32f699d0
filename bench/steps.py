"""Judged accuracy against served time per image, per sampler and step count.

    python -m bench.steps                                  # demo model, 4 samplers x 4 counts
    python -m bench.steps --samplers ddim,dpmpp_2m --steps 10,25 --seeds 1
    python -m bench.steps --no-timing                      # accuracy only: any machine will do

For each (sampler, steps):
- accuracy: every caption of the `shapes` grammar (120) x `--seeds` seeds, generated in
  process and scored by the pixel-statistics judge, exactly as `python -m ldm.evaluate ldm`
  does (same batches, same seeds), so the numbers match it;
- time per image: one request (one prompt, one image) through `server.txt2img.Txt2ImgService`
  over ONNX Runtime sessions on the exported graphs, as the served pipeline runs it
  (`bench.contenders.LocalService`); configurations are interleaved round-robin so drifting
  background load hits them alike; the median of `--repetitions` after `--warmup` rounds.

Prints a Markdown table and the verdict of the rule: the fastest (sampler, steps) whose
all-three accuracy is within 1 point (0.01) of the best in the table. Writes the raw numbers
to `--out`. Timing needs a quiet machine; accuracy does not (`--no-timing`).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ldm.evaluate import DEFAULT_GUIDANCE, DEFAULT_STEPS

log = logging.getLogger("bench.steps")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = PROJECT_ROOT / "checkpoints" / "demo" / "ldm"
DEFAULT_OUT = PROJECT_ROOT / "bench" / "results" / "steps.json"
DEFAULT_WORK = PROJECT_ROOT / "build" / "bench"  # where `python -m bench` keeps its repository
SAMPLERS = ("ddim", "plms", "dpmpp_2m", "ddpm")
STEP_COUNTS = (5, 10, 15, 25)
TOLERANCE = 0.01  # "within 1 point" of the best all-three accuracy
# Accuracies are multiples of 1/(120 x seeds): this only absorbs float error in `best - acc`.
EPS = 1e-9
SETTLE_S = 0.1  # idle between timed requests: spinning ORT thread pools go quiet first
NETWORKS = ("text_encoder", "unet", "vae_decoder")
REFERENCE = ("ddim", 25)  # the served default before this table chose DDIM 10
REFERENCE_LABEL = "DDIM-25"


@dataclass
class Row:
    """One (sampler, steps): its judged accuracy and, when timed, its time per image."""

    sampler: str
    steps: int
    images: int
    acc_color: float
    acc_shape: float
    acc_position: float
    acc_all: float
    accuracy_seconds: float
    ms_per_image: float | None = None  # median; None when timing was skipped
    times_ms: list[float] = field(default_factory=list)  # every measured request

    @property
    def key(self) -> tuple[str, int]:
        return self.sampler, self.steps


# --- arguments -----------------------------------------------------------------------------

def _names(text: str) -> list[str]:
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SAMPLERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(SAMPLERS)}, got {text!r}")
    return list(dict.fromkeys(names))  # keep order, drop repeats


def _counts(text: str) -> list[int]:
    try:
        counts = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"step counts must be >= 1, got {text!r}")
    return sorted(set(counts))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.steps", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                   help="our LDM checkpoint folder (default: the demo model)")
    p.add_argument("--samplers", type=_names, default=list(SAMPLERS),
                   help=f"comma-separated (default {','.join(SAMPLERS)})")
    p.add_argument("--steps", type=_counts, default=list(STEP_COUNTS),
                   help=f"comma-separated step counts (default {','.join(map(str, STEP_COUNTS))})")
    p.add_argument("--seeds", type=int, default=4, help="seeds per caption (accuracy)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance scale (default: served, {DEFAULT_GUIDANCE})")
    p.add_argument("--repetitions", type=int, default=10, help="timed requests per config")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests per config first")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: usable cores)")
    p.add_argument("--no-timing", dest="timing", action="store_false",
                   help="accuracy only: skip the export and the timed requests")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK,
                   help="holds (or receives) model_repository and the export cache")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.repetitions < 1:
        p.error("--seeds and --repetitions must be >= 1")
    if args.warmup < 0 or args.threads < 0:
        p.error("--warmup and --threads must be >= 0")
    return args


def configs(samplers: list[str], steps: list[int]) -> list[tuple[str, int]]:
    return [(s, n) for s in samplers for n in steps]


# --- accuracy ------------------------------------------------------------------------------

def measure_accuracy(model, grid: list[tuple[str, int]], seeds: int,
                     guidance: float) -> list[Row]:
    """One Row per (sampler, steps), without times: the building blocks of
    `ldm.evaluate.evaluate_ldm` with the model loaded once for the whole grid."""
    from ldm.data.shapes import all_specs
    from ldm.pipeline import Txt2ImgPipeline

    pipe, specs = Txt2ImgPipeline(model), all_specs()
    rows = []
    for sampler, steps in grid:
        t0 = time.perf_counter()
        acc = judged_accuracy(pipe, specs, seeds, steps, guidance, sampler)
        rows.append(Row(sampler, steps, seeds * len(specs), acc["color"], acc["shape"],
                        acc["position"], acc["all"], time.perf_counter() - t0))
        log.info("%s %d steps: all three %.4f (%.0f s)", sampler, steps, acc["all"],
                 rows[-1].accuracy_seconds)
    return rows


def judged_accuracy(pipe, specs: list, seeds: int, steps: int, guidance: float,
                    sampler: str) -> dict[str, float]:
    """{color, shape, position, all}: fractions of `seeds` x captions judged right. Same
    batches and seeds as evaluate_ldm, so the same images and numbers."""
    from ldm.evaluation.judge import score

    totals = {"color": 0, "shape": 0, "position": 0, "all": 0}
    for seed in range(seeds):  # the pipeline runs without autograd
        images = pipe([s.caption for s in specs], steps=steps, guidance_scale=guidance,
                      seed=seed, sampler=sampler)
        for spec, image in zip(specs, images, strict=True):
            for k, ok in score(spec, image).items():
                totals[k] += ok
    return {k: v / (seeds * len(specs)) for k, v in totals.items()}


# --- timing --------------------------------------------------------------------------------

def served_repository(checkpoint: Path, work_dir: Path, threads: int) -> Path:
    """`work_dir`/model_repository: reused as it is when it holds this checkpoint's ONNX graphs
    and pipeline models (what `python -m bench` leaves there), else built the way
    `bench.repositories.build_served_repository` builds it."""
    from export.manifest import checkpoint_digest, read_manifest

    repo = work_dir / "model_repository"
    manifest = read_manifest(repo) or {}
    built_from = (manifest.get("checkpoint") or {}).get("sha256")
    ours = checkpoint_digest(checkpoint, None, work_dir / "export" / "checkpoint_digests.json")
    complete = all((repo / n / "1" / "model.onnx").is_file() for n in NETWORKS) and \
        (repo / "ldm_txt2img_stream" / "1" / "pipeline.json").is_file()
    if built_from == ours and complete:
        log.info("reusing %s (built %s)", repo, manifest.get("built_at", "?"))
        return repo
    return build_repository(checkpoint, work_dir, threads)


def build_repository(checkpoint: Path, work_dir: Path, threads: int) -> Path:
    """The python-backend repository with the pipeline models, as `python -m bench` writes it
    (same options, so that the two share one build)."""
    from export.repository import BuildOptions
    from export.repository import build_repository as build
    from export.specs import ShapeLimits
    from export.triton_config import TritonOptions
    from server.repository import PipelineOptions, assemble

    repo = work_dir / "model_repository"
    # bench.run sizes the batch for its 8 load clients; the same limits reuse its ONNX cache.
    options = BuildOptions(models=NETWORKS, limits=ShapeLimits(max_batch=8),
                           triton=TritonOptions(backend="python", threads=threads))
    report = build(checkpoint, repo, options, work_dir=work_dir / "export", progress=False)
    log.info("repository %s: %s", repo, "up to date" if report.up_to_date
             else "rebuilt " + ", ".join(report.rebuilt))
    assemble(repo, PipelineOptions(serving={"networks": "onnxruntime",
                                            "intra_op_threads": threads}))
    return repo


def measure_timing(model, repository: Path, grid: list[tuple[str, int]], guidance: float,
                   threads: int, warmup: int, repetitions: int,
                   progress: bool = True) -> dict[tuple[str, int], list[float]]:
    """(sampler, steps) -> seconds of each measured one-image request on the served path."""
    from bench.contenders import LocalService
    from bench.run import Entry, image_check, round_robin

    image_size = model.config.latent_size * model.first_stage_model.downsample_factor
    ort = LocalService(repository, threads, DEFAULT_STEPS, guidance, image_size)
    check = image_check(image_size)
    entries = [Entry(f"{s}:{n}", timed_request(ort.service, s, n, guidance, image_size, check))
               for s, n in grid]
    raw = round_robin(entries, warmup, repetitions, SETTLE_S, progress)
    return {(s, n): raw[f"{s}:{n}"] for s, n in grid}


def timed_request(service, sampler: str, steps: int, guidance: float, image_size: int,
                  check: Callable[[object], None]) -> Callable[[int], float]:
    """run(rep) -> seconds of one complete request (GenerationRequest with every field set,
    as `GenerationRequest.resolve` would leave it)."""
    from bench.contenders import NEGATIVE_PROMPT
    from bench.run import prompt
    from server.contract import GenerationRequest

    def run(rep: int) -> float:
        # A unique prompt per request: the embedding cache must miss, as for a new user prompt.
        req = GenerationRequest(prompt=prompt(rep, f"{sampler}.{steps}.{rep}"),
                                negative_prompt=NEGATIVE_PROMPT, steps=steps,
                                guidance_scale=guidance, seed=rep, sampler=sampler,
                                num_images=1, height=image_size, width=image_size)
        t0 = time.perf_counter()
        images = service.generate(req).images
        seconds = time.perf_counter() - t0
        check(images)
        return seconds
    return run


def add_times(rows: list[Row], times: dict[tuple[str, int], list[float]]) -> None:
    import statistics

    for row in rows:
        row.times_ms = [1000 * s for s in times[row.key]]
        row.ms_per_image = statistics.median(row.times_ms)


# --- the rule and the report ---------------------------------------------------------------

def within_tolerance(rows: list[Row], tolerance: float = TOLERANCE) -> list[Row]:
    """Rows whose all-three accuracy is within `tolerance` of the best in `rows`."""
    best = max(r.acc_all for r in rows)
    return [r for r in rows if best - r.acc_all <= tolerance + EPS]


def choose_default(rows: list[Row], tolerance: float = TOLERANCE) -> Row | None:
    """The fastest row within `tolerance` of the best all-three accuracy; None when one of
    those rows was not timed (the rule cannot be applied). Equal times go to the more
    accurate row, then to fewer steps, then to the earlier row."""
    candidates = within_tolerance(rows, tolerance)
    if any(r.ms_per_image is None for r in candidates):
        return None
    order = {id(r): i for i, r in enumerate(rows)}
    return min(candidates, key=lambda r: (r.ms_per_image, -r.acc_all, r.steps, order[id(r)]))


def reference_ms(rows: list[Row]) -> float | None:
    """The served default's time per image, when it is in the table and timed."""
    return next((r.ms_per_image for r in rows if r.key == REFERENCE), None)


def _relative(ms: float | None, ref: float | None) -> str:
    return f"{ms / ref:.2f}x" if ms is not None and ref else "n/a"


def render(rows: list[Row], tolerance: float = TOLERANCE) -> str:
    """The Markdown table, the rule and its verdict."""
    ref = reference_ms(rows)
    lines = [f"| sampler | steps | color | shape | position | all three | ms per image "
             f"| x {REFERENCE_LABEL} time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = "n/a" if r.ms_per_image is None else f"{r.ms_per_image:.1f}"
        lines.append(f"| {r.sampler} | {r.steps} | {r.acc_color:.4f} | {r.acc_shape:.4f} "
                     f"| {r.acc_position:.4f} | {r.acc_all:.4f} | {ms} "
                     f"| {_relative(r.ms_per_image, ref)} |")
    best = max(r.acc_all for r in rows)
    lines += ["", f"Rule: the fastest (sampler, steps) whose all-three accuracy is within "
                  f"{100 * tolerance:g} point ({tolerance:g}) of the best all-three accuracy "
                  "in the table.", "", verdict(rows, best, ref, tolerance)]
    return "\n".join(lines)


def verdict(rows: list[Row], best: float, ref: float | None, tolerance: float) -> str:
    chosen = choose_default(rows, tolerance)
    if chosen is None:
        near = ", ".join(f"{r.sampler} {r.steps}" for r in within_tolerance(rows, tolerance))
        return (f"Verdict: none (no timing); within {tolerance:g} of the best all-three "
                f"accuracy {best:.4f}: {near}.")
    versus = (f"{_relative(chosen.ms_per_image, ref)} the {REFERENCE_LABEL} time"
              if ref else f"{REFERENCE_LABEL} not measured")
    return (f"Verdict: {chosen.sampler} at {chosen.steps} steps: all three "
            f"{chosen.acc_all:.4f} (best {best:.4f}), {chosen.ms_per_image:.1f} ms per image, "
            f"{versus}.")


def result_json(args: argparse.Namespace, rows: list[Row], threads: int,
                repository: Path | None, started: str, seconds: float) -> dict:
    from bench.results_io import cpu_name, versions
    from export.ort import usable_cores

    chosen = choose_default(rows)
    return {
        "meta": {"checkpoint": str(args.checkpoint), "seeds": args.seeds,
                 "captions": rows[0].images // args.seeds, "guidance_scale": args.guidance,
                 "samplers": args.samplers, "steps": args.steps, "timing": args.timing,
                 "repetitions": args.repetitions, "warmup": args.warmup, "threads": threads,
                 "cores": usable_cores(), "cpu": cpu_name(), "repository": repository,
                 "reference": {"sampler": REFERENCE[0], "steps": REFERENCE[1]},
                 "tolerance": TOLERANCE, "versions": versions(), "command": " ".join(sys.argv),
                 "started": started, "seconds": seconds},
        "rows": [asdict(r) for r in rows],
        "reference_ms_per_image": reference_ms(rows),
        "chosen": None if chosen is None else {"sampler": chosen.sampler, "steps": chosen.steps},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from bench.results_io import write_json
    from export.manifest import RepositoryConflict
    from export.ort import usable_cores
    from ldm.pretrained import load_pretrained, read_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("export", "server", "ldm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        kind, _ = read_config(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        print(f"bench.steps: error: --checkpoint {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    if kind != "ldm":
        print(f"bench.steps: error: {args.checkpoint} is a {kind} checkpoint", file=sys.stderr)
        return 2
    t_start, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    model = load_pretrained(str(args.checkpoint))
    grid = configs(args.samplers, args.steps)
    rows = measure_accuracy(model, grid, args.seeds, args.guidance)
    repository = None
    if args.timing:
        try:
            repository = served_repository(args.checkpoint, args.work_dir, threads)
        except RepositoryConflict as e:
            print(f"bench.steps: error: {e} (or pass another --work-dir)", file=sys.stderr)
            return 1
        add_times(rows, measure_timing(model, repository, grid, args.guidance, threads,
                                       args.warmup, args.repetitions))
    write_json(result_json(args, rows, threads, repository, started,
                           time.perf_counter() - t_start), args.out)
    print(render(rows))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
