"""Ulysses sequence parallelism x pipeline stages (sp x pp) on one
(pp, dp, sp) mesh, global rank = (pp_i * dp + dp_i) * sp + sp_i
(docs/long_sequences.md#sequence-parallelism-with-pipeline-stages).

Real gloo ranks (new processes, as tests/pipeline/test_pipeline_tp.py: each
stage's step check is a subgroup that can recur in a reused pool rank,
docs/testing.md) train 5 AdamW steps with ``train_step`` on the same global
batches as single-process eager PyTorch on the full sequence
(``tests/_harness.reference_run``); each sp rank gets its data-parallel
index's full rows and the pipeline cuts the sequences itself. Every step's
loss and every full parameter afterwards must match (fp32, rtol 1e-5).
"""

from __future__ import annotations

import pytest
from expecttest import assert_expected_inline

import zerograph
from tests import _harness, _models
from tests._harness import TIMEOUT
from tests.pipeline.test_pipeline_tp import _train  # the same global batches and training loop
from tests.test_sequence_parallel import _ulysses_bytes
from zerograph.graph.format import format_graph
from zerograph.pipeline.build import trace
from zerograph.runtime.launch import spawn


def _check(results, runs):
    for i, (name, config) in enumerate(runs):
        ref_losses, ref_params = _harness.reference_run(name, 2, clip=config.get("gradient_clipping", 0.0))
        for rank_results in results:
            _harness.assert_same_training(rank_results[i], ref_losses, ref_params)


def _config(stage: int, micro_batches: int = 2, **extra) -> dict:
    return {"pipeline": {"stages": 2, "micro_batches": micro_batches}, "sequence_parallel_size": 2,
            "zero_optimization": {"stage": stage}, **extra}


def _assert_mesh(results, pp: int, dp: int, sp: int, tp: int = 1):
    for rank, rank_results in enumerate(results):
        stage, rest = divmod(rank, dp * sp * tp)
        dp_index, rest = divmod(rest, sp * tp)
        sp_index, tp_index = divmod(rest, tp)
        for result in rank_results:
            assert result["mesh"] == {"pp": (pp, stage), "dp": (dp, dp_index), "sp": (sp, sp_index),
                                      "tp": (tp, tp_index)}


@pytest.mark.timeout(TIMEOUT + 30)
def test_pp2_sp2_gpt_matches_eager_and_moves_the_ulysses_bytes():
    """pp=2 x sp=2 (world 4) on the nanoGPT model at ZeRO 0 with clipping by
    the global norm: each stage's one block runs attention on half of every
    sequence; the learned positions start at each sp rank's offset; the last
    stage's loss is the mean over the whole sequence. Per stage and step: 4
    all-to-alls forward (q, k, v, output) and 4 backward per micro-batch, each
    of this rank's (4 rows x 16/2 tokens) x 30 features, fp32."""
    runs = [("gpt", _config(0, gradient_clipping=0.05))]
    results = spawn(_train, 4, runs, timeout=TIMEOUT)
    _check(results, runs)
    _assert_mesh(results, 2, 1, 2)
    per_micro = _ulysses_bytes(rows=4, hidden=30, kv_width=30, sp=2)  # one layer's forward
    for rank_results in results:
        assert rank_results[0]["comm"]["sp_all_to_all"] == 2 * 2 * per_micro  # fwd + bwd, 2 micro-batches


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
def test_pp2_sp2_zero3_gpt_and_llama_match_eager():
    """pp=2 x sp=2 (world 4): nanoGPT at ZeRO 3 (ZeRO over each stage's dp x
    sp ranks), and Hugging Face Llama (grouped-query attention, rotary
    positions from the pipeline's global position_ids, shifted labels) at ZeRO 0."""
    llama = {"pipeline": {"stages": 2, "micro_batches": 2, "split_points": ["model.layers.1"]}}
    runs = [("gpt", _config(3)), ("llama", {**_config(0), **llama})]
    results = spawn(_train, 4, runs, timeout=TIMEOUT)
    _check(results, runs)
    _assert_mesh(results, 2, 1, 2)


