"""zerograph.runtime.launch.spawn's start methods: a forkserver's ranks see
the caller's environment as it is when they start (not as it was when the
server started), and a bad start method is an error naming the choices."""

from __future__ import annotations

import os

import pytest

from zerograph.runtime import launch


def _env_and_world(key: str):
    import torch.distributed as dist

    return os.environ.get(key), dist.get_world_size(), dist.get_rank()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_ranks_see_the_callers_environment_at_their_start(monkeypatch, start_method):
    launch.spawn(_env_and_world, 1, "ZEROGRAPH_TEST_LAUNCH_ENV", timeout=60, start_method=start_method)  # server up
    monkeypatch.setenv("ZEROGRAPH_TEST_LAUNCH_ENV", start_method)  # set after the forkserver started
    results = launch.spawn(_env_and_world, 2, "ZEROGRAPH_TEST_LAUNCH_ENV", timeout=60, start_method=start_method)
    assert results == [(start_method, 2, 0), (start_method, 2, 1)]


def test_a_bad_start_method_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match=r"start_method must be one of \('spawn', 'forkserver'\), got 'fork'"):
        launch.spawn(_env_and_world, 1, "X", start_method="fork")
    monkeypatch.setenv(launch.START_METHOD_ENV, "threads")
    with pytest.raises(ValueError, match=r"ZEROGRAPH_START_METHOD='threads': must be one of"):
        launch.spawn(_env_and_world, 1, "X")
    monkeypatch.setenv(launch.START_METHOD_ENV, "spawn")
    assert launch.default_start_method() == "spawn"
