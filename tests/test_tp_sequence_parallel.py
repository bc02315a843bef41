"""Megatron sequence parallelism (``zerograph.tp_sequence_parallel``): trains
exactly like single-process eager PyTorch, moves Megatron-SP's bytes, and the
pass emits the graph documented in docs/tensor_parallel.md.

Equivalence runs use the rank pool (tests/_pool.py) with the tensor-parallel
tests' rank body (``tp_run``: each tp rank reads its data-parallel index's
rows); 5 AdamW steps, losses and full parameters against the eager
reference (fp32, rtol 1e-5, or as close to fp64 as the fp32 reference where
round-off itself moves that far: tests/test_tensor_parallel.py).
"""

from __future__ import annotations

import pytest
import torch
from expecttest import assert_expected_inline
from torch import nn

import zerograph
from tests import _harness, _models, _pool, test_tp_vocab  # noqa: F401  (test_tp_vocab: the "gpt_v98" model)
from tests.test_tensor_parallel import TP, _check, _config, tp_run
from zerograph.graph.format import format_graph

TIMEOUT = _harness.TIMEOUT
SP = {"tp_sequence_parallel": True}


def _sp_config(stage: int, **extra) -> dict:
    config = _config(stage, **extra)
    config["zerograph"] = {**config["zerograph"], **SP}
    return config


def _norm_grads_summed_off(model_name, configs, steps):
    """``tp_run`` with the sequence-parallel gradient sum of norm weights and
    row biases removed (``SequenceParallel.grad_sum`` returns its input): the
    control that the equivalence test can fail."""
    from zerograph.passes import tp_sequence

    original = tp_sequence.SequenceParallel.grad_sum
    tp_sequence.SequenceParallel.grad_sum = lambda self, value, before: value
    try:
        return tp_run(model_name, configs, steps)
    finally:
        tp_sequence.SequenceParallel.grad_sum = original


@pytest.mark.timeout(TIMEOUT + 30)
def test_sp_gpt_matches_eager_at_stages_0_and_3_with_megatron_sp_bytes():
    """nanoGPT (untied head, whole on every rank) at tp=2, world 2. Per step,
    per layer: two reduce-scatters (after proj of attention and MLP) and two
    all-gathers (in front of qkv and fc) of b*s*h in the forward, the same
    in the backward (the duals): on the wire (ring: an all-reduce moves twice
    an all-gather), 4 b*s*h per layer and phase, as plain tp's two
    all-reduces. Besides: the entry scatter's backward all-gather of b*s*h
    (embeddings' sum), the final gather of b*s*h for the whole LM head, the
    backward's re-gathers of the column groups' inputs (2 b*s*h per layer,
    ``tp_sequence_parallel_regather``, the default), and the backward
    all-reduces of the gradients of the norm weights/biases and the row
    biases (6 h per layer, 2 h for ln_f). The same bytes at ZeRO-3 with
    ``per_layer`` activation checkpointing."""
    checkpointed = _sp_config(3, activation_checkpointing={"policy": "per_layer"})
    results = _pool.run(tp_run, 2, "gpt_untied", [_sp_config(0), _sp_config(3), checkpointed], timeout=TIMEOUT)
    _check(results, "gpt_untied", 2, ["sp stage 0", "sp stage 3", "sp stage 3, per_layer checkpointing"])
    cfg = _models.make_gpt().config
    b, s, h, n = _harness.PER_RANK_BATCH, _models.SEQ, cfg.n_embd, cfg.n_layer
    bsh = b * s * h * 4  # bytes of one [b, s, h] fp32 activation
    forward = {"tp_reduce_scatter": 2 * n * bsh, "tp_all_gather": 2 * n * bsh + bsh}
    regather = 2 * n * bsh  # the column groups' inputs gathered again for the weight gradients
    backward = {"tp_reduce_scatter": 2 * n * bsh, "tp_all_gather": 2 * n * bsh + bsh + regather,
                "tp_all_reduce": (6 * n + 2) * h * 4}
    for rank in results:
        stage0 = rank[0]
        assert stage0["comm_by_phase"]["forward"] == forward
        assert stage0["comm_by_phase"]["backward"] == backward
        assert stage0["planned_comm"] == stage0["comm"]
        # Megatron-SP's accounting: a reduce-scatter and an all-gather of N move what one all-reduce of N does
        # (ring: 2N(tp-1)/tp); buffer bytes count an all-reduce once, so the layers' collectives (all but the
        # entry's and the head's gathers, and the re-gathers) are twice plain tp's all-reduce bytes (2n b*s*h per
        # phase)
        layers = stage0["comm"]["tp_reduce_scatter"] + stage0["comm"]["tp_all_gather"] - 2 * bsh - regather
        assert layers == 2 * (2 * (2 * n * bsh))
        # recomputing each block repeats no tp collective and gathers each column group's input once
        tp_only = {phase: {k: v for k, v in kinds.items() if k.startswith("tp_")}
                   for phase, kinds in rank[2]["comm_by_phase"].items()}
        assert tp_only == {"forward": forward, "backward": backward}


