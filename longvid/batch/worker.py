"""One batch worker: its shard of the items, each exactly once across any number of workers, resumable.

For every item of its shard (grouped so each model loads once), a worker:

1. skips it when its video and sidecar exist and the sidecar's recipe hash is the item's (``force`` redoes it; a
   corrupt or foreign sidecar makes it redo);
2. *claims* it: an exclusive POSIX record lock (``lockf``) on ``.<name>.claim`` beside the output. The kernel (or
   the NFS lock manager) drops the lock when its holder dies, even by ``kill -9``, so a dead worker's item is free
   again without any stale-lock guessing; a live holder makes the others pass over the item. After claiming, the
   worker checks again that the item is not done (another worker may have finished it meanwhile);
3. runs it through the engine (``runner.generate`` with the shared model): the video and its sidecar are
   published atomically; with ``runtime.checkpoint=on_signal`` a SIGTERM/SIGUSR1 checkpoints the item and the
   worker exits 75 (SLURM requeues it, the rerun resumes the item mid-denoising; a stop while the model loads or
   between items exits 75 too, with nothing to resume); a failure is written to
   ``.<name>.failed.json`` and the batch goes on (``fail_fast`` stops it).

Each worker writes ``batch-results.<i>-of-<n>.jsonl`` (one line per item it saw) and the first one
``batch.json`` (the plan: manifest, item count, output names) for ``longvid status``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from longvid.batch.manifest import Item
from longvid.errors import Stopped
from longvid.interrupts import StopRequests
from longvid.io.checkpoint import Checkpointed, checkpoint_dir, recipe_hash
from longvid.io.paths import write_text_atomically
from longvid.io.sidecar import sidecar_path

PLAN = "batch.json"
RESULTS = "manifest-results.jsonl"


@dataclass
class ItemResult:
    index: int
    line: int
    status: str  # done | skipped | busy | failed
    output: str
    seconds: float = 0.0  # the item's generation (done / failed), model load excluded
    error: str | None = None
    finished: float = 0.0  # unix time the result was recorded
    load_s: float = 0.0  # the model load this item waited for (the first item of each load key), else 0
    peak_memory_bytes: int | None = None  # the item's own peak (CUDA allocator, or resident set on CPU)


_CLAIM_TRIES = 4  # a worker holds a claim for minutes; `longvid status` probes it for microseconds


def claim_path(output: Path) -> Path:
    return output.with_name(f".{output.stem}.claim")


def failed_path(output: Path) -> Path:
    return output.with_name(f".{output.stem}.failed.json")


def is_done(output: Path, recipe) -> bool:
    """The video and its sidecar exist and the sidecar was written for this very recipe."""
    from longvid.recipe.resolve import to_dict

    sidecar = sidecar_path(output)
    if not (output.is_file() and sidecar.is_file()):
        return False
    try:
        written = json.loads(sidecar.read_text(encoding="utf-8"))["recipe"]
        return recipe_hash(written) == recipe_hash(to_dict(recipe))
    except (OSError, ValueError, KeyError, TypeError):
        return False  # unreadable or foreign: redo it


class Claim:
    """An exclusive lock on one item, held until :meth:`release` or the process ends."""

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def take(cls, output: Path) -> "Claim | None":
        """Lock ``output``'s claim file, or None when a live worker holds it."""
        fd = os.open(claim_path(output), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        for attempt in range(_CLAIM_TRIES):
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:  # EAGAIN / EACCES: held by another process (a worker, or `status` probing an instant)
                if attempt == _CLAIM_TRIES - 1:
                    os.close(fd)
                    return None
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode())
        return cls(fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the lock
            self.fd = -1


def held(output: Path) -> bool:
    """Whether a live worker holds ``output``'s claim (a probe lock, released at once)."""
    path = claim_path(output)
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # (our probe lock, if taken, goes with it)
    return False


def run(items: list[Item], shard: tuple[int, int], out_dir: Path, manifest: Path, *, force: bool = False,
        fail_fast: bool = False, progress: Callable | None = None,
        on_item: Callable[[ItemResult], None] | None = None, stop: StopRequests | None = None) -> list[ItemResult]:
    """Run this worker's shard of ``items``; returns one :class:`ItemResult` per item of the shard. ``stop``: the
    caller's active stop handler (the CLI installs one before it resolves the manifest), else one is installed."""
    from longvid import runner
    from longvid.batch.shards import shard_items
    from longvid.models.base import load_key

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_plan(out_dir, manifest, items)
    mine = [items[i] for i in shard_items(len(items), shard)]
    groups: dict[str, list[Item]] = {}
    for item in mine:  # one model load per load key, in manifest order
        groups.setdefault(json.dumps(load_key(item.recipe), sort_keys=True), []).append(item)
    results: list[ItemResult] = []
    log = out_dir / f"batch-results.{shard[0]}-of-{shard[1]}.jsonl"

    def record(result: ItemResult) -> None:
        result.finished = round(time.time(), 3)
        results.append(result)
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(result)) + "\n")
        if on_item is not None:
            on_item(result)

    # One stop handler for the worker's whole life: a SIGTERM/SIGUSR1 while a model loads or between items stops
    # before the next item (nothing lost: exit 75, requeue me); during an item the run checkpoints it (see runner).
    with nullcontext(stop) if stop is not None else StopRequests() as stop:
        try:
            _run_groups(list(groups.values()), runner, stop, force, fail_fast, progress, record)
        finally:
            merge_results(out_dir)  # also when stopped: the merged view is never older than this worker's log
    return results


