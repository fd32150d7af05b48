"""Every shipped recipe (configs/, recursively) resolves and documents how to run it."""

import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from longvid.cli import app
from longvid.recipe.recipes import builtin_recipes, find_recipe, recipe_header
from longvid.recipe.resolve import resolve

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*") if p.suffix in (".yaml", ".yml"))
IDS = [str(p.relative_to(ROOT / "configs")) for p in CONFIGS]


def _header(path: Path) -> list[str]:
    """The comment lines a recipe file opens with, without the leading '#'."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def _commands(path: Path) -> list[list[str]]:
    """The arguments of every ``longvid generate ...`` line in the header (``\\`` continuations joined)."""
    joined, pending = [], ""
    for line in _header(path):
        if pending:
            line = pending + " " + line
        if line.endswith("\\"):
            pending = line[:-1].strip()
            continue
        pending = ""
        joined.append(line)
    return [shlex.split(line[line.index("longvid generate"):])[2:] for line in joined if "longvid generate" in line]


def test_configs_folder_is_found():
    assert (ROOT / "configs" / "demo.yaml") in CONFIGS
    assert set(builtin_recipes().values()) >= {p for p in CONFIGS if p.suffix == ".yaml"}


def test_recipe_names_are_unique():
    """``--recipe <name>`` must not depend on which of two same-named files the search meets first."""
    stems = [p.stem for p in CONFIGS]
    assert sorted(s for s in set(stems) if stems.count(s) > 1) == []


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_resolves(path):
    recipe = resolve(path)
    assert recipe.name
    assert recipe.model.family and recipe.model.path
    assert recipe.video.num_frames >= 1 and recipe.video.height >= 8 and recipe.video.width >= 8
    assert recipe.sampler.steps >= 1


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_header_shows_a_generate_command_for_itself(path):
    header = _header(path)
    assert header, f"{path.name} must open with a comment header"
    assert recipe_header(path), f"{path.name}: the first comment line is its description in `longvid recipes`"
    commands = _commands(path)
    assert commands, f"{path.name}: the header must contain a `longvid generate` command line"
    for argv in commands:
        assert "--recipe" in argv or "-r" in argv, argv
        ref = argv[argv.index("--recipe" if "--recipe" in argv else "-r") + 1]
        assert find_recipe(ref).resolve() == path.resolve(), f"{path.name}: header runs recipe {ref!r}"


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_header_commands_are_valid(path, tmp_path, monkeypatch):
    """The documented command lines themselves resolve (``--dry-run``: nothing is loaded or written)."""
    monkeypatch.chdir(ROOT)
    runner = CliRunner()
    for argv in _commands(path):
        result = runner.invoke(app, ["generate", *argv, "--dry-run", "--out", str(tmp_path)])
        assert result.exit_code == 0, f"{shlex.join(argv)}: {result.stderr}"
        assert "# latent shape (1, " in result.stdout
