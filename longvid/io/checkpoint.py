"""Checkpoints of an interrupted generation: safetensors + JSON beside the output, atomic, recipe-keyed.

A checkpoint lives in ``<output dir>/.<video name>.ckpt/``:

- ``state-<stage>-<step>-<random>.safetensors``: the tensors (latents, the scheduler's multistep history,
  the noise generator's state, method state), never pickle;
- ``state.json``: the plain data (stage, step, scheduler scalars, the recipe hash) and the name of the
  tensors file it belongs to.

Writes are atomic: the tensors file is written under a temporary name, flushed and renamed, then
``state.json`` is replaced the same way, and only then are older tensors files removed, so a crash at any
moment leaves either the previous checkpoint or the new one, whole. A checkpoint belongs to one resolved
recipe (:func:`recipe_hash`: everything that changes the result, i.e. not where the output goes); one of
another recipe is refused with a line saying how to discard it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from longvid.errors import CheckpointError, LongvidError
from longvid.io.paths import create_exclusive, fsync_file, partial_path, remove_quietly, sweep_stale

FORMAT = 1
#: Exit status of a run stopped by SIGTERM/SIGUSR1 after writing its checkpoint (EX_TEMPFAIL: rerun it).
EXIT_CHECKPOINTED = 75
#: Recipe keys that do not change the result, so a checkpoint made under other values still applies.
_IGNORED = {"output": None, "runtime": ("checkpoint", "checkpoint_every")}


class Checkpointed(LongvidError):
    """The run was stopped by a signal after writing a checkpoint; rerunning the command resumes it."""

    exit_code = EXIT_CHECKPOINTED
    label = "stopped"


@dataclass
class Checkpoint:
    data: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def recipe_hash(recipe_dict: dict[str, Any]) -> str:
    """sha256 of the resolved recipe's canonical JSON, without the keys that only place or encode the output and
    the checkpoint settings. Stages and methods keep their order (it changes the result); the rest is sorted."""
    content = {k: v for k, v in recipe_dict.items() if k != "output"}
    content["runtime"] = {k: v for k, v in recipe_dict.get("runtime", {}).items() if k not in _IGNORED["runtime"]}
    for ordered in ("stages", "methods"):
        content[ordered] = [[name, value] for name, value in (content.get(ordered) or {}).items()]
    if isinstance(content.get("prompt"), dict):
        content["prompt"] = sorted([int(k), v] for k, v in content["prompt"].items())
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def checkpoint_dir(video_path: str | os.PathLike) -> Path:
    """``out/cat.mp4`` -> ``out/.cat.ckpt``."""
    video_path = Path(video_path)
    return video_path.with_name(f".{video_path.stem}.ckpt")


class CheckpointStore:
    """The checkpoint folder of one output, for the recipe with hash ``key``."""

    def __init__(self, folder: str | os.PathLike, key: str):
        self.folder = Path(folder)
        self.key = key

    @property
    def state_file(self) -> Path:
        return self.folder / "state.json"

    def exists(self) -> bool:
        return self.state_file.is_file()

    def load(self) -> Checkpoint | None:
        """The checkpoint of this recipe, None when there is none; ``CheckpointError`` for another recipe's
        or an unreadable one (never silently ignored: it would be lost work or a wrong result)."""
        fix = "pass --restart to discard it (restart=True in Python)"
        self._check_folder(fix)
        sweep_stale(self.folder)  # temporaries of a writer killed mid-save
        if not self.exists():
            return None
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("longvid_checkpoint") != FORMAT:
                raise ValueError("not a longvid checkpoint of this version")
            if data.get("recipe_hash") != self.key:
                raise CheckpointError(f"{self.folder}/ holds a checkpoint of a different recipe (recipe "
                                      f"'{data.get('recipe_name', '?')}'); rerun the command that made it, or {fix}")
            name = data["tensors_file"]
            if Path(name).name != name:
                raise ValueError("tensors_file must be a plain file name")
            tensors = load_file(self.folder / name)
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{self.folder}/ holds an unreadable checkpoint ({err}); {fix}") from err
        return Checkpoint(data, tensors)

    def _check_folder(self, fix: str) -> None:
        """The folder must be a real folder of this user: a symlink planted in a shared output folder would make
        longvid write (and, with --restart, delete) elsewhere, and someone else's checkpoint is not trusted."""
        try:
            info = os.lstat(self.folder)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            what = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a folder"
            raise CheckpointError(f"{self.folder} is {what}; remove it (longvid keeps checkpoints in a folder "
                                  "of its own there)")
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise CheckpointError(f"{self.folder}/ belongs to another user; remove it or choose another --out")

    def save(self, data: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Write a checkpoint atomically (see the module docstring); ``data`` must be JSON-serialisable.
        An I/O failure (a full disk) is a ``CheckpointError``: the previous checkpoint, if any, stays whole."""
        try:
            self._save(data, tensors)
        except OSError as err:
            raise CheckpointError(f"cannot write a checkpoint to {self.folder}/ ({err.strerror or err}); free "
                                  "some space or set runtime.checkpoint=off") from err

    def _save(self, data: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self._check_folder("")
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = f"state-{data.get('stage_index', 0)}-{data.get('step', 0):06d}-{uuid.uuid4().hex[:8]}.safetensors"
        payload = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}  # no shared storage
        text = json.dumps({"longvid_checkpoint": FORMAT, "recipe_hash": self.key, **data, "tensors_file": name},
                          indent=1)
        tmp, state_tmp = partial_path(self.folder / name), partial_path(self.state_file)
        try:
            _write_new(tmp, save(payload))
            os.replace(tmp, self.folder / name)
            _write_new(state_tmp, text.encode("utf-8"))
            os.replace(state_tmp, self.state_file)
        finally:
            remove_quietly(tmp)
            remove_quietly(state_tmp)
        for old in self.folder.glob("state-*.safetensors"):
            if old.name != name:
                remove_quietly(old)

    def discard(self) -> None:
        """Remove the checkpoint folder (a finished run, or ``--restart``); never follows a symlink there."""
        if self.folder.is_symlink() or (self.folder.exists() and not self.folder.is_dir()):
            self._check_folder("")  # refuses with the reason
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_new(path: Path, data: bytes) -> None:
    """Write ``data`` to a file created exclusively (no symlink followed) and flush it to disk."""
    with os.fdopen(create_exclusive(path), "wb") as f:
        f.write(data)
    fsync_file(path)
