"""Shared test setup: one CPU thread (tiny models are overhead-bound), offline hub, tiny models on disk.

Tiny random-weight models are built once per session, saved with ``save_pretrained`` and loaded back by the
tests through the real ``from_pretrained`` path a user's checkpoint takes.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def _save(tmp_path_factory, variant):
    from longvid.models import tiny

    path = tmp_path_factory.mktemp(f"tiny-{variant}")
    tiny.build(variant).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory):
    return _save(tmp_path_factory, "wan")


@pytest.fixture(scope="session")
def tiny_animatediff_dir(tmp_path_factory):
    return _save(tmp_path_factory, "animatediff")