def _between(stop: StopRequests) -> Checkpointed:
    return Checkpointed(f"{stop.requested}: stopped between items, nothing in progress was lost; rerun the same "
                        "command to go on")


def _run_groups(groups: list[list[Item]], runner, stop: StopRequests, force: bool, fail_fast: bool,
                progress: Callable | None, record: Callable[[ItemResult], None]) -> None:
    from longvid.recipe.resolve import to_dict

    for group in groups:
        adapter = None
        try:
            for item in group:
                if stop.requested is not None:
                    raise _between(stop)
                output = runner.planned_output(item.recipe)
                if not force and is_done(output, item.recipe):
                    record(ItemResult(item.index, item.line, "skipped", str(output)))
                    continue
                claim = Claim.take(output)
                if claim is None:
                    record(ItemResult(item.index, item.line, "busy", str(output)))
                    continue
                try:
                    if not force and is_done(output, item.recipe):  # finished by another worker meanwhile
                        record(ItemResult(item.index, item.line, "skipped", str(output)))
                        continue
                    load_s = 0.0
                    if adapter is None:
                        tick = time.perf_counter()
                        try:
                            with stop.immediately():  # loading writes nothing: a stop need not wait for it
                                adapter = runner.load_adapter(item.recipe)
                        except BaseException:
                            # the stop may surface rewrapped (diffusers turns any error while it reads weights
                            # into an OSError, longvid into a ModelLoadError): a requested stop wins
                            if stop.requested is not None:
                                raise _between(stop) from None
                            raise
                        load_s = round(time.perf_counter() - tick, 3)
                    recipe = item.recipe
                    if force:
                        recipe.output.overwrite = True
                    tick = time.perf_counter()
                    try:
                        made = runner.generate(recipe, adapter=adapter, progress=progress, stop=stop)
                    except (Checkpointed, Stopped):
                        raise  # a stop request: the item is checkpointed (or dropped); the worker exits
                    except Exception as err:  # noqa: BLE001 - an item's failure is recorded, the batch goes on
                        message = " ".join(str(err).split())[:500] or type(err).__name__
                        _write_failure(output, item, message, to_dict(item.recipe))
                        record(ItemResult(item.index, item.line, "failed", str(output),
                                          round(time.perf_counter() - tick, 3), message, load_s=load_s))
                        if fail_fast:
                            return
                        continue
                    failed_path(output).unlink(missing_ok=True)
                    record(ItemResult(item.index, item.line, "done", str(output), round(time.perf_counter() - tick, 3),
                                      load_s=load_s, peak_memory_bytes=_peak_bytes(made.sidecar)))
                finally:
                    claim.release()
        finally:
            if adapter is not None:
                adapter.close()