@pytest.mark.timeout(TIMEOUT + 30)
def test_sp_llama_matches_eager():
    """Hugging Face Llama (RMSNorm decomposed in the graph, rotary, grouped-
    query attention; its tp plan) at tp=2 with Megatron-SP, ZeRO-3."""
    results = _pool.run(tp_run, 2, "llama", [_sp_config(3)], timeout=TIMEOUT)
    _check(results, "llama", 2, ["sp stage 3"])
    b, s, h, n = _harness.PER_RANK_BATCH, _models.SEQ, 32, 2
    bsh = b * s * h * 4
    kv_cache = 2 * n * b * s * (2 * 8) * 4  # use_cache: each layer's keys and values (2 heads of 8) leave whole
    # as for nanoGPT (the stream enters at the embedding's output, the LM head reads it gathered, the backward
    # gathers the 2 column groups' inputs of each layer again); the RMSNorm
    # weights (2 per layer and the final norm) are summed over tp; no biases
    assert results[0][0]["comm_by_phase"] == {
        "forward": {"tp_reduce_scatter": 2 * n * bsh, "tp_all_gather": (2 * n + 1) * bsh + kv_cache},
        "backward": {"tp_reduce_scatter": 2 * n * bsh, "tp_all_gather": (2 * n + 1) * bsh + 2 * n * bsh,
                     "tp_all_reduce": (2 * n + 1) * h * 4}}


def _vocab_run(configs):
    from tests import test_tp_vocab  # noqa: F401  (registers the vocabulary-98 GPT, "gpt_v98")

    return tp_run("gpt_v98", configs)


@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT + 30)
def test_sp_with_vocab_parallel_and_tp2_dp2_matches_eager():
    """Megatron-SP with the vocab-parallel embedding and loss on the tied
    nanoGPT (tp=2, world 2, ZeRO-3), and tp=2 x dp=2 (world 4) at ZeRO-1
    and 3."""
    vocab = _sp_config(3)
    vocab["zerograph"]["tp_vocab_parallel"] = True
    results = _pool.run(_vocab_run, 2, [vocab], timeout=TIMEOUT)
    _check(results, "gpt_v98", 2, ["sp + vocab parallel, stage 3"])
    assert results[0][0]["local_shapes"]["wte.weight"] == (49, 30)
    results = _pool.run(tp_run, 4, "gpt_untied", [_sp_config(1), _sp_config(3)], timeout=2 * TIMEOUT)
    _check(results, "gpt_untied", 4, ["sp tp=2 x dp=2 stage 1", "sp tp=2 x dp=2 stage 3"])


@pytest.mark.timeout(TIMEOUT + 30)
def test_sp_without_summing_norm_grads_over_tp_differs_from_eager():
    """Each tp rank's LayerNorm weights see only its positions: without the
    sum over tp their gradients are partial and training departs from eager."""
    results = _pool.run(_norm_grads_summed_off, 2, "gpt_untied", [_sp_config(0)], 2, timeout=TIMEOUT)
    ref_losses, ref_params = _harness.reference_run("gpt_untied", 1, steps=2)
    got = results[0][0]["params"]
    assert not torch.allclose(got["h.0.ln_1.weight"], ref_params["h.0.ln_1.weight"], rtol=1e-3, atol=1e-5)


# -- pass level (fake process group) ------------------------------------------

class NormMLP(nn.Module):
    """``h = inp(x); (h + fc2(relu(fc1(ln(h))))).sum()``, 4 -> 8 -> 4: a
    pre-norm block with one column/row pair."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4, bias=False)
        self.ln = nn.LayerNorm(4)
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        h = self.inp(x)
        return (h + self.fc2(torch.relu(self.fc1(self.ln(h))))).sum()


def test_sequence_parallel_pass_golden(fake_world):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4)
    config = {"tensor_parallel": {"autotp_size": 2},
              "zerograph": {"verify_graphs": True, "device": "cpu", **SP}}
    model = zerograph.compile(NormMLP(), config, example_batch=x)
    model(x).backward()
    info = zerograph.inspect(model)
    region = info.regions[0]
    assert_expected_inline(format_graph(region["graphs"]["dynamo"], canonical=True), """\
