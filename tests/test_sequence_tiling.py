"""Tiled compute along the sequence (ALST, ``zerograph.sequence_tiling``):
training equals single-process eager, the tiled regions' largest intermediate
is one tile's (measured), and the planner predicts less memory.

The sp=2 runs with tiling are in tests/test_sequence_parallel.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from torch import nn

import zerograph
from tests import _harness, _models
from zerograph.graph.format import format_graph
from zerograph.planner.sequence_tiling import largest_tile_elements, tile_sizes


def _config(stage: int, tile, **extra) -> dict:
    return {"zero_optimization": {"stage": stage},
            "zerograph": {"verify_graphs": True, "sequence_tiling": tile, **extra}}


def tiling_report(model, opt) -> dict:
    """What the sequence_tiling pass did (the rank pool's report hook)."""
    return {"tiling": [r.details for r in zerograph.inspect(model).passes if r.name == "sequence_tiling"]}


def _tiled(result, tokens: int, layers: int = 2) -> bool:
    return result["tiling"] == [{"mlp": layers, "loss": 1, "mlp_tile_tokens": tokens, "loss_tile_tokens": tokens}]


@pytest.mark.timeout(2 * _harness.TIMEOUT)
def test_tiled_gpt_matches_eager_at_stages_0_and_3():
    """nanoGPT on world 2 (dp=2): MLPs and logits+loss in tiles of 6 positions
    of 16 (6, 6, 4: an uneven last tile), 5 AdamW steps, fp32 rtol 1e-5."""
    ref_losses, ref_params = _harness.reference_run("gpt", 2)
    results = _harness.train("gpt", [_config(0, 6), _config(3, 6)], world=2, report=tiling_report)
    for rank in results:
        for result in rank:
            _harness.assert_same_training(result, ref_losses, ref_params)
            assert _tiled(result, _harness.PER_RANK_BATCH * 6)


@pytest.mark.slow
@pytest.mark.timeout(2 * _harness.TIMEOUT)
def test_tiled_llama_matches_eager_at_stage_3():
    """Hugging Face Llama (SwiGLU MLP, GQA, its own loss function): tiles of 4."""
    ref_losses, ref_params = _harness.reference_run("llama", 2)
    results = _harness.train("llama", _config(3, 4), world=2, report=tiling_report)
    for result in results:
        _harness.assert_same_training(result, ref_losses, ref_params)
        assert _tiled(result, _harness.PER_RANK_BATCH * 4)


def _measure(model: nn.Module, tile, rows: int = 4):
    """One tracked step at world 2 (fake group): the planner's memory plan and
    the measured allocations of the compiled graphs."""
    model = zerograph.compile(model, {"zerograph": {"device": "cpu", "track_memory": True,
                                                    "sequence_tiling": tile}})
    idx, targets = _models.global_batch(0, rows)
    for _ in range(2):  # compile, then a measured step
        out = model(input_ids=idx, labels=idx) if hasattr(model, "loss_function") else model(idx, targets)
        out.loss.backward()
    info = zerograph.inspect(model)
    return info, out


def _largest(info, model, features: int) -> int:
    """Bytes of the largest storage the graphs made whose last dimension is
    ``features`` (token rows), parameter-shaped values (weight gradients) left out."""
    shapes = {tuple(p.shape) for p in model.parameters()}
    shapes |= {s[::-1] for s in shapes}
    return max((nbytes for _, _, shape, nbytes in info.memory_measured.last_step_allocations
                if shape and shape[-1] == features and shape not in shapes), default=0)


@pytest.mark.parametrize("model_name,hidden", [("gpt", 4 * 30), pytest.param("llama", 56, marks=pytest.mark.slow)])
def test_largest_intermediate_is_one_tile_and_the_planner_sees_less(fake_world, model_name, hidden):
    """4 rows of 16 positions, tiles of 4: the largest MLP hidden and the
    largest logits-shaped value are exactly one tile's, 4 x 4 rows (forward
    and backward, recompute included); untiled they are the whole 4 x 16.
    The planner's predicted activation peak and step peak drop, and its step
    peak equals the measured one in both runs. Tiled logits are not returned."""
    rows, seq, tile, vocab = 4, _models.SEQ, 4, _models.VOCAB
    plain_model = _models.MODELS[model_name]()
    plain, plain_out = _measure(plain_model, None)
    torch._dynamo.reset()
    tiled_model = _models.MODELS[model_name]()
    tiled, tiled_out = _measure(tiled_model, tile)
    assert _largest(plain, plain_model, hidden) == rows * seq * hidden * 4
    assert _largest(tiled, tiled_model, hidden) == rows * tile * hidden * 4
    assert _largest(plain, plain_model, vocab) == rows * seq * vocab * 4
    assert _largest(tiled, tiled_model, vocab) == rows * tile * vocab * 4
    # the policy's own account of it
    assert largest_tile_elements(rows, seq, tile, 0, hidden) * 4 == rows * tile * hidden * 4
    assert largest_tile_elements(rows, seq, None, 0, vocab) * 4 == rows * seq * vocab * 4
    assert tile_sizes(seq, tile, 0) == [4, 4, 4, 4] and tile_sizes(16, 6, 0) == [6, 6, 4]
    assert tile_sizes(16, "width", 30) is None and tile_sizes(64, "width", 30) == [30, 30, 4]
    for info in (plain, tiled):
        assert info.memory.peak_total_bytes == info.memory_measured.peak_total_bytes
    assert tiled.memory.peak_activation_bytes < plain.memory.peak_activation_bytes
    assert tiled.memory.peak_total_bytes < plain.memory.peak_total_bytes
    assert plain_out.logits.shape == (rows, seq, vocab)
    assert tiled_out.logits.shape == (rows, seq, 0)
    torch.testing.assert_close(tiled_out.loss, plain_out.loss, rtol=1e-5, atol=1e-6)


class TinyBlock(nn.Module):
    """A pre-norm MLP block and an LM head with a mean cross-entropy."""

    def __init__(self, width: int = 16, vocab: int = 11):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, x, targets):
        x = x + self.proj(F.gelu(self.fc(self.norm(x)), approximate="tanh"))
        return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


