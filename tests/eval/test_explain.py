"""``longvid explain``: figures of what a recipe's methods do, drawn from the methods' own geometry, no model loaded.

The figures of every built-in long-video recipe are rendered once (module fixture, ~10 s on one core); the value
tests check each ``<method>_data`` against the core function it must reuse, without rendering.
"""

import math

import numpy as np
import pytest
import torch

from longvid.errors import RecipeError
from longvid.eval import explain as ex
from longvid.recipe.resolve import resolve
from longvid.registry import model_spec

torch.set_num_threads(1)

#: recipe -> the figures it must give
EXPECTED = {
    "freenoise-wan-4x": ["freenoise-weights"],
    "freenoise-animatediff-64": ["freenoise-weights"],
    "freelong-wan-4x": ["freelong-filter", "freelong-local-window", "freenoise-weights"],
    "freeloc-wan-4x": ["freeloc-tsa", "freeloc-vrpr", "freeloc-vrpr-positions"],
    "ultravico-wan-4x": ["ultravico-far-pairs"],
    "riflex-wan-4x": ["riflex-frequencies"],
    "freeswim-1080p": ["freeswim-window"],
    "pyramid-flow-miniflux-384p": ["pyramid-flow-schedule", "pyramid-flow-history"],
}


def _no_model(*args, **kwargs):
    raise AssertionError("explain must not load a model")


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    """``{recipe: [paths]}`` of every recipe in EXPECTED, rendered with model loading forbidden."""
    from longvid import runner
    from longvid.models.base import ModelAdapter

    root = tmp_path_factory.mktemp("explain")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "load_adapter", _no_model)
        mp.setattr(ModelAdapter, "load", classmethod(_no_model))
        for name in EXPECTED:
            out[name] = ex.explain(resolve(name), root / name / "figures")  # a folder that does not exist yet
    return out


def _pixels(path):
    from matplotlib.image import imread

    return imread(path)  # (H, W, 4) float32 in [0, 1]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_writes_readable_nonconstant_pngs(figures, name):
    paths = figures[name]
    assert [p.stem for p in paths] == EXPECTED[name]
    assert sorted(p.name for p in paths[0].parent.iterdir()) == sorted(p.name for p in paths)  # no temporaries
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = _pixels(path)
        assert 700 <= image.shape[1] <= 900  # ~800 px wide at dpi 100
        assert float(image[..., :3].std()) > 0.01  # not a blank canvas


def test_figures_of_different_methods_differ(figures):
    first = {}  # one figure per method (freenoise appears in two recipes: keep one)
    for paths in figures.values():
        for path in paths:
            first.setdefault(path.stem, _pixels(path))
    names = list(first)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            same = first[a].shape == first[b].shape and np.array_equal(first[a], first[b])
            assert not same, f"{a} and {b} are the same picture"


def test_recipe_without_method_is_a_one_line_error(tmp_path):
    out = tmp_path / "figs"
    with pytest.raises(RecipeError) as err:
        ex.explain(resolve("demo"), out)
    message = str(err.value)
    assert "\n" not in message and "has no method to explain" in message and message.startswith("recipe:")
    assert not out.exists()


def test_rerun_replaces_figures_atomically(tmp_path):
    recipe = resolve("freenoise-animatediff-64")
    first = ex.explain(recipe, tmp_path)
    again = ex.explain(recipe, tmp_path)
    assert first == again and [p.name for p in tmp_path.iterdir()] == ["freenoise-weights.png"]


# ------------------------------------------------------------------------------ values: the core functions


def _data(name, method_data, overrides=()):
    recipe = resolve(name, list(overrides))
    return recipe, method_data(recipe, model_spec(recipe.model.family))


@pytest.mark.parametrize("name, frames, window, stride", [("freenoise-wan-4x", 81, 21, 10),
                                                          ("freenoise-animatediff-64", 64, 16, 4)])