def _write_failure(output: Path, item: Item, message: str, recipe: dict) -> None:
    data = {"index": item.index, "line": item.line, "error": message, "recipe_hash": recipe_hash(recipe),
            "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}
    write_text_atomically(failed_path(output), json.dumps(data))


def _write_plan(out_dir: Path, manifest: Path, items: list[Item]) -> None:
    """``batch.json``: what the batch is, for ``longvid status`` (rewritten atomically by every worker: identical)."""
    from longvid import runner

    plan = {"manifest": str(manifest), "items": len(items),
            "outputs": [runner.planned_output(i.recipe).name for i in items]}
    write_text_atomically(out_dir / PLAN, json.dumps(plan))


def _peak_bytes(sidecar: dict) -> int | None:
    peak = sidecar.get("peak_memory", {})
    return peak.get("cuda_max_allocated_bytes", peak.get("peak_rss_bytes"))


def _logged(out_dir: Path) -> list[dict]:
    """Every record of every worker's log (a line cut short by a killed worker is passed over)."""
    records = []
    for log in sorted(out_dir.glob("batch-results.*-of-*.jsonl")):
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


_RANK = {"done": 3, "failed": 2, "skipped": 1, "busy": 0}


def merge_results(out_dir: Path) -> None:
    """``manifest-results.jsonl``: one line per manifest item, in manifest order, from every worker's log: the
    latest ``done`` (its time and peak memory), else the latest ``failed``, else ``left``. Rewritten atomically by
    every worker when it ends, so the last to end leaves the whole batch's view."""
    plan_file = out_dir / PLAN
    if not plan_file.is_file():
        return
    outputs = json.loads(plan_file.read_text(encoding="utf-8"))["outputs"]
    best: dict[int, dict] = {}
    for rec in _logged(out_dir):
        index = rec.get("index", -1)
        if rec.get("status") not in ("done", "failed") or not isinstance(index, int) or not 0 <= index < len(outputs) \
                or Path(str(rec.get("output", ""))).name != outputs[index]:  # another manifest's item of that index
            continue
        old = best.get(rec["index"])
        if old is None or (_RANK[rec["status"]], rec.get("finished", 0)) > (_RANK[old["status"]], old.get("finished", 0)):
            best[index] = rec
    lines = [json.dumps(best.get(i, {"index": i, "status": "left", "output": str(out_dir / name)}))
             for i, name in enumerate(outputs)]
    write_text_atomically(out_dir / RESULTS, "".join(f"{line}\n" for line in lines))


def status(out_dir: Path) -> dict:
    """Counts of a batch folder: done / running / failed / left (and the resumable ones among running and left),
    with the throughput of its workers so far (items per hour, from their logs) and the time left at that rate."""
    plan_file = out_dir / PLAN
    if not plan_file.is_file():
        raise FileNotFoundError(f"{out_dir} holds no {PLAN}: not a batch output folder")
    plan = json.loads(plan_file.read_text(encoding="utf-8"))
    counts = {"items": plan["items"], "done": 0, "running": 0, "failed": 0, "left": 0, "checkpointed": 0}
    for name in plan["outputs"]:
        output = out_dir / name
        if output.is_file() and sidecar_path(output).is_file():
            counts["done"] += 1
        elif held(output):
            counts["running"] += 1
        elif failed_path(output).is_file():
            counts["failed"] += 1
        else:
            counts["left"] += 1
        if checkpoint_dir(output).is_dir():
            counts["checkpointed"] += 1
    rate = _items_per_hour(_logged(out_dir))
    counts["items_per_hour"] = round(rate, 2) if rate else None
    # time left: only while workers are at it (nothing running: nobody is making progress)
    todo = counts["running"] + counts["left"]
    counts["eta_s"] = round(todo / rate * 3600) if rate and counts["running"] else (0 if not todo else None)
    return counts


def _items_per_hour(records: list[dict]) -> float | None:
    """Items finished per hour over the span from the first started to the last finished item (all workers)."""
    done = [r for r in records if r.get("status") == "done" and r.get("finished")]
    if not done:
        return None
    span = max(r["finished"] for r in done) - min(r["finished"] - r.get("seconds", 0) - r.get("load_s", 0)
                                                   for r in done)
    return len(done) * 3600 / span if span > 0 else None
