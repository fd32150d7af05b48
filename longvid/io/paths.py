"""Output names from templates, made safe, and the atomic-publish helpers every writer shares.

Names are built from user text (prompts, recipe names), so every field is sanitised on its own and the
joined name once more: whatever a prompt contains (``../../etc/passwd``, ``/abs``, ``a/b\\c``, control or
bidi characters, emoji), the result is one plain file name that stays inside the output folder.

Writers never create the final name directly. They write to a hidden temporary name in the same folder
(same filesystem, so ``os.replace`` is atomic) and publish it only when the content is complete, so a
crash, a preemption or Ctrl-C never leaves a truncated file that a later "skip existing" run would trust.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
import string
import unicodedata
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from longvid.errors import LongvidError, OutputExistsError


class OutputError(LongvidError):
    """The output cannot be written where asked (not a folder, no permission, no room, an I/O failure)."""

#: Fields a recipe's ``output.name`` template may use. Callers may pass extra ones to ``render_name``.
TEMPLATE_FIELDS = ("recipe", "prompt", "seed", "frames", "width", "height", "date", "time", "index")

#: Fallback when sanitising leaves nothing (empty prompt, only emoji, only dots).
FALLBACK_NAME = "video"

#: Cap on a whole rendered name in UTF-8 bytes: file systems allow 255, and the temporary name adds a
#: dot, the pid, ``.partial`` and the extension twice.
MAX_NAME_BYTES = 180

_KEEP = frozenset("-_.")
_DASH_RUNS = re.compile(r"-{2,}")
_DOT_RUNS = re.compile(r"\.{2,}")


def slug(text: object, max_len: int = 60) -> str:
    """One safe file-name component from any text.

    Keeps letters and digits (any script, NFKC-normalised so look-alikes such as full-width slashes or
    ``²`` become their plain forms first) and ``-_.``; everything else, including whitespace, path
    separators, control and bidi characters and emoji, becomes ``-``. Runs of dashes or dots collapse to
    one, leading and trailing dots/dashes are stripped (no hidden files, no ``..``, nothing that looks
    like a command-line option) and an empty result falls back to ``video``.
    """
    norm = unicodedata.normalize("NFKC", str(text))
    mapped = "".join(ch if ch.isalnum() or ch in _KEEP else "-" for ch in norm)
    collapsed = _DOT_RUNS.sub(".", _DASH_RUNS.sub("-", mapped))
    cut = _truncate_bytes(collapsed.strip("-."), max_len, MAX_NAME_BYTES)
    return cut.strip("-.") or FALLBACK_NAME


def _truncate_bytes(text: str, max_chars: int, max_bytes: int) -> str:
    """Cut to ``max_chars`` characters and ``max_bytes`` UTF-8 bytes without splitting a character."""
    text = text[:max_chars]
    while len(text.encode("utf-8")) > max_bytes:
        text = text[:-1]
    return text


def template_fields(template: str) -> list[str]:
    """The field names a ``str.format``-style template uses, in order; ``ValueError`` if malformed."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"invalid name template {template!r}: {err}") from None
    return [field for _, field, _, _ in parsed if field is not None]


def check_template(template: str, known: tuple[str, ...] | list[str] = TEMPLATE_FIELDS) -> None:
    """Raise ``ValueError`` naming the first unknown field (and the known ones); for recipe validation."""
    for field in template_fields(template):
        if field not in known:
            what = f"{{{field}}}" if field else "an empty field {}"
            raise ValueError(
                f"unknown field {what} in name template {template!r}; "
                f"known fields: {', '.join('{' + k + '}' for k in known)}"
            )


#: The widest a single field may be formatted (``{seed:08d}`` is fine, ``{seed:099999d}`` is not).
MAX_FIELD_WIDTH = 32
#: Fields that only some commands fill in (a batch run numbers its items).
BATCH_FIELDS = ("index",)
_SAMPLE = {"recipe": "recipe", "prompt": "prompt", "seed": 0, "frames": 81, "width": 832, "height": 480,
           "date": "2026-01-01", "time": "000000", "index": 0}
_LARGE = {**_SAMPLE, "seed": 2**64 - 1, "frames": 2049, "width": 4096, "height": 4096, "index": 10**9}
_WIDTH = re.compile(r"^(?:.?[<>=^])?[+\- ]?z?#?0?(\d*)")


