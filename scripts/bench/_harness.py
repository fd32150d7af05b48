"""Shared helpers for the CPU benchmarks in scripts/bench (timing, peak memory, markdown tables).

Method (notes/performance.md): implementations are timed **round-robin in one process** on the same weights and
inputs (so machine noise hits all of them alike) and reported as min / median; peak memory is measured for
each implementation **in a fresh subprocess**: the RSS high-water mark during one call (a 0.5 ms sampler
thread plus ``getrusage``), minus the RSS just before the call. It counts the call's output and temporaries,
not its inputs or weights. Children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed blocks go back to the
OS and the RSS follows the live memory.

A benchmark script uses :func:`run_child` in the parent and, when started with the child flag, builds its
inputs and calls :func:`child_report` (which prints one JSON line) around the call to measure.

Clocks: wall time (``time.perf_counter``) by default; the scripts' ``--cpu-time`` mode uses one torch thread
and :func:`clock` ``(cpu_time=True)`` = ``time.process_time`` (this process's CPU seconds), so a number does not
grow when other processes take the cores (it still grows a little from cache and memory-bandwidth sharing).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

_PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1 << 20


def set_threads(n: int | None = None) -> int:
    """Use ``n`` torch threads (default: all cores of this machine); returns the number used."""
    import torch

    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def clock(cpu_time: bool = False) -> Callable[[], float]:
    """The timer of a benchmark: ``time.process_time`` (CPU seconds of this process) or ``time.perf_counter``."""
    return time.process_time if cpu_time else time.perf_counter


def cpu_time_mode(cpu_time: bool, threads: int | None) -> tuple[int, Callable[[], float]]:
    """Threads and clock of a run: ``--cpu-time`` forces one torch thread (``--threads`` is ignored then) and the
    process-CPU clock; otherwise ``threads`` (default: all cores) and wall time. Returns (threads used, clock)."""
    if cpu_time:
        return set_threads(1), clock(True)
    return set_threads(threads), clock(False)


def write_json(path: str | None, data: Any) -> None:
    """Write ``data`` (numbers, strings, lists, dicts; tuples become lists) to ``path`` (nothing when None)."""
    if not path:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=_plain)
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # a 0-d tensor or numpy scalar
        return value.item()
    return str(value)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def available_bytes() -> int:
    """``MemAvailable`` of the machine (what a new allocation can still get)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_extra_bytes(fn: Callable[[], Any], interval_s: float = 0.0005,
                     timer: Callable[[], float] = time.perf_counter) -> tuple[int, float, Any]:
    """Run ``fn()`` once; return (peak RSS above the RSS before the call, seconds on ``timer``, result).

    Use in a fresh process: the high-water mark is sampled every ``interval_s`` and also read from
    ``getrusage`` (which catches spikes shorter than the sampling interval when they set a new process max).
    """
    base = rss_bytes()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = timer()
    try:
        result = fn()
    finally:
        seconds = timer() - t0
        done.set()
        thread.join()
    peak[0] = max(peak[0], rss_bytes())
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if maxrss_after > maxrss_before:  # the call set a new process maximum
        peak[0] = max(peak[0], maxrss_after)
    return peak[0] - base, seconds, result


def child_report(fn: Callable[[], Any], timer: Callable[[], float] = time.perf_counter, **extra: Any) -> None:
    """In a child process: measure ``fn`` with :func:`peak_extra_bytes` and print one JSON line."""
    extra_b, seconds, _ = peak_extra_bytes(fn, timer=timer)
    print(json.dumps({"peak_mb": extra_b / MB, "seconds": seconds, **extra}), flush=True)


def run_child(argv: Sequence[str], timeout_s: float = 1800) -> dict:
    """Run ``python argv...`` in a fresh process with a fixed mmap threshold; return its last JSON line.

    On failure (an OOM kill included) returns ``{"error": ...}``.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    try:
        proc = subprocess.run(
            [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1])


def round_robin(
    impls: dict[str, Callable[[], Any]], rounds: int = 3, warmup: bool = False, keep_first: bool = True,
    timer: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time ``impls`` alternately, ``rounds`` times each, in this process, on ``timer`` (:func:`clock`).

    Returns ({name: [seconds per round]}, {name: result of its first timed call}) (results only when
    ``keep_first``). ``warmup`` runs every implementation once, untimed, first.
    """
    if warmup:
        for fn in impls.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in impls}
    results: dict[str, Any] = {}
    for r in range(rounds):
        for name, fn in impls.items():
            t0 = timer()
            out = fn()
            times[name].append(timer() - t0)
            if r == 0 and keep_first:
                results[name] = out
            del out
    return times, results


def min_med(ts: Sequence[float]) -> tuple[float, float]:
    return min(ts), statistics.median(ts)


def fmt_s(ts: Sequence[float] | None) -> str:
    """``min / median`` seconds, or a dash."""
    if not ts:
        return "–"
    lo, med = min_med(ts)
    return f"{lo:.2f} / {med:.2f}"


def fmt_ratio(a: float | None, b: float | None, digits: int = 1) -> str:
    if a is None or b is None or b <= 0:
        return "–"
    return f"{a / b:.{digits}f}×"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])
