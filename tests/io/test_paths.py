"""Output names: templates, sanitisation, and names that can never leave the output folder."""

from __future__ import annotations

import os
import re

import pytest

from longvid.errors import OutputExistsError
from longvid.io.paths import (
    MAX_NAME_BYTES,
    check_template,
    output_path,
    partial_path,
    publish,
    render_name,
    slug,
)

SAFE = re.compile(r"[^/\\\x00-\x1f]+")

HOSTILE = [
    "../../x",
    "/etc/passwd",
    "..",
    ".",
    "a/b\\c",
    "",
    "   ",
    "🐱🎬",
    "x" * 5000,
    "猫" * 500,
    "-rf --no-preserve-root",
    "C:\\Windows\\system32",
    "name\x00with\nnul\u202eevil",
    "／etc／passwd",  # full-width slashes
    "~/.ssh/id_rsa",
]


def assert_safe_name(name: str) -> None:
    assert SAFE.fullmatch(name), name
    assert name not in (".", "..")
    assert not name.startswith((".", "-"))
    assert len(name.encode("utf-8")) <= MAX_NAME_BYTES


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A cat, on a roof!", "A-cat-on-a-roof"),
        ("  many   spaces\there ", "many-spaces-here"),
        ("../../etc/passwd", "etc-passwd"),
        ("..", "video"),
        ("", "video"),
        ("🐱🎬", "video"),
        ("keep_this-and.that", "keep_this-and.that"),
        ("a...b---c", "a.b-c"),
        ("café ² ｆｕｌｌ", "café-2-full"),
        (42, "42"),
    ],
)
def test_slug_values(text, expected):
    assert slug(text) == expected


def test_slug_max_len_and_no_trailing_junk():
    assert slug("word " * 40, max_len=12) == "word-word-wo"
    assert slug("abcdefghij-xyz", max_len=11) == "abcdefghij"  # cut lands on a dash: stripped


@pytest.mark.parametrize("prompt", HOSTILE)
def test_hostile_prompts_give_safe_names_inside_the_folder(tmp_path, prompt):
    out = tmp_path / "out"
    name = render_name("{recipe}_{prompt}_{seed}", recipe="wan", prompt=prompt, seed=7)
    assert_safe_name(name)
    assert name.startswith("wan_") and name.endswith("_7")
    path = output_path(out, "{prompt}", prompt=prompt)
    assert path.parent == out.resolve()
    assert path.suffix == ".mp4"
    assert_safe_name(path.stem)
    assert len(partial_path(path).name.encode("utf-8")) < 255  # the temporary name fits too
    assert list(tmp_path.iterdir()) == []  # nothing was created: the folder appears with the first file


@pytest.mark.parametrize("template", ["../{prompt}", "/abs/{prompt}", "a/b\\{seed}", "{prompt}/..", "..", ""])
def test_hostile_templates_stay_in_the_folder(tmp_path, template):
    path = output_path(tmp_path, template, prompt="p", seed=1)
    assert path.parent == tmp_path.resolve()
    assert_safe_name(path.stem)


def test_render_name_fields_and_format_specs():
    name = render_name("{recipe}-{prompt}-s{seed}-{frames}f-{width}x{height}-{index:04d}",
                       recipe="wan_1.3b", prompt="A red fox", seed=42, frames=81, width=832, height=480, index=3)
    assert name == "wan_1.3b-A-red-fox-s42-81f-832x480-0003"


def test_date_and_time_default_to_now_and_can_be_given():
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}_\d{6}", render_name("{date}_{time}"))
    assert render_name("{date}", date="2025-01-31") == "2025-01-31"


def test_long_prompt_field_is_capped_at_60():
    name = render_name("{prompt}_{seed}", prompt="a" * 300, seed=1)
    assert name == "a" * 60 + "_1"


def test_unknown_field_names_itself_and_the_known_ones():
    with pytest.raises(ValueError) as info:
        render_name("{prompt}_{sead}", prompt="p", seed=1)
    msg = str(info.value)
    assert "{sead}" in msg and "{seed}" in msg and "{prompt}" in msg


@pytest.mark.parametrize("template", ["{prompt.__class__}", "{prompt[0]}", "{}", "{0}"])
def test_attribute_index_and_positional_fields_are_rejected(template):
    with pytest.raises(ValueError, match="unknown field"):
        render_name(template, prompt="p")


def test_known_field_without_value_and_malformed_template():
    with pytest.raises(ValueError, match="seed=..."):
        render_name("{prompt}_{seed}", prompt="p")
    with pytest.raises(ValueError, match="invalid name template"):
        render_name("{prompt", prompt="p")
    with pytest.raises(ValueError, match="index"):
        render_name("{index:04d}", index="x")


def test_check_template_for_recipe_validation():
    check_template("{recipe}_{seed}")
    with pytest.raises(ValueError, match="unknown field"):
        check_template("{model}")


def test_output_path_creates_folder_and_rejects_bad_extension(tmp_path):
    out = tmp_path / "a" / "b"
    path = output_path(out, "{prompt}", ext=".json", prompt="x")
    assert not out.exists() and path == out.resolve() / "x.json"
    for ext in ("mp4", "./mp4", ".m/p4", ""):
        with pytest.raises(ValueError, match="extension"):
            output_path(out, "{prompt}", ext=ext, prompt="x")


def test_a_symlink_at_the_name_is_not_followed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "evil.mp4").symlink_to(tmp_path / "elsewhere.mp4")
    path = output_path(out, "{prompt}", prompt="evil")
    assert path == out.resolve() / "evil.mp4" and path.is_symlink()  # the link itself, never its target


def test_partial_path_is_hidden_keeps_suffix_names_its_writer_and_is_unpredictable(tmp_path):
    import re

    tmp = partial_path(tmp_path / "cat.mp4")
    assert tmp.parent == tmp_path
    assert re.fullmatch(rf"\.cat\.mp4\.[0-9a-f]{{12}}-{os.getpid()}-[0-9a-f]{{16}}\.partial\.mp4", tmp.name)
    assert partial_path(tmp_path / "cat.mp4") != tmp  # a fresh random part every time


def test_publish_without_overwrite_never_clobbers(tmp_path):
    final, tmp = tmp_path / "f.txt", tmp_path / ".f.tmp"
    final.write_text("theirs")
    tmp.write_text("ours")
    with pytest.raises(OutputExistsError):
        publish(tmp, final, overwrite=False)
    assert final.read_text() == "theirs" and not tmp.exists()
    tmp.write_text("ours")
    publish(tmp, final, overwrite=True)
    assert final.read_text() == "ours" and not tmp.exists()


def test_byte_cap_trims_the_longest_field_not_the_last():
    # 60 CJK characters are 180 UTF-8 bytes: the seed at the end must survive the cap.
    name = render_name("{recipe}_{prompt}_{seed}", recipe="猫" * 60, prompt="狗" * 60, seed=123456)
    assert len(name.encode("utf-8")) <= MAX_NAME_BYTES
    assert name.endswith("_123456") and "猫" in name and "狗" in name
    long_literal = render_name("x" * 400 + "{seed}", seed=1)
    assert len(long_literal.encode("utf-8")) <= MAX_NAME_BYTES