def test_freenoise_weights_are_the_fusion_plan(name, frames, window, stride):
    from longvid.core.windows import context_views, frame_weight_counts, window_weights

    recipe, d = _data(name, ex.freenoise_data)
    assert (int(d["window"]), int(d["stride"])) == (window, stride)
    assert [tuple(v) for v in d["views"]] == context_views(frames, window, stride)
    np.testing.assert_array_equal(d["weights"].sum(0), frame_weight_counts(frames, window, stride).numpy())
    np.testing.assert_allclose(d["normalized"].sum(0), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(d["weights"][1, stride:stride + window], window_weights(window).numpy())
    if name == "freenoise-animatediff-64":  # pyramid 16/4: 1, 2, 3, 4, 6, 8, ... 18 inside (core docstring)
        assert d["counts"][:7].tolist() == [1, 2, 3, 4, 6, 8, 10] and d["counts"][12:52].max() == 18


def test_freelong_filter_slices_are_the_core_filter():
    from longvid.core.attention import window_bounds
    from longvid.core.spectral import gaussian_low_pass_filter

    _, d = _data("freelong-wan-4x", ex.freelong_data)
    assert d["shape"].tolist() == [81, 30, 52]  # 321 frames -> 81 latent; 480x832 / 16 px per token
    lpf = gaussian_low_pass_filter((81, 30, 52), 0.25, 0.25, "official", dtype=torch.float64).numpy()
    np.testing.assert_array_equal(d["filter_tw"], lpf[:, 15, :])  # the peak: DC of the even axes, bin 40 of 81
    np.testing.assert_array_equal(d["profile_t"], lpf[:, 15, 26])
    lo, hi = window_bounds(81, 21, "adjusted")
    assert [int(row.nonzero()[0][0]) for row in d["local"]] == lo.tolist()
    assert [int(row.nonzero()[0][-1]) + 1 for row in d["local"]] == hi.tolist()


def _frame_share(member, frames, p):
    return member.reshape(frames, p, frames, p).double().mean(dim=(1, 3)).numpy()


def test_freeloc_maps_are_the_core_membership():
    from longvid.core.freeloc_geometry import tsa_member, vrpr_member, vrpr_relative_table, vrpr_settings

    _, d = _data("freeloc-wan-4x", ex.freeloc_data)
    p, round_to = int(d["tokens_per_frame"]), int(d["round_to"])
    assert (p, round_to) == (16, 1)  # 128 tokens of 1560 per frame, scaled to 16 per frame
    tokens = torch.arange(81 * p)
    m, n = tokens[:, None], tokens[None, :]
    for b in range(3):
        np.testing.assert_array_equal(d["tsa"][b], _frame_share(tsa_member(m, n, b, p, 81, round_to, "auto"), 81, p))
    s = vrpr_settings(81)
    for b in range(5):
        np.testing.assert_array_equal(d["vrpr"][b], _frame_share(vrpr_member(m, n, b, p, s, round_to), 81, p))
    np.testing.assert_allclose(d["tsa"].sum(0) + d["tsa_none"], 1.0)  # the branches are disjoint
    np.testing.assert_allclose(d["vrpr"].sum(0) + d["vrpr_none"], 1.0)
    assert d["tsa"][0][40, 33:48].min() == 1.0  # dense below 8 frames (|token distance| <= 8 frames)
    rows = vrpr_relative_table(81, 80, p, round_to)
    assert [d["vrpr_relative"][80, 80 - dist] for dist, _, _ in rows] == [pos for _, pos, _ in rows]
    assert np.nanmax(d["vrpr_relative"]) == 20  # clipped at the largest trained relative position
    assert np.isnan(d["vrpr_relative"][0, 1])  # future keys: not drawn (mirror image)


def test_ultravico_maps_are_the_core_masks():
    from longvid.core.far_decay import far_mask, first_frame_mask

    _, d = _data("ultravico-wan-4x", ex.ultravico_data)
    p = int(d["tokens_per_frame"])
    tokens = torch.arange(81 * p)
    m, n = tokens[:, None], tokens[None, :]
    np.testing.assert_array_equal(d["far"], _frame_share(far_mask(m, n, p, 21), 81, p))
    np.testing.assert_array_equal(d["hidden"], _frame_share(first_frame_mask(m, n, p, 21), 81, p))
    assert float(d["half_window_frames"]) == 10.5
    dist = np.abs(np.arange(81)[:, None] - np.arange(81)[None, :])
    assert d["far"][dist <= 9].max() == 0 and d["far"][dist >= 12].min() == 1
    assert d["hidden"][0, 22:].min() == 1 and d["hidden"][2:].max() == 0


def test_riflex_changes_only_the_intrinsic_frequency():
    from longvid.core.rope import inverse_frequencies, riflex

    _, d = _data("riflex-wan-4x", ex.rope_data)
    expected = riflex(6, 81, 0.9).frequencies(inverse_frequencies(44)).numpy()
    np.testing.assert_array_equal(d["inv_after"], expected)
    changed = np.nonzero(d["inv_after"] != d["inv_before"])[0]
    assert changed.tolist() == [5] and math.isclose(d["period_after"][5], 81 / 0.9)
    _, off = _data("riflex-wan-4x", ex.rope_data, ["video.num_frames=161"])  # 41 latent frames <= N_k = 51
    assert not off["edited"] and np.array_equal(off["inv_after"], off["inv_before"])


@pytest.mark.parametrize("method", ["ntk", "pi", "yarn"])
def test_scaling_edits_are_the_core_edits(method):
    from longvid.core import rope

    _, d = _data("riflex-wan-4x", ex.rope_data, ["methods.riflex=null", f"methods.{method}={{}}"])
    inv, s = rope.inverse_frequencies(44), 81 / 21
    edit = {"ntk": rope.ntk(s, 44), "pi": rope.position_interpolation(s), "yarn": rope.yarn(s, 21)}[method]
    if edit.frequencies is not None:
        np.testing.assert_array_equal(d["inv_after"], edit.frequencies(inv).numpy())
    if edit.positions is not None:
        np.testing.assert_array_equal(d["positions_after"], edit.positions(torch.arange(81.0, dtype=torch.float64)))
        np.testing.assert_allclose(d["period_after"], d["period_before"] * s)
    assert d["edited"] and (d["period_after"] >= d["period_before"] * (1 - 1e-12)).all()  # never faster


def test_freeswim_windows_are_the_core_window():
    from longvid.core.swin_geometry import axis_bounds

    _, d = _data("freeswim-1080p", ex.freeswim_data)
    assert d["grid"].tolist() == [21, 68, 120] and d["half"].tolist() == [15, 26] and d["base"].tolist() == [30, 52]
    lo_h, hi_h = axis_bounds(68, 15)
    lo_w, hi_w = axis_bounds(120, 26)
    for (r, c), window, cut in zip(d["queries"], d["window"], d["truncated"]):
        expected = np.zeros((68, 120), bool)
        expected[lo_h[r]:hi_h[r], lo_w[c]:hi_w[c]] = True
        np.testing.assert_array_equal(window, expected)
        assert window.sum() == 31 * 53 and cut.sum() <= window.sum() and window[r, c]


def test_pyramid_flow_schedule_is_the_scheduler():
    from longvid.models.pyramid_flow.pyramid import history_plan
    from longvid.models.pyramid_flow.scheduler import PyramidSchedule

    _, d = _data("pyramid-flow-miniflux-384p", ex.pyramid_flow_data)
    schedule = PyramidSchedule()
    assert int(d["units"]) == 16
    assert d["stage_t"].tolist() == [list(t) for t in schedule.stage_timesteps]  # [1000, 744], [744, 386], [386, 1]
    assert [t.size for t in d["image_t"]] == [20, 20, 20] and [t.size for t in d["video_t"]] == [10, 10, 10]
    np.testing.assert_array_equal(d["video_t"][1], schedule.timesteps(10, 1).numpy())
    assert d["start_sigma"].tolist() == schedule.start_sigmas and d["end_sigma"].tolist() == schedule.end_sigmas
    assert d["latent_sizes"].tolist() == [[12, 20], [24, 40], [48, 80]]  # 384x640 px / 8, halved twice
    for stage in range(3):
        plan = history_plan(15, stage)
        assert [(f, int(d["history"][stage, f])) for f, _ in plan] == plan and d["history"][stage, 15] == -1


def test_the_explain_command_lists_its_figures_and_refuses_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "longvid", "explain", "ultravico-wan-4x", "--out", str(tmp_path / "f")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(tmp_path / "f" / "ultravico-far-pairs.png")]
    assert (tmp_path / "f" / "ultravico-far-pairs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, "-m", "longvid", "explain", "demo", "--out", str(tmp_path / "g")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "no method to explain" in bad.stderr
    assert not (tmp_path / "g").exists()