def test_sequence_tiling_pass_golden_block(fake_world):
    model = zerograph.compile(TinyBlock(), {"zerograph": {"device": "cpu", "sequence_tiling": 4}})
    x, targets = torch.randn(2, 8, 16), torch.randint(0, 11, (2, 8))
    model(x, targets).backward()
    info = zerograph.inspect(model)
    graph = format_graph(info.regions[0]["graphs"]["dynamo"], canonical=True)
    body = "\n".join(line for line in graph.splitlines() if not line.startswith(("unshard", "l_")))
    recomputed = [getattr(n.target, "__name__", n.target) for n in info.regions[0]["graphs"]["dynamo"].graph.nodes
                  if "recompute" in n.meta]  # each tile's up projection and activation, logits, rows and loss
    assert recomputed == ["linear", "gelu"] * 2 + ["linear", "reshape", "cross_entropy"] * 2
    assert_expected_inline(body, """\
layer_norm: f32[2, 8, 16] = layer_norm(l_args_0_, [16], unshard, unshard_1, 1e-05)
split:  = split(layer_norm, [4, 4], 1)
getitem: f32[2, 4, 16] = getitem(split, 0)
linear: f32[2, 4, 64] = linear(getitem, unshard_2, unshard_3)
gelu: f32[2, 4, 64] = gelu(linear, approximate='tanh')
linear_1: f32[2, 4, 16] = linear(gelu, unshard_4, unshard_5)
getitem_1: f32[2, 4, 16] = getitem(split, 1)
linear_2: f32[2, 4, 64] = linear(getitem_1, unshard_2, unshard_3)
gelu_1: f32[2, 4, 64] = gelu(linear_2, approximate='tanh')
linear_3: f32[2, 4, 16] = linear(gelu_1, unshard_4, unshard_5)
cat: f32[2, 8, 16] = cat([linear_1, linear_3], 1)
x: f32[2, 8, 16] = add(l_args_0_, cat)
split_1:  = split(x, [4, 4], 1)
split_2:  = split(l_args_1_, [4, 4], 1)
getitem_2: f32[2, 4, 16] = getitem(split_1, 0)
getitem_3: i64[2, 4] = getitem(split_2, 0)
linear_4: f32[2, 4, 11] = linear(getitem_2, unshard_6, None)
reshape: f32[8, 11] = reshape(linear_4, [-1, 11])
reshape_1: i64[8] = reshape(getitem_3, [-1])
cross_entropy: f32[] = cross_entropy(reshape, reshape_1, ignore_index=-100, reduction='sum')
getitem_4: f32[2, 4, 16] = getitem(split_1, 1)
getitem_5: i64[2, 4] = getitem(split_2, 1)
linear_5: f32[2, 4, 11] = linear(getitem_4, unshard_6, None)
reshape_2: f32[8, 11] = reshape(linear_5, [-1, 11])
reshape_3: i64[8] = reshape(getitem_5, [-1])
cross_entropy_1: f32[] = cross_entropy(reshape_2, reshape_3, ignore_index=-100, reduction='sum')
add: f32[] = add(cross_entropy, cross_entropy_1)
ne: bool[2, 8] = ne(l_args_1_, -100)
sum: i64[] = sum(ne)
truediv: f32[] = truediv(add, sum)
return [truediv]""")


def test_the_pass_is_listed_only_when_on():
    def names(config):
        return [p.name for p in zerograph.default_passes(config)]

    assert "sequence_tiling" not in names({})
    assert "sequence_tiling" in names({"zerograph": {"sequence_tiling": "width"}})
    assert "sequence_tiling" in names({"zerograph": {"sequence_tiling": 128}})
    for bad in (0, -4, "big", 2.5, True):
        with pytest.raises(zerograph.ConfigError, match=r'zerograph.sequence_tiling: got .*; expected "width", a whole '
                                                        r'number of positions >= 1, or null \(off\)'):
            zerograph.config.Config.load({"zerograph": {"sequence_tiling": bad}})
