"""Errors a user can act on, and how the CLI prints them.

Every ``LongvidError`` renders as one line that names what is wrong (the dotted recipe key where there is
one) and how to fix it. The CLI prints that line and exits with code 2; the full traceback is shown only
with ``LONGVID_DEBUG=1``. Anything that is not a ``LongvidError`` is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class LongvidError(Exception):
    """Base class: ``str(err)`` is the one-line message shown to the user, after ``label:``."""

    exit_code = 2
    label = "error"


@dataclass
class Problem:
    """One problem in a recipe: the dotted key a user would type, and what to do about it."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class RecipeError(LongvidError):
    """A recipe (YAML, CLI options or overrides) is invalid. Carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem], source: str = ""):
        self.problems = list(problems)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        where = f" in {self.source}" if self.source else ""
        if len(self.problems) == 1:
            return f"{self.source}: {self.problems[0]}" if self.source else str(self.problems[0])
        return f"{len(self.problems)} problems{where}:\n" + "\n".join(f"  {p}" for p in self.problems)


class ModelLoadError(LongvidError):
    """A model could not be found or loaded (missing, not cached while offline, wrong layout)."""


class OutputExistsError(LongvidError):
    """The output file already exists and ``--overwrite`` was not given."""


class OutOfMemoryError(LongvidError):
    """The device ran out of memory; the message suggests the knobs that reduce memory."""


class MethodError(LongvidError):
    """A method cannot run with this model or these settings."""


class Stopped(LongvidError):
    """SIGTERM/SIGUSR1 stopped a run that keeps no checkpoint; everything it had written was removed."""

    exit_code = 143  # 128 + SIGTERM, what a shell reports for a process the signal ended
    label = "stopped"


class CheckpointError(LongvidError):
    """A checkpoint that cannot be used or written (another recipe's, unreadable, tampered, a full disk)."""
