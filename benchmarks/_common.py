"""Shared helpers for the benchmark scripts: interleaved timing, CPU peak memory, environment, CSV.

Timing (``interleaved_medians``): every round runs each variant once, in a fresh random order, so that slow
phases of a noisy shared machine hit all variants alike; a variant's ``setup`` (e.g. clearing ``.grad``) runs
outside its timed region; the garbage collector is off inside a round. Warm-up rounds come first and are thrown
away. Rounds during which other processes were busy are dropped while enough quiet ones can be had; rounds stop
at ``rounds`` or, after ``min_rounds``, once ``max_seconds`` have passed. Report the median.

Peak memory (``peak_bytes``): CPU tensors have no ``torch.cuda.max_memory_allocated``. We run the function once
under ``torch.profiler.profile(profile_memory=True)``: c10's CPU allocator then reports every allocation (+bytes)
and free (-bytes) with a timestamp. Sorting those events by time and taking the maximum of their running sum
gives the peak of live bytes allocated by the function above what was live when it started (its output and any
``.grad`` it creates included; blocks that existed before and were freed inside are not reported by c10, so they
cannot lower the count). What it does not see: scratch memory a BLAS/oneDNN kernel takes from its own allocator,
and allocations made on intra-op worker threads (ATen allocates its tensors on the calling thread); both are the
same for every variant of one op. Autograd's backward on CPU runs on the calling thread, so a training step is
covered end to end.

Allocator (``use_malloc``): large CPU buffers are where training steps of a stacked-weight op and of a
``ModuleList`` loop differ most. glibc serves an allocation above its mmap threshold (dynamic, at most 32 MiB on
64-bit) with fresh pages from ``mmap`` and unmaps it on free, so every training step pays page faults and kernel
zeroing for each such buffer: a stacked ``[E, F, D]`` weight gradient (58 MiB in bf16 for the dense config) is
one, eight per-expert gradients of 7 MiB are not (glibc reuses their heap memory). ``--malloc cached`` re-runs
the script with ``MALLOC_MMAP_MAX_=0`` (no mmap: every block from the heap, reused after free) and a huge
``MALLOC_TRIM_THRESHOLD_`` (freed heap kept), which is what jemalloc/tcmalloc (the allocators PyTorch's CPU
performance guides preload) do by design; ``system`` keeps the process's own settings. The choice is recorded.

Noise (``LoadElsewhere``, ``wait_until_quiet``): the cores other processes keep busy, from ``/proc/stat`` minus
our own CPU time, measured per timed round (``interleaved_timings`` drops busy rounds). Medians absorb short
bursts but not sustained load: with as many intra-op threads as cores, every parallel region then waits a
scheduler slice for a descheduled worker (a 20 us GEMM measured at 10-30 ms), so scripts record this figure
next to their timings and can wait for a quiet machine.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import os
import platform
import random
import resource
import statistics
import subprocess
import time
import types
from pathlib import Path
from typing import Callable, Optional

import contextlib
import sys

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["LoadElsewhere", "Timings", "Variant", "busy_cores_elsewhere", "compile_column", "environment",
           "interleaved_medians", "interleaved_timings", "malloc_mode", "median", "peak_bytes", "ratio_quartiles",
           "results_dir", "run_profiled", "use_malloc", "wait_until_quiet", "write_csv"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class Variant:
    """One timed column: ``run()`` is timed, ``setup()`` (optional) runs just before it, untimed."""

    def __init__(self, run: Callable[[], object], setup: Optional[Callable[[], None]] = None):
        self.run = run
        self.setup = setup or (lambda: None)


@dataclasses.dataclass
class Timings:
    times: dict[str, list[float]]  # seconds per call of each variant, kept rounds only
    rounds: int  # rounds kept
    dropped: int  # rounds thrown away because other processes were busy
    busy_elsewhere: float  # mean cores other processes kept busy over the kept rounds


def interleaved_medians(variants: dict[str, Variant], *, rounds: int, warmup: int, min_rounds: int = 3,
                        max_seconds: float = float("inf"), seed: int = 0) -> dict[str, list[float]]:
    """Seconds per call of every variant, one list each, from interleaved rounds (no round dropped)."""
    return interleaved_timings(variants, rounds=rounds, warmup=warmup, min_rounds=min_rounds,
                               max_seconds=max_seconds, seed=seed).times


def interleaved_timings(variants: dict[str, Variant], *, rounds: int, warmup: int, min_rounds: int = 3,
                        max_seconds: float = float("inf"), max_busy: float = float("inf"),
                        seed: int = 0) -> Timings:
    """Time every variant in interleaved rounds (see the module docstring).

    Stops after ``rounds`` quiet rounds, or after ``max_seconds`` with ``min_rounds`` quiet ones. A round during
    which other processes kept ``max_busy`` cores or more busy is not quiet: it is dropped, unless fewer than
    ``min_rounds`` quiet rounds come within ``3 * max_seconds`` (or ``4 * rounds`` rounds), in which case every
    round is kept and ``busy_elsewhere`` tells how noisy they were."""
    rng = random.Random(seed)
    names = list(variants)
    done: list[tuple[float, dict[str, float]]] = []
    for r in range(warmup):
        _round(variants, names, rng)
    start = time.perf_counter()
    while True:
        quiet = [d for d in done if d[0] < max_busy]
        elapsed = time.perf_counter() - start
        if (len(quiet) >= rounds or (elapsed > max_seconds and len(quiet) >= min_rounds)
                or (len(done) >= min_rounds and (elapsed > 3 * max_seconds or len(done) >= 4 * rounds))):
            break
        with LoadElsewhere() as load:
            dts = _round(variants, names, rng)
        done.append((load.cores, dts))
    kept = quiet if len(quiet) >= min_rounds else done
    busy = [b for b, _ in kept]
    return Timings(times={n: [dts[n] for _, dts in kept] for n in variants}, rounds=len(kept),
                   dropped=len(done) - len(kept), busy_elsewhere=statistics.fmean(busy) if busy else float("nan"))


def _round(variants: dict[str, Variant], names: list[str], rng: random.Random) -> dict[str, float]:
    rng.shuffle(names)
    dts = {}
    gc.collect()
    gc.disable()
    try:
        for n in names:
            v = variants[n]
            v.setup()
            t0 = time.perf_counter()
            v.run()
            dts[n] = time.perf_counter() - t0
    finally:
        gc.enable()
    return dts


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ratio_quartiles(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Quartiles (25%, median, 75%) of a[i] / b[i] over the rounds of ``interleaved_timings``: each round times
    both variants back to back, so the ratio cancels the machine's slow drifts that two medians can catch
    differently."""
    ratios = [x / y for x, y in zip(a, b)]
    if len(ratios) < 2:
        r = ratios[0] if ratios else float("nan")
        return r, r, r
    q25, mid, q75 = statistics.quantiles(ratios, n=4)
    return q25, mid, q75


