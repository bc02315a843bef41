"""Gather prefetch under ``stage3_max_live_parameters`` (fake process group,
world size 2): pass-level checks on the final forward/backward graphs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zerograph
from tests import _harness
from tests._harness import TIMEOUT
from tests._models import Blocks
from zerograph._torch_private import c10d_functional
from zerograph.graph.tags import get_tag


def _graphs(**zero):
    torch.manual_seed(0)
    cfg = {"zero_optimization": {"stage": 3, **zero}, "zerograph": {"verify_graphs": True, "device": "cpu"}}
    model = zerograph.compile(Blocks(), cfg)
    model(torch.randn(4, 8)).backward()
    info = zerograph.inspect(model)
    return info.forward[0], info.backward[0]


def _intervals(gm) -> list[tuple[int, int, int]]:
    """(start index, last-use index, gathered elements) per all-gather: a
    bucket counts from its start to the last use of anything computed from
    its wait through the copy-out."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    intervals = []
    for n in nodes:
        tag = get_tag(n)
        if tag is None or tag.role != "all_gather":
            continue
        wait = next(u for u in n.users if u.target is c10d_functional.wait_tensor.default)
        end, stack, seen = order[wait], [wait], {wait}
        while stack:
            cur = stack.pop()
            for u in cur.users:
                end = max(end, order[u])
                ut = get_tag(u)
                if u not in seen and ut is not None and ut.role == "comm_prep":
                    seen.add(u)
                    stack.append(u)
        intervals.append((order[n], end, n.meta["val"].numel()))
    return intervals


def _peak_live_gathered(gm) -> int:
    """Most gathered elements resident at once."""
    intervals = _intervals(gm)
    return max(sum(s for a, b, s in intervals if a <= i <= b) for i in range(len(gm.graph.nodes)))


def _prefetched(gm) -> int:
    """Number of all-gathers with compute between their start and their wait."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    count = 0
    for n in nodes:
        tag = get_tag(n)
        if tag is None or tag.role != "all_gather":
            continue
        wait = next(u for u in n.users if u.target is c10d_functional.wait_tensor.default)
        between = nodes[order[n] + 1:order[wait]]
        count += any(b.op == "call_function" and (get_tag(b) is None or get_tag(b).role not in
                     ("comm_prep", "all_gather", "wait")) for b in between)
    return count


BLOCK = 8 * 8 + 8  # gathered elements of one Linear(8, 8) bucket


def test_default_prefetches_one_bucket_ahead(fake_world):
    fwd, bwd = _graphs()
    assert _prefetched(fwd) == 2
    assert _peak_live_gathered(fwd) == 2 * BLOCK


def test_tight_max_live_parameters_gathers_on_demand(fake_world):
    fwd, bwd = _graphs(stage3_max_live_parameters=2 * BLOCK - 1)
    assert _prefetched(fwd) == 0
    assert _peak_live_gathered(fwd) == BLOCK
    # the backward re-gathers weights only (64 elements each): two still fit
    assert _prefetched(bwd) == 1 and _peak_live_gathered(bwd) == 2 * 64


def test_max_live_parameters_below_one_weight_gathers_backward_on_demand(fake_world):
    _, bwd = _graphs(stage3_max_live_parameters=2 * 64 - 1)
    assert _prefetched(bwd) == 0 and _peak_live_gathered(bwd) == 64


def test_max_live_parameters_exactly_two_buckets_still_prefetches(fake_world):
    fwd, _ = _graphs(stage3_max_live_parameters=2 * BLOCK)
    assert _prefetched(fwd) == 2
    assert _peak_live_gathered(fwd) <= 2 * BLOCK


def test_persistence_threshold_keeps_small_params_replicated(fake_world):
    fwd, bwd = _graphs(stage3_param_persistence_threshold=8)
    gathered = [get_tag(n).bucket or (get_tag(n).param,) for n in fwd.graph.nodes
                if get_tag(n) is not None and get_tag(n).role == "all_gather"]
    # biases (8 elements) are never gathered; each block's weight is gathered alone
    assert [list(p) for p in gathered] == [[f"blocks.{i}.weight"] for i in range(3)]
    reduced = {get_tag(n).role: 0 for n in bwd.graph.nodes if get_tag(n) is not None}
    assert "all_reduce" in reduced and "reduce_scatter" in reduced


@pytest.mark.timeout(TIMEOUT + 30)
def test_new_options_train_like_eager():
    world = 2
    ref_losses, ref_params = _harness.reference_run("gpt", world)
    configs = [
        {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1}, "zerograph": {"verify_graphs": True}},
        {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1000},
         "zerograph": {"verify_graphs": True}},
    ]
    results = _harness.train("gpt", configs, _harness.STEPS, world)
    for config, result in zip(configs, results[0]):
        try:
            _harness.assert_same_training(result, ref_losses, ref_params)
        except AssertionError as exc:
            raise AssertionError(f"{config}: {exc}") from None
    tight, persistent = results[0]
    # persistent (replicated) parameters are all-reduced, never gathered
    assert tight["comm"]["all_reduce"] == 0 and persistent["comm"]["all_reduce"] > 0
    assert persistent["comm"]["all_gather"] < tight["comm"]["all_gather"]


class RandomBlocks(nn.Module):
    def __init__(self, widths):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x.sum()


def _live_at_prefetch(gm):
    """(start, gathered elements resident right after it) for every prefetched all-gather."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    starts = [n for n in nodes if get_tag(n) is not None and get_tag(n).role == "all_gather"]
    out = []
    for start in starts:
        wait = next(u for u in start.users if u.target is c10d_functional.wait_tensor.default)
        between = nodes[order[start] + 1:order[wait]]
        if not any(b.op == "call_function" and (get_tag(b) is None or get_tag(b).role not in
                   ("comm_prep", "all_gather", "wait")) for b in between):
            continue
        i = order[start]
        out.append((start.name, sum(s for a, b, s in _intervals(gm) if a <= i <= b)))
    return out


def _uses_follow_waits(gm) -> bool:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return all(order[a] < order[n] for n in gm.graph.nodes for a in n.all_input_nodes)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(widths=st.lists(st.integers(1, 9), min_size=2, max_size=5), max_live=st.integers(1, 200),
       bucketed=st.booleans())
def test_schedule_respects_max_live_parameters(fake_world, widths, max_live, bucketed):
    torch._dynamo.reset()
    torch.manual_seed(0)
    zero = {"stage": 3, "stage3_max_live_parameters": max_live}
    if not bucketed:
        zero.update(allgather_bucket_size=0, reduce_bucket_size=0)
    model = zerograph.compile(RandomBlocks(widths), {"zero_optimization": zero, "zerograph": {"device": "cpu"}})
    model(torch.randn(3, widths[0])).backward()
    info = zerograph.inspect(model)
    for gm in [*info.forward, *info.backward]:
        assert _uses_follow_waits(gm)
        # a gather started ahead of its use (prefetched) never brings the
        # resident gathered elements above the bound; on-demand gathers may
        for start, live in _live_at_prefetch(gm):
            assert live <= max_live, (start, live, max_live)
