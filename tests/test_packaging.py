"""Packaging: every package directory is listed, and a built wheel carries the built-in recipes."""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_dirs() -> set[str]:
    """Dotted names of every folder under longvid/ that holds Python code."""
    found = set()
    for module in (ROOT / "longvid").rglob("*.py"):
        rel = module.parent.relative_to(ROOT)
        if "__pycache__" not in rel.parts:
            found.add(".".join(rel.parts))
    return found


def test_packages_list_covers_every_package_directory():
    config = _setuptools_config()
    packages = set(config["packages"])
    assert "longvid" in _package_dirs() and "longvid.recipe" in _package_dirs()
    missing = sorted(_package_dirs() - packages)
    assert missing == [], f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    for name in packages:  # and every listed package exists where setuptools will look for it
        folder = ROOT / config.get("package-dir", {}).get(name, name.replace(".", "/"))
        assert folder.is_dir(), name
        if name != "longvid.configs":
            assert (folder / "__init__.py").is_file(), f"{name} has no __init__.py"
    assert config["package-dir"]["longvid.configs"] == "configs"


def test_wheel_contains_the_builtin_recipes(tmp_path):
    """Built from a copy so no build/ or egg-info lands in the working tree."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build", "dist", "outputs",
                                    ".pytest_cache", "tests")
    shutil.copytree(ROOT, src, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "-w", str(tmp_path / "dist"), str(src)]
    proc = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list((tmp_path / "dist").glob("longvid-*.whl"))
    assert len(wheels) == 1
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    assert "longvid/configs/demo.yaml" in names
    recipes = {f"longvid/configs/{p.relative_to(ROOT / 'configs').as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert sorted(recipes - names) == []
    modules = {f"{p.relative_to(ROOT).as_posix()}" for p in (ROOT / "longvid").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert sorted(modules - names) == []
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "longvid = longvid.cli:app" in zipfile.ZipFile(wheels[0]).read(entry).decode()