def run_profiled(fn: Callable[[], object], setup: Optional[Callable[[], None]] = None, *, reps: int = 1,
                 profile_memory: bool = False) -> profile:
    """``fn()`` ``reps`` times under the CPU profiler (``setup()`` before each call; the first one unprofiled)."""
    setup = setup or (lambda: None)
    setup()
    gc.collect()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=profile_memory)
    with _stderr_fd_muted():  # kineto prints a line to fd 2 at start and stop; fn's own output stays visible
        prof.start()
    try:
        for r in range(reps):
            if r:
                setup()
            out = fn()
            del out
    finally:
        with _stderr_fd_muted():
            prof.stop()
    return prof


def peak_bytes(fn: Callable[[], object], setup: Optional[Callable[[], None]] = None) -> int:
    """Peak bytes of CPU memory live at once during ``fn()`` beyond what was live before (see the docstring)."""
    prof = run_profiled(fn, setup, profile_memory=True)
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == cpu)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _stderr_fd_muted():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_jiffies() -> Optional[tuple[int, int]]:
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return sum(v[:8]) - idle, sum(v[:8])


class LoadElsewhere:
    """Mean cores kept busy by other processes over a ``with`` block: the machine's busy time (/proc/stat) minus
    this process's own CPU time (all its threads), over the wall time; ``cores`` is nan off Linux.

    On a shared 2-core machine this is the noise indicator that matters: with 2 intra-op threads, a parallel
    region waits for a descheduled worker for a whole time slice, so small GEMMs can take 1000x longer."""

    cores = float("nan")

    def __enter__(self):
        self._start = (_cpu_jiffies(), _own_cpu_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        (a, own_a, t_a), b, own_b, t_b = self._start, _cpu_jiffies(), _own_cpu_seconds(), time.perf_counter()
        if a is not None and b is not None and t_b > t_a:
            busy_s = (b[0] - a[0]) / os.sysconf("SC_CLK_TCK")
            self.cores = max(0.0, busy_s - (own_b - own_a)) / (t_b - t_a)
        return False


def _own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def busy_cores_elsewhere(seconds: float = 0.5) -> float:
    """Cores kept busy by other processes while this one sleeps ``seconds`` (see ``LoadElsewhere``)."""
    with LoadElsewhere() as load:
        time.sleep(seconds)
    return load.cores


def wait_until_quiet(max_busy: float, timeout: float) -> float:
    """Sleep (up to ``timeout`` s) until other processes keep fewer than ``max_busy`` cores busy; return that."""
    deadline = time.perf_counter() + timeout
    busy = busy_cores_elsewhere()
    while busy >= max_busy and time.perf_counter() < deadline:
        busy = busy_cores_elsewhere(2.0)
    return busy


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision(path: Path = Path(__file__).resolve().parent.parent) -> str:
    """Short commit of the checkout, ``+dirty`` when ``moe_fuser/`` has uncommitted changes (numbers then
    belong to the working tree, not to the commit)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "moe_fuser"], cwd=path, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + ("+dirty" if dirty else "")


def compile_column(model: Callable, tag: str, **compile_kwargs) -> Callable:
    """``torch.compile`` of ``model`` for one benchmark column, on a wrapper with its own code object.

    Dynamo keeps compiled entries per code object, not per ``torch.compile`` call, and tries the newest first.
    Two columns compiling the same module directly share ``forward``'s entries, so a column can run the other
    backend's code (seen here: the moe_fuser column of the Switch layer ran inductor's, with inductor's peak
    memory). A copy of a one-line wrapper per column keeps each column's entries apart."""
    def run(*args, **kwargs):
        return model(*args, **kwargs)

    own = types.FunctionType(run.__code__.replace(co_name=f"run_{tag}"), run.__globals__, run.__name__,
                             run.__defaults__, run.__closure__)
    return torch.compile(own, **compile_kwargs)