def template_problems(template: str, allowed: tuple[str, ...] = TEMPLATE_FIELDS) -> list[str]:
    """Everything wrong with a name template, checked before any work: syntax, unknown fields, fields with no
    value in this command, format specs that cannot format their field, widths beyond :data:`MAX_FIELD_WIDTH`."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        return [f"invalid name template {template!r}: {err}; literal braces are written {{{{ and }}}}"]
    problems = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in _SAMPLE:
            what = f"{{{field}}}" if field else "{} (a field needs a name)"
            problems.append(f"unknown field {what}; known fields: "
                            f"{', '.join('{' + k + '}' for k in TEMPLATE_FIELDS if k in allowed)}")
            continue
        if field not in allowed:
            problems.append(f"{{{field}}} numbers the items of a batch run; a single generation has none")
            continue
        match = _WIDTH.match(spec or "")
        width = match.group(1) if match else ""
        if width and int(width) > MAX_FIELD_WIDTH:
            problems.append(f"{{{field}:{spec}}} is {width} characters wide; at most {MAX_FIELD_WIDTH}")
            continue
        for sample in (_SAMPLE, _LARGE):  # a spec that works for seed 0 may fail for seed 2**64-1 ({seed:c})
            try:
                _format_field(field, sample, spec, conversion)
            except ValueError as err:
                problems.append(str(err))
                break
    return problems


def render_name(template: str, **fields: object) -> str:
    """Fill a template such as ``"{recipe}_{prompt}_{seed}"`` and return a safe file name (no extension).

    ``date`` and ``time`` default to now. Format specs work (``{index:04d}``). Every field value is passed
    through ``slug(..., max_len=60)``, the longest values are shortened if the name would exceed
    ``MAX_NAME_BYTES``, and the whole name goes through ``slug`` again, so the result never
    contains a path separator whatever the template's literal text or the values are. Attribute or index
    access (``{prompt.__class__}``) is rejected as an unknown field.
    """
    values = {**_now_fields(), **fields}
    check_template(template, known=tuple(dict.fromkeys((*TEMPLATE_FIELDS, *fields))))
    parsed = list(string.Formatter().parse(template))
    literals = [literal for literal, _, _, _ in parsed]
    rendered = [
        slug(_format_field(field, values, spec, conv), max_len=60) if field is not None else ""
        for _, field, spec, conv in parsed
    ]
    _fit_bytes(literals, rendered, MAX_NAME_BYTES)
    return slug("".join(lit + val for lit, val in zip(literals, rendered)), max_len=MAX_NAME_BYTES)


def _fit_bytes(literals: list[str], rendered: list[str], limit: int) -> None:
    """Shorten the longest field values (in place) until the name fits ``limit`` UTF-8 bytes.

    Trimming the longest field (usually the prompt) rather than the end of the name keeps short,
    distinguishing fields such as ``{seed}`` or ``{index}`` that often come last.
    """
    def size() -> int:
        return sum(len(t.encode("utf-8")) for t in (*literals, *rendered))

    while size() > limit:
        trimmable = [k for k, v in enumerate(rendered) if len(v) > 1]
        if not trimmable:
            return  # only the literal text is too long; the final slug() cuts it
        i = max(trimmable, key=lambda k: len(rendered[k].encode("utf-8")))
        rendered[i] = rendered[i][:-1].rstrip("-.") or rendered[i][:1]  # strictly shorter: always ends


def _now_fields() -> dict[str, str]:
    now = datetime.now()
    return {"date": now.strftime("%Y-%m-%d"), "time": now.strftime("%H%M%S")}


def _format_field(field: str, values: dict[str, object], spec: str | None, conversion: str | None) -> str:
    if field not in values:
        raise ValueError(f"name template field {{{field}}} has no value here; pass {field}=...")
    value = values[field]
    if conversion == "r":
        value = repr(value)
    elif conversion in ("s", "a"):
        value = str(value) if conversion == "s" else ascii(value)
    try:
        return format(value, spec or "")
    except (ValueError, TypeError, OverflowError) as err:
        raise ValueError(f"name template field {{{field}:{spec}}} cannot format {value!r}: {err}") from None


def output_path(out_dir: str | os.PathLike, template: str, ext: str = ".mp4", **fields: object) -> Path:
    """Path of a rendered name inside ``out_dir`` (the folder resolved, the name not: whatever sits at the name,
    a planted symlink included, is never followed — publishing replaces it or refuses). Nothing is created:
    the folder appears only when the first file is written, so a run that fails before that leaves no empty
    folder behind. The containment check is a second line of defence behind ``slug``.
    """
    if not re.fullmatch(r"\.[A-Za-z0-9]{1,8}", ext):
        raise ValueError(f"extension must look like '.mp4', got {ext!r}")
    root = Path(out_dir).expanduser().resolve()
    path = root / (render_name(template, **fields) + ext)
    if path.parent != root or path.name in (".", ".."):
        raise OutputError(f"output.name: {path.name!r} would leave the output folder {root}")
    return path


def check_output_folder(folder: str | os.PathLike, key: str = "output.dir", need_bytes: int = 0) -> None:
    """Refuse, before any work, an output folder that cannot be created or written, or lacks the room for
    ``need_bytes`` (a first estimate of the outputs). Creates nothing."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():  # the nearest existing ancestor decides whether the folder can be made
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe == folder and not folder.is_dir():
        raise OutputError(f"{key}: '{folder}' is a file, not a folder; choose another --out")
    if not probe.is_dir():
        raise OutputError(f"{key}: cannot create '{folder}': '{probe}' is not a folder; choose another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        verb = "write to" if probe == folder else "create a folder in"
        raise OutputError(f"{key}: no permission to {verb} '{probe}'; choose another --out")
    free = shutil.disk_usage(probe).free
    if need_bytes and free < need_bytes:
        raise OutputError(f"{key}: '{probe}' has {free / 2**20:.0f} MiB free but this run needs about "
                          f"{need_bytes / 2**20:.0f} MiB (video and checkpoints); free some space or choose "
                          "another --out")


#: ``.<final name>.<host>-<pid>-<random>.partial<suffix>``: whose temporary file it is, and unguessable.
_PARTIAL = re.compile(r"^\.(?P<final>.+)\.(?P<host>[0-9a-f]{12})-(?P<pid>\d+)-[0-9a-f]{16}\.partial"
                      r"(?:\.[A-Za-z0-9]{1,8})?$")


@lru_cache(maxsize=1)
def _host() -> str:
    """This machine and pid namespace, as 12 hex digits: the full host name, the boot id and the pid namespace
    (containers sharing a host name have their own pids), so a pid is only ever judged where it means something."""
    parts = [socket.gethostname()]
    for source in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(Path(source).read_text().strip() if "boot" in source else str(os.stat(source).st_ino))
        except OSError:
            parts.append("-")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def partial_path(final: str | os.PathLike) -> Path:
    """A fresh, hidden, unpredictable temporary name next to ``final`` that keeps its suffix (ffmpeg picks the
    container by it): ``out/cat.mp4`` -> ``out/.cat.mp4.<host>-<pid>-<16 hex>.partial.mp4``. The host and pid
    let a later run prove the writer dead (:func:`sweep_stale`); the random part keeps a planted symlink out."""
    final = Path(final)
    return final.with_name(f".{final.name}.{_host()}-{os.getpid()}-{secrets.token_hex(8)}.partial{final.suffix}")


def create_exclusive(path: str | os.PathLike) -> int:
    """Create ``path`` for writing, failing if anything (a file, a symlink) is there; returns the descriptor."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags, 0o644)


def sweep_stale(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files in ``folder`` whose writer is provably dead: written on this host by a pid that
    no longer runs (``kill -9`` leaves them; a live writer's, or another host's, are never touched)."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _PARTIAL.match(entry.name)
        if match is None or match["host"] != _host() or _alive(int(match["pid"])):
            continue
        if entry.is_symlink() or entry.is_file():
            remove_quietly(entry)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, another user's
        return True
    return True


def exists_error(path: str | os.PathLike) -> OutputExistsError:
    """The one-line error for an output that is already there."""
    return OutputExistsError(f"{path} already exists; pass --overwrite (overwrite=True in Python) to replace it")


def check_writable(path: str | os.PathLike, overwrite: bool) -> None:
    """Fail early (before any work) if ``path`` is a folder, or exists and ``overwrite`` is off."""
    if os.path.isdir(path) and not os.path.islink(path):
        raise OutputError(f"output.name: '{path}' is a folder; choose another --name or --out")
    if not overwrite and os.path.lexists(path):
        raise exists_error(path)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a finished file to disk so the rename below never publishes an empty file after a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike, final: str | os.PathLike, *, overwrite: bool) -> None:
    """Atomically move a complete temporary file onto its final name.

    With ``overwrite`` this is ``os.replace``. Without it, ``os.link`` + unlink gives "create only if
    absent" atomically, so a file that appeared after the early check (another worker) is never
    clobbered; file systems without hard links fall back to check-then-replace. Neither follows a symlink
    at ``final``: ``link`` fails on it and ``replace`` replaces the link itself. The temporary file is
    removed in every case.
    """
    try:
        if overwrite:
            os.replace(tmp, final)
            return
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise exists_error(final) from None
        except OSError:
            check_writable(final, overwrite=False)
            os.replace(tmp, final)
    finally:
        remove_quietly(tmp)


def remove_quietly(path: str | os.PathLike) -> None:
    """Delete a file if it is there; cleanup must never mask the error that triggered it."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass


def replace_atomically(final: str | os.PathLike, write) -> None:
    """Replace ``final`` with a file that ``write(tmp_path)`` fills: the temporary is created exclusively under an
    unpredictable name (a planted symlink is never followed, two writers never share it) and renamed over
    ``final`` only when complete; on any failure it is removed and ``final`` is untouched."""
    tmp = partial_path(final)
    os.close(create_exclusive(tmp))
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        remove_quietly(tmp)


def write_text_atomically(final: str | os.PathLike, text: str) -> None:
    """:func:`replace_atomically` for a text (UTF-8)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:  # the exclusive temporary is ours: a regular file
            f.write(text)

    replace_atomically(final, write)
