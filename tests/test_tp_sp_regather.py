"""Megatron-SP's backward re-gather (``zerograph.tp_sequence_parallel_regather``)
and Megatron-SP on Hugging Face GPT-2's ``Conv1D``.

With the re-gather the forward saves each column group's sequence shard
(``[b, s/tp, h]``) instead of its gathered input (``[b, s, h]``), and the
backward all-gathers it again: one more all-gather of ``b·s·h`` per column
group. Checked here: the backward graph (golden), the saved bytes (they drop
by exactly ``(1 - 1/tp)·b·s·h`` elements per column group), the traffic
(exact, from ``inspect``) with every activation checkpointing policy (no
collective repeated, no gather twice), and training against single-process
eager (5 AdamW steps, fp32 rtol 1e-5, losses and every parameter) for
Hugging Face GPT-2 with Megatron-SP. nanoGPT and Llama with Megatron-SP and
the re-gather (the default) train in tests/test_tp_sequence_parallel.py.
"""

from __future__ import annotations

import pytest
import torch
from expecttest import assert_expected_inline
from torch import nn

import zerograph
from tests import _harness, _models, _pool
from tests.test_tensor_parallel import _check, tp_run
from tests.test_tp_sequence_parallel import SP, NormMLP, _sp_config
from zerograph.graph.format import format_graph

TIMEOUT = _harness.TIMEOUT


def _compile(model, x, regather=True, policy="none"):
    config = {"tensor_parallel": {"autotp_size": 2}, "activation_checkpointing": {"policy": policy},
              "zerograph": {"verify_graphs": True, "device": "cpu", **SP, "tp_sequence_parallel_regather": regather}}
    return zerograph.compile(model, config, example_batch=x)


class _Saved:
    """Bytes of the distinct storages autograd saves for the backward while active."""

    def __init__(self):
        self.sizes: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        try:
            self.sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except RuntimeError:  # a fake tensor while compiling
            pass
        return t

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def _loss(out):
    return out.loss if hasattr(out, "loss") else out


def _saved_bytes(model, *batch) -> int:
    _loss(model(*batch)).backward()  # compiles
    with _Saved() as saved:
        out = model(*batch)
    _loss(out).backward()
    return sum(saved.sizes.values())


def test_regather_backward_golden(fake_world):
    """The backward of ``h + fc2(relu(fc1(ln(h))))`` ([2, 8, 4], tp=2): the
    forward returns the layer norm's output shard (``getitem``, ``[2, 4, 4]``)
    instead of fc1's gathered input (``[16, 4]``), and the backward gathers it
    again (``all_gather_into_tensor_default_1``, issued early, waited on just
    before fc1's weight gradient ``mm_3``: the input-gradient matmuls in
    between overlap with it)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4)
    model = _compile(NormMLP(), x)
    model(x).backward()
    region = zerograph.inspect(model).regions[0]
    forward = format_graph(region["graphs"]["forward"], canonical=True).splitlines()
    assert_expected_inline(forward[-1], """\
return [sum, view, clone_default, primals_3, primals_4, getitem, getitem_1, getitem_2, t_1, detach, t_2, view_3]""")
    assert_expected_inline(format_graph(region["graphs"]["backward"], canonical=True), """\