CACHED_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def malloc_mode() -> str:
    """``cached`` when this process runs with ``CACHED_MALLOC_ENV`` (see the module docstring), else ``system``."""
    return "cached" if all(os.environ.get(k) == v for k, v in CACHED_MALLOC_ENV.items()) else "system"


def use_malloc(mode: str) -> None:
    """Make this process run with allocator ``mode`` (``system`` or ``cached``): glibc reads its settings at start,
    so ``cached`` re-executes the script with them when they are not already set."""
    if mode == "cached" and malloc_mode() != "cached":
        if platform.libc_ver()[0] != "glibc":
            raise SystemExit("--malloc cached sets glibc's malloc tunables; this Python does not run on glibc "
                             "(preload jemalloc or tcmalloc instead)")
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **CACHED_MALLOC_ENV})


def environment(**packages: str) -> dict[str, str]:
    """Versions, commit, CPU model, thread count and allocator mode, for the CSV and the table header."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "git": git_revision(),
           "cpu": _cpu_model(), "cpu_count": str(os.cpu_count()), "threads": str(torch.get_num_threads()),
           "malloc": malloc_mode()}
    env.update(packages)
    return env


def results_dir(out: Optional[str]) -> Path:
    path = Path(out) if out else RESULTS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_csv(path: Path, rows: list[dict], env: dict[str, str]) -> None:
    """One row per measurement, the environment repeated in every row so each row stands alone."""
    fields = list(rows[0]) + [k for k in env if k not in rows[0]]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({**env, **row})