@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT)
def test_pp2_sp2_tp2_gpt_matches_eager():
    """pp=2 x sp=2 x tp=2 (world 8) on one (pp, dp, sp, tp) mesh, nanoGPT
    with 4 heads at ZeRO 3: each stage's block keeps 2 of the 4 heads (tp)
    and runs attention on half of every sequence with 1 head of the whole
    sequence (sp); ZeRO shards over the stage's dp x sp = 2 ranks of each tp
    index. Every rank reads the whole global batch (dp = 1). Per rank, micro-batch
    (4 rows x 16/2 tokens) and phase (forward, backward), its stage's one
    block moves Ulysses' 4 all-to-alls of 32/tp = 16 features and Megatron's
    2 all-reduces of 32 features, fp32."""
    runs = [("gpt_h4", {**_config(3), "tensor_parallel": {"autotp_size": 2}})]
    results = spawn(_train, 8, runs, timeout=2 * TIMEOUT)
    _check(results, runs)
    _assert_mesh(results, 2, 1, 2, 2)
    tokens = 4 * 16 // 2
    for rank_results in results:
        comm = rank_results[0]["comm"]
        assert comm["sp_all_to_all"] == 2 * 2 * _ulysses_bytes(rows=4, hidden=16, kv_width=16, sp=2), comm
        assert comm["tp_all_reduce"] == 2 * 2 * 2 * tokens * 32 * 4, comm


def test_sequence_parallel_pass_on_an_aten_stage_graph(fake_world):
    """A pipeline stage's graph is ATen (torch.export): the pass wraps
    ``aten.scaled_dot_product_attention`` in the all-to-alls, starts the
    learned positions' ``aten.arange`` at the rank's offset (rank 0: 0) and
    makes ``aten.cross_entropy_loss`` the global mean (fake process group,
    the nanoGPT model traced on its 8-token slice as the pipeline traces it)."""
    gpt = _models.make_gpt()
    idx, targets = _models.global_batch(0, 2)
    gm = trace(gpt, (idx[:, :8], targets[:, :8]), None)
    config = {"sequence_parallel_size": 2, "zerograph": {"verify_graphs": True, "device": "cpu"}}
    model = zerograph.compile(gm, config)
    zerograph.feed_sequence_slices(model)  # as pipeline stages do: the inputs are this rank's slices
    model(idx[:, :8], targets[:, :8])[0].backward()
    graph = format_graph(zerograph.inspect(model).regions[0]["graphs"]["dynamo"], canonical=True)
    ops = ("aten.arange", "zerograph.sp_", "aten.cross_entropy", "ne(", "sum(", "div(", "aten.scaled_dot")
    lines = [line for line in graph.splitlines() if line.split(" = ", 1)[-1].startswith(ops)]
    assert_expected_inline("\n".join(lines), """\
arange: i64[8] = aten.arange.start(0, 8, device=device(type='cpu'), pin_memory=False)
sp_seq_to_heads_default: f32[2, 1, 16, 15] = zerograph.sp_seq_to_heads(transpose, 'zg0')
sp_seq_to_heads_default_1: f32[2, 1, 16, 15] = zerograph.sp_seq_to_heads(transpose_1, 'zg0')
sp_seq_to_heads_default_2: f32[2, 1, 16, 15] = zerograph.sp_seq_to_heads(transpose_2, 'zg0')
scaled_dot_product_attention: f32[2, 1, 16, 15] = aten.scaled_dot_product_attention(sp_seq_to_heads_default, sp_seq_to_heads_default_1, sp_seq_to_heads_default_2, None, 0.0, True)
sp_heads_to_seq_default: f32[2, 2, 8, 15] = zerograph.sp_heads_to_seq(scaled_dot_product_attention, 'zg0')
sp_seq_to_heads_default_3: f32[2, 1, 16, 15] = zerograph.sp_seq_to_heads(transpose_4, 'zg0')
sp_seq_to_heads_default_4: f32[2, 1, 16, 15] = zerograph.sp_seq_to_heads(transpose_5, 'zg0')
sp_seq_to_heads_default_5: f32[2, 1, 16, 15] = zerograph.sp_seq_to_heads(transpose_6, 'zg0')
scaled_dot_product_attention_1: f32[2, 1, 16, 15] = aten.scaled_dot_product_attention(sp_seq_to_heads_default_3, sp_seq_to_heads_default_4, sp_seq_to_heads_default_5, None, 0.0, True)
sp_heads_to_seq_default_1: f32[2, 2, 8, 15] = zerograph.sp_heads_to_seq(scaled_dot_product_attention_1, 'zg0')
cross_entropy_loss: f32[] = aten.cross_entropy_loss(to, flatten_1, reduction=2)
sp_all_reduce_default: f32[] = zerograph.sp_all_reduce(cross_entropy_loss, 'zg0')
ne: bool[16] = ne(flatten_1, -100)
sum: f32[] = sum(ne, dtype=float32)
sp_all_reduce_default_1: f32[] = zerograph.sp_all_reduce(sum, 'zg0')
div: f32[] = div(sp_all_reduce_default, sp_all_reduce_default_1)""")