l_call_impl_self_modules_inp_parameters_weight_: f32[4, 4]
l_args_0_: f32[2, 8, 4]
l_call_impl_self_modules_ln_parameters_weight_: f32[4]
l_call_impl_self_modules_ln_parameters_bias_: f32[4]
l_call_impl_self_modules_fc1_parameters_weight_: f32[8, 4]
l_call_impl_self_modules_fc1_parameters_bias_: f32[8]
l_call_impl_self_modules_fc2_parameters_weight_: f32[4, 8]
l_call_impl_self_modules_fc2_parameters_bias_: f32[4]
local: f32[4, 4] = to_local(l_call_impl_self_modules_inp_parameters_weight_)
unshard: f32[4, 4] = unshard(local, 'zg0', 'inp.weight')
h: f32[2, 8, 4] = linear(l_args_0_, unshard, None)
tp_seq_scatter_default: f32[2, 4, 4] = zerograph.tp_seq_scatter(h, 'zg0', 1)
local_1: f32[4] = to_local(l_call_impl_self_modules_ln_parameters_weight_)
unshard_1: f32[4] = unshard(local_1, 'zg0', 'ln.weight')
local_2: f32[4] = to_local(l_call_impl_self_modules_ln_parameters_bias_)
unshard_2: f32[4] = unshard(local_2, 'zg0', 'ln.bias')
tp_copy_default: f32[4] = zerograph.tp_copy(unshard_1, 'zg0')
tp_copy_default_1: f32[4] = zerograph.tp_copy(unshard_2, 'zg0')
layer_norm: f32[2, 4, 4] = layer_norm(tp_seq_scatter_default, [4], tp_copy_default, tp_copy_default_1, 1e-05)
local_3: f32[4, 4] = to_local(l_call_impl_self_modules_fc1_parameters_weight_)
unshard_whole: f32[4, 4] = unshard(local_3, 'zg0', 'fc1.weight')
local_4: f32[4] = to_local(l_call_impl_self_modules_fc1_parameters_bias_)
unshard_whole_1: f32[4] = unshard(local_4, 'zg0', 'fc1.bias')
tp_seq_gather_default: f32[2, 8, 4] = zerograph.tp_seq_gather(layer_norm, 'zg0', 1)
linear: f32[2, 8, 4] = linear(tp_seq_gather_default, unshard_whole, unshard_whole_1)
relu: f32[2, 8, 4] = relu(linear)
local_5: f32[4, 4] = to_local(l_call_impl_self_modules_fc2_parameters_weight_)
unshard_whole_2: f32[4, 4] = unshard(local_5, 'zg0', 'fc2.weight')
local_6: f32[4] = to_local(l_call_impl_self_modules_fc2_parameters_bias_)
unshard_3: f32[4] = unshard(local_6, 'zg0', 'fc2.bias')
tp_copy_default_2: f32[4] = zerograph.tp_copy(unshard_3, 'zg0')
linear_1: f32[2, 8, 4] = linear(relu, unshard_whole_2, None)
tp_seq_reduce_scatter_default: f32[2, 4, 4] = zerograph.tp_seq_reduce_scatter(linear_1, 'zg0', 1)
add: f32[2, 4, 4] = add(tp_seq_reduce_scatter_default, tp_copy_default_2)
add_1: f32[2, 4, 4] = add(tp_seq_scatter_default, add)
tp_all_gather_default: f32[2, 8, 4] = zerograph.tp_all_gather(add_1, 'zg0', 1, [8])
sum: f32[] = sum(tp_all_gather_default)
return [sum]""")
    bsh = 2 * 8 * 4 * 4  # one [b, s, h] fp32 activation
    assert region["comm_bytes"] == {
        # fc1's input gathered; fc2's partial sums reduce-scattered; the sum reads every position (gathered)
        "forward": {"tp_all_gather": 2 * bsh, "tp_reduce_scatter": bsh},
        # the duals, the gradient of h's cut gathered, fc1's input gathered again (tp_sequence_parallel_regather),
        # and ln.weight, ln.bias, fc2.bias summed over tp
        "backward": {"tp_reduce_scatter": bsh, "tp_all_gather": 3 * bsh, "tp_all_reduce": 3 * 4 * 4}}


def test_sequence_length_tp_does_not_divide_is_an_error(fake_world):
    from tests.test_tensor_parallel import _gpt

    idx, targets = _models.global_batch(0, 2)
    idx, targets = idx[:, :15], targets[:, :15]
    config = {"tensor_parallel": {"autotp_size": 2}, "zerograph": SP}
    model = zerograph.compile(_gpt(n_head=2), config, example_batch=(idx, targets))
    with pytest.raises(zerograph.runtime.tp_layout.TensorParallelError,
                       match=r"tp_sequence_parallel cuts the sequence of 15 positions .*autotp_size=2 blocks, which "
                             r"does not divide it; use a sequence length that is a multiple of 2"):
        model(idx, targets)


class NormAttention(nn.Module):
    """``h = inp(x); (h + proj(attention(qkv(ln(h))))).sum()``: 2 heads of 2,
    a fused qkv (column, per part) and proj (row)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4, bias=False)
        self.ln = nn.LayerNorm(4)
        self.qkv = nn.Linear(4, 12)
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        h = self.inp(x)
        b, t, c = h.shape
        q, k, v = self.qkv(self.ln(h)).split(c, dim=2)
        q, k, v = (z.view(b, t, 2, 2).transpose(1, 2) for z in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return (h + self.proj(y.transpose(1, 2).reshape(b, t, c))).sum()


def test_sequence_parallel_pass_golden_attention(fake_world):
    """Heads and sequence: attention runs on this rank's heads of every
    position (gathered), the residual on its positions of every feature."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4)
    config = {"tensor_parallel": {"autotp_size": 2},
              "zerograph": {"verify_graphs": True, "device": "cpu", **SP}}
    model = zerograph.compile(NormAttention(), config, example_batch=x)
    model(x).backward()
    region = zerograph.inspect(model).regions[0]
    lines = format_graph(region["graphs"]["dynamo"], canonical=True).splitlines()
    assert_expected_inline("\n".join(line for line in lines if "=" in line and " = unshard(" not in line), """\
local: f32[4, 4] = to_local(l_call_impl_self_modules_inp_parameters_weight_)
h: f32[2, 8, 4] = linear(l_args_0_, unshard, None)
tp_seq_scatter_default: f32[2, 4, 4] = zerograph.tp_seq_scatter(h, 'zg0', 1)
local_1: f32[4] = to_local(l_call_impl_self_modules_ln_parameters_weight_)
local_2: f32[4] = to_local(l_call_impl_self_modules_ln_parameters_bias_)
tp_copy_default: f32[4] = zerograph.tp_copy(unshard_1, 'zg0')
tp_copy_default_1: f32[4] = zerograph.tp_copy(unshard_2, 'zg0')
layer_norm: f32[2, 4, 4] = layer_norm(tp_seq_scatter_default, [4], tp_copy_default, tp_copy_default_1, 1e-05)
local_3: f32[6, 4] = to_local(l_call_impl_self_modules_qkv_parameters_weight_)
local_4: f32[6] = to_local(l_call_impl_self_modules_qkv_parameters_bias_)
tp_seq_gather_default: f32[2, 8, 4] = zerograph.tp_seq_gather(layer_norm, 'zg0', 1)
linear: f32[2, 8, 6] = linear(tp_seq_gather_default, unshard_whole, unshard_whole_1)
split:  = split(linear, 2, dim=2)
q: f32[2, 8, 2] = getitem(split, 0)
k: f32[2, 8, 2] = getitem(split, 1)
v: f32[2, 8, 2] = getitem(split, 2)
view: f32[2, 8, 1, 2] = view(q, 2, 8, 1, 2)
q_1: f32[2, 1, 8, 2] = transpose(view, 1, 2)
view_1: f32[2, 8, 1, 2] = view(k, 2, 8, 1, 2)
k_1: f32[2, 1, 8, 2] = transpose(view_1, 1, 2)
view_2: f32[2, 8, 1, 2] = view(v, 2, 8, 1, 2)
v_1: f32[2, 1, 8, 2] = transpose(view_2, 1, 2)
y: f32[2, 1, 8, 2] = scaled_dot_product_attention(q_1, k_1, v_1, is_causal=True)
transpose: f32[2, 8, 1, 2] = transpose(y, 1, 2)
reshape: f32[2, 8, 2] = reshape(transpose, 2, 8, 2)
local_5: f32[4, 2] = to_local(l_call_impl_self_modules_proj_parameters_weight_)
local_6: f32[4] = to_local(l_call_impl_self_modules_proj_parameters_bias_)
tp_copy_default_2: f32[4] = zerograph.tp_copy(unshard_3, 'zg0')
linear_1: f32[2, 8, 4] = linear(reshape, unshard_whole_2, None)
tp_seq_reduce_scatter_default: f32[2, 4, 4] = zerograph.tp_seq_reduce_scatter(linear_1, 'zg0', 1)
add: f32[2, 4, 4] = add(tp_seq_reduce_scatter_default, tp_copy_default_2)
add_1: f32[2, 4, 4] = add(tp_seq_scatter_default, add)
tp_all_gather_default: f32[2, 8, 4] = zerograph.tp_all_gather(add_1, 'zg0', 1, [8])
sum: f32[] = sum(tp_all_gather_default)""")
