"""docs/recipes.md documents every recipe key of the schema (and no key that does not exist)."""

import dataclasses
import re
import typing
from pathlib import Path

from longvid.recipe.schema import Recipe, StageConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"


def _keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_schema_key_is_documented_and_no_other():
    text = DOC.read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_.<>]+)` \|", text, flags=re.M))
    schema = set(_keys(Recipe)) | set(_keys(StageConfig, "stages.<name>."))
    assert schema - documented == set(), "undocumented keys"
    assert documented - schema == set(), "documented keys that do not exist"