view: f32[16, 4]
tp_seq_scatter: f32[2, 4, 4]
tp_copy: f32[4]
tp_copy_1: f32[4]
getitem: f32[2, 4, 4]
getitem_1: f32[2, 4, 1]
getitem_2: f32[2, 4, 1]
t: f32[4, 4]
detach: f32[2, 8, 4]
t_1: f32[4, 4]
view_1: f32[16, 4]
tangents_1: f32[]
expand: f32[2, 8, 4] = aten.expand(tangents_1, [2, 8, 4])
split_with_sizes:  = aten.split_with_sizes(expand, [8], 1)
getitem_3: f32[2, 8, 4] = getitem(split_with_sizes, 0)
split:  = aten.split.Tensor(getitem_3, 4, 1)
getitem_4: f32[2, 4, 4] = getitem(split, 0)
cat: f32[2, 4, 4] = aten.cat([getitem_4], 1)
sum: f32[1, 1, 4] = aten.sum.dim_IntList(cat, [0, 1], True)
view_2: f32[4] = aten.view(sum, [4])
clone_default: f32[2, 4, 4] = aten.clone(cat, memory_format=torch.contiguous_format)  # tp comm_prep
all_gather_into_tensor_default: f32[4, 4, 4] = _c10d_functional.all_gather_into_tensor(clone_default, 2, '0')  # tp all_gather
wait_tensor_default: f32[4, 4, 4] = _c10d_functional.wait_tensor(all_gather_into_tensor_default)  # tp wait
view_default: f32[2, 2, 4, 4] = aten.view(wait_tensor_default, [2, 2, 4, 4])  # tp comm_prep
movedim_int: f32[2, 2, 4, 4] = aten.movedim.int(view_default, 0, 1)  # tp comm_prep
clone_default_1: f32[2, 2, 4, 4] = aten.clone(movedim_int, memory_format=torch.contiguous_format)  # tp comm_prep
view_default_1: f32[2, 8, 4] = aten.view(clone_default_1, [2, 8, 4])  # tp comm_prep
clone_default_2: f32[2, 4, 4] = aten.clone(getitem, memory_format=torch.contiguous_format)  # tp comm_prep
all_gather_into_tensor_default_1: f32[4, 4, 4] = _c10d_functional.all_gather_into_tensor(clone_default_2, 2, '0')  # tp all_gather
view_3: f32[16, 4] = aten.view(view_default_1, [16, 4])
t_2: f32[4, 16] = aten.t(view_3)
mm: f32[4, 4] = aten.mm(t_2, view_1)
t_3: f32[4, 4] = aten.t(mm)
t_4: f32[4, 4] = aten.t(t_1)
mm_1: f32[16, 4] = aten.mm(view_3, t_4)
view_4: f32[2, 8, 4] = aten.view(mm_1, [2, 8, 4])
t_5: f32[4, 4] = aten.t(t_3)
all_reduce_default: f32[4] = _c10d_functional.all_reduce_(view_2, 'sum', '0')  # tp all_reduce
detach_1: f32[2, 8, 4] = aten.detach(detach)
threshold_backward: f32[2, 8, 4] = aten.threshold_backward(view_4, detach_1, 0)
view_5: f32[16, 4] = aten.view(threshold_backward, [16, 4])
t_6: f32[4, 4] = aten.t(t)
mm_2: f32[16, 4] = aten.mm(view_5, t_6)
t_7: f32[4, 16] = aten.t(view_5)
wait_tensor_default_1: f32[4, 4, 4] = _c10d_functional.wait_tensor(all_gather_into_tensor_default_1)  # tp wait
view_default_2: f32[2, 2, 4, 4] = aten.view(wait_tensor_default_1, [2, 2, 4, 4])  # tp comm_prep
movedim_int_1: f32[2, 2, 4, 4] = aten.movedim.int(view_default_2, 0, 1)  # tp comm_prep
clone_default_3: f32[2, 2, 4, 4] = aten.clone(movedim_int_1, memory_format=torch.contiguous_format)  # tp comm_prep
view_default_3: f32[2, 8, 4] = aten.view(clone_default_3, [2, 8, 4])  # tp comm_prep
view_6: f32[16, 4] = aten.view(view_default_3, [16, 4])
mm_3: f32[4, 4] = aten.mm(t_7, view_6)
t_8: f32[4, 4] = aten.t(mm_3)
sum_1: f32[1, 4] = aten.sum.dim_IntList(view_5, [0], True)
view_7: f32[4] = aten.view(sum_1, [4])
t_9: f32[4, 4] = aten.t(t_8)
view_8: f32[2, 8, 4] = aten.view(mm_2, [2, 8, 4])
view_default_4: f32[2, 2, 4, 4] = aten.view(view_8, [2, 2, 4, 4])  # tp comm_prep
movedim_int_2: f32[2, 2, 4, 4] = aten.movedim.int(view_default_4, 1, 0)  # tp comm_prep
clone_default_4: f32[2, 2, 4, 4] = aten.clone(movedim_int_2, memory_format=torch.contiguous_format)  # tp comm_prep
view_default_5: f32[4, 4, 4] = aten.view(clone_default_4, [4, 4, 4])  # tp comm_prep
wait_tensor_default_2: f32[4] = _c10d_functional.wait_tensor(all_reduce_default)  # tp wait
reduce_scatter_tensor_default: f32[2, 4, 4] = _c10d_functional.reduce_scatter_tensor(view_default_5, 'sum', 2, '0')  # tp reduce_scatter
wait_tensor_default_3: f32[2, 4, 4] = _c10d_functional.wait_tensor(reduce_scatter_tensor_default)  # tp wait
native_layer_norm_backward:  = aten.native_layer_norm_backward(wait_tensor_default_3, tp_seq_scatter, [4], getitem_1, getitem_2, tp_copy, tp_copy_1, [True, True, True])
getitem_5: f32[2, 4, 4] = getitem(native_layer_norm_backward, 0)
getitem_6: f32[4] = getitem(native_layer_norm_backward, 1)
getitem_7: f32[4] = getitem(native_layer_norm_backward, 2)
add: f32[2, 4, 4] = aten.add.Tensor(cat, getitem_5)
all_reduce_default_1: f32[4] = _c10d_functional.all_reduce_(getitem_7, 'sum', '0')  # tp all_reduce
wait_tensor_default_4: f32[4] = _c10d_functional.wait_tensor(all_reduce_default_1)  # tp wait
all_reduce_default_2: f32[4] = _c10d_functional.all_reduce_(getitem_6, 'sum', '0')  # tp all_reduce
wait_tensor_default_5: f32[4] = _c10d_functional.wait_tensor(all_reduce_default_2)  # tp wait
clone_default_5: f32[2, 4, 4] = aten.clone(add, memory_format=torch.contiguous_format)  # tp comm_prep
all_gather_into_tensor_default_2: f32[4, 4, 4] = _c10d_functional.all_gather_into_tensor(clone_default_5, 2, '0')  # tp all_gather
wait_tensor_default_6: f32[4, 4, 4] = _c10d_functional.wait_tensor(all_gather_into_tensor_default_2)  # tp wait
view_default_6: f32[2, 2, 4, 4] = aten.view(wait_tensor_default_6, [2, 2, 4, 4])  # tp comm_prep
movedim_int_3: f32[2, 2, 4, 4] = aten.movedim.int(view_default_6, 0, 1)  # tp comm_prep
clone_default_6: f32[2, 2, 4, 4] = aten.clone(movedim_int_3, memory_format=torch.contiguous_format)  # tp comm_prep
view_default_7: f32[2, 8, 4] = aten.view(clone_default_6, [2, 8, 4])  # tp comm_prep
view_9: f32[16, 4] = aten.view(view_default_7, [16, 4])
t_10: f32[4, 16] = aten.t(view_9)
mm_4: f32[4, 4] = aten.mm(t_10, view)
t_11: f32[4, 4] = aten.t(mm_4)
t_12: f32[4, 4] = aten.t(t_11)
return [t_12, None, wait_tensor_default_5, wait_tensor_default_4, t_9, view_7, t_5, wait_tensor_default_2]""")
    bsh = 2 * 8 * 4 * 4
    assert region["comm_bytes"]["backward"] == {"tp_reduce_scatter": bsh, "tp_all_gather": 3 * bsh,
                                                "tp_all_reduce": 3 * 4 * 4}
    passes = {r.name: r for r in region["pass_records"]["joint"]}
    assert passes["tp_regather"].details == {"regathered": 1, "must_recompute": 2}


class _Blocks(nn.Module):
    """``h = inp(x)``, then two pre-norm MLP blocks (``blocks.0``, ``blocks.1``)
    with a residual each, 4 -> 8 -> 4."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4, bias=False)
        self.blocks = nn.ModuleList(NormMLP() for _ in range(2))

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block.fc2(torch.relu(block.fc1(block.ln(h))))
        return h.sum()


