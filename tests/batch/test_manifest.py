"""Manifests (text, JSONL, CSV) resolved item by item before anything runs, with line-numbered errors; seeds that do
not depend on the split; shards that are disjoint and complete, from --shard, SLURM or torchrun."""

import itertools
import json

import pytest

from longvid.batch.manifest import name_for, read_items, resolve_items
from longvid.batch.shards import environment_shard, parse_shard, pick_shard, shard_items
from longvid.errors import RecipeError

RECIPE = {"model": {"family": "wan", "path": "tiny:wan"}, "video": {"num_frames": 9, "height": 32, "width": 48},
          "sampler": {"steps": 2, "max_sequence_length": 16}, "seed": 100, "runtime": {"device": "cpu"}}


def test_text_jsonl_and_csv_manifests(tmp_path):
    (tmp_path / "p.txt").write_text("a red fox\n\n# a comment\n  a calm lake  \n")
    assert read_items(tmp_path / "p.txt") == [(1, {"prompt": "a red fox"}), (4, {"prompt": "a calm lake"})]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a", "seed": 7}) + "\n\n" +
                                      json.dumps({"prompt": {"0": "calm", "4": "storm"}, "overrides": {"seed": 1}}))
    assert [n for n, _ in read_items(tmp_path / "p.jsonl")] == [1, 3]
    (tmp_path / "p.csv").write_text("prompt,seed,video.num_frames\n\"a fox, running\",5,\nb lake,,13\n")
    assert read_items(tmp_path / "p.csv") == [(2, {"prompt": "a fox, running", "seed": 5}),
                                              (3, {"prompt": "b lake", "overrides": ["video.num_frames=13"]})]


def test_items_resolve_with_seeds_from_their_index_and_names_with_theirs(tmp_path):
    manifest = tmp_path / "p.jsonl"
    lines = [{"prompt": "a red fox"}, {"prompt": "${oc.env:HOME}", "seed": 7},
             {"prompt": "a lake", "overrides": {"video.num_frames": 13}, "name": "lake-{index}"}]
    manifest.write_text("\n".join(json.dumps(x) for x in lines))
    items = resolve_items(manifest, RECIPE)
    assert [i.recipe.seed for i in items] == [100, 7, 102]  # base seed + index unless given
    assert items[1].recipe.prompt == "${oc.env:HOME}"  # free text is never evaluated
    assert items[2].recipe.video.num_frames == 13 and items[2].recipe.output.name == "lake-2"
    assert items[0].recipe.output.name == "00000-{prompt}-{seed}"
    assert name_for("{index:03d}_{prompt}", 7) == "007_{prompt}"
    # a seed override moves the base seed; it does not give every item the same seed
    assert [i.recipe.seed for i in resolve_items(manifest, RECIPE, ["seed=5"])] == [5, 7, 7]
    lines[0]["overrides"] = {"seed": 42}  # an item's own seed override is its seed
    manifest.write_text("\n".join(json.dumps(x) for x in lines))
    assert [i.recipe.seed for i in resolve_items(manifest, RECIPE, ["seed=5"])] == [42, 7, 7]


def test_every_bad_item_is_reported_with_its_line_and_key_before_anything_runs(tmp_path):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("\n".join([json.dumps({"prompt": "ok"}), "{not json"]))
    with pytest.raises(RecipeError, match="bad.jsonl:2: not valid JSON"):
        resolve_items(manifest, RECIPE)
    manifest.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "ok"}, {"prompt": "x", "seed": -1}, {"negative_prompt": "no prompt"},
        {"prompt": "y", "overrides": {"video.num_frames": 10}}, {"prompt": "z", "colour": "red"}]))
    with pytest.raises(RecipeError) as err:
        resolve_items(manifest, RECIPE)
    text = str(err.value)
    assert "bad.jsonl:2: seed" in text and "bad.jsonl:3: prompt: every item needs a prompt" in text
    assert "bad.jsonl:4: video.num_frames" in text and "bad.jsonl:5: unknown item key(s) ['colour']" in text
    assert "bad.jsonl:1" not in text
    with pytest.raises(RecipeError, match="no manifest file"):
        resolve_items(tmp_path / "missing.txt", RECIPE)


@pytest.mark.parametrize("count, n", [(c, n) for c, n in itertools.product([0, 1, 5, 16, 17, 100], [1, 2, 3, 16])])
def test_shards_are_disjoint_and_complete(count, n):
    parts = [shard_items(count, (i, n)) for i in range(n)]
    flat = sorted(x for p in parts for x in p)
    assert flat == list(range(count))  # every item once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced


def test_shard_sources_and_their_agreement():
    assert parse_shard("3/16") == (3, 16)
    for bad in ("16/16", "3", "a/4", "1/0", "-1/4"):
        with pytest.raises(RecipeError, match="--shard"):
            parse_shard(bad)
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_MAX": "7"}
    assert environment_shard(slurm) == (1, 4)
    assert environment_shard({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}) == (2, 3)
    assert environment_shard({"RANK": "1", "WORLD_SIZE": "8"}) == (1, 8)
    assert environment_shard({}) is None and pick_shard(None, {}) == (0, 1)
    assert pick_shard("1/4", slurm) == (1, 4) and pick_shard(None, slurm) == (1, 4)
    with pytest.raises(RecipeError, match="disagrees with the environment"):
        pick_shard("0/4", slurm)