@pytest.mark.parametrize("policy", ["none", "selective", "per_layer"])
def test_regather_bytes_with_checkpointing_policies(fake_world, policy):
    """Per step, with two column groups (fc1 of each block): the forward's
    gathers and reduce-scatters; in the backward their duals, the entry's
    gathered gradient and, with the re-gather, one more all-gather of b·s·h
    per column group. An activation checkpointing policy that recomputes the
    blocks repeats no collective and gathers each input once (the recomputed
    matmul and the weight gradient read the same gather); without the
    re-gather it recomputes none."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4)
    bsh, groups = 2 * 8 * 4 * 4, 2
    forward = {"tp_all_gather": groups * bsh + bsh, "tp_reduce_scatter": groups * bsh}
    for regather in (True, False):
        torch._dynamo.reset()
        model = _compile(_Blocks(), x, regather, policy)
        model(x).backward()
        region = zerograph.inspect(model).regions[0]
        comm = region["comm_bytes"]
        assert comm["forward"] == forward, (regather, comm)
        ran = {r.name: r.details for r in region["pass_records"]["joint"]}
        assert ran.get("tp_regather", {}).get("regathered") == (groups if regather else None)
        gathers = groups * bsh + bsh + (groups * bsh if regather else 0)
        assert comm["backward"] == {"tp_reduce_scatter": groups * bsh, "tp_all_gather": gathers,
                                    "tp_all_reduce": groups * 3 * 4 * 4}, (regather, comm)


def test_regather_saves_exactly_the_gathered_inputs_less_their_shards(fake_world):
    """nanoGPT (2 layers, b=4, s=16, h=30) with Megatron-SP at tp=2: the
    bytes autograd saves for the backward (distinct storages, measured)
    drop by (1 - 1/tp)·b·s·h·4 per column group (qkv and fc of each layer)
    with the re-gather."""
    idx, targets = _models.global_batch(0, _harness.PER_RANK_BATCH)
    saved = {}
    for regather in (True, False):
        torch._dynamo.reset()
        model = _compile(_models.make_gpt_untied(), (idx, targets), regather)
        saved[regather] = _saved_bytes(model, idx, targets)
    cfg = _models.make_gpt_untied().config
    b, s, h = _harness.PER_RANK_BATCH, _models.SEQ, cfg.n_embd
    assert saved[False] - saved[True] == 2 * cfg.n_layer * (b * s * h * 4) // 2


@pytest.mark.timeout(TIMEOUT + 30)
def test_sp_hf_gpt2_matches_eager():
    """Hugging Face GPT-2 (Conv1D: ``addmm`` on ``[b·s, h]``, fused
    ``c_attn``) at tp=2 with Megatron-SP and the re-gather, ZeRO-3. A column
    Conv1D's flattening view reads the gathered sequence; a row Conv1D's
    product is reduce-scattered after its view back to ``[b, s, h]``. Bytes
    per step as nanoGPT's (two layers): with the head's gather, the entry's
    gradient gather, the re-gathers, and the gradient sums of ln_1, ln_2 and
    the two row biases per layer, and ln_f; and the KV cache the model
    returns, gathered whole (as without Megatron-SP)."""
    results = _pool.run(tp_run, 2, "hf_gpt2", [_sp_config(3)], timeout=TIMEOUT)
    _check(results, "hf_gpt2", 2, ["sp stage 3"])
    b, s, h, n = _harness.PER_RANK_BATCH, _models.SEQ, 32, 2
    bsh = b * s * h * 4
    kv = 2 * n * bsh  # use_cache (GPT-2's default): each layer's keys and values leave the graph whole
    assert results[0][0]["comm_by_phase"] == {
        "forward": {"tp_reduce_scatter": 2 * n * bsh, "tp_all_gather": (2 * n + 1) * bsh + kv},
        "backward": {"tp_reduce_scatter": 2 * n * bsh, "tp_all_gather": (2 * n + 1) * bsh + 2 * n * bsh,
                     "tp_all_reduce": (6 * n + 2) * h * 4}}
