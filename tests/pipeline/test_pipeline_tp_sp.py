"""3D parallelism with the vocab-parallel embedding and cross-entropy
(``zerograph.tp_vocab_parallel``) and with Megatron sequence parallelism
(``zerograph.tp_sequence_parallel``) inside pipeline stages
(docs/tensor_parallel.md#vocab-parallel-loss-and-megatron-sp-in-pipeline-stages).

pp=2 x tp=2 (world 4, new gloo processes as in test_pipeline_tp.py) trains 5
AdamW steps with ``train_step`` on the same global batches as single-process
eager PyTorch; every step's loss and every full parameter must match (fp32,
rtol 1e-5). The tp traffic of each stage, from ``zerograph.inspect``, and
the bytes each rank sends to the other stage equal the formulas exactly.
These runs cost about 35 CPU seconds each (nightly); CI runs the stage
graphs on the fake process group (the golden tests below).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import tests.test_tp_vocab  # noqa: F401  (registers gpt_v98, llama_v98: a vocabulary tp=2 divides)
from tests import _models
from tests._harness import TIMEOUT
from tests.pipeline.test_pipeline_tp import _check, _config, _train
from zerograph.models import GPT, GPTConfig
from zerograph.runtime.launch import spawn

VOCAB = {"zerograph": {"tp_vocab_parallel": True}}
SP = {"zerograph": {"tp_sequence_parallel": True}}
BOTH = {"zerograph": {"tp_sequence_parallel": True, "tp_vocab_parallel": True}}

# the test GPT's batches: 2 micro-batches of 4 rows x 16 tokens, 30 features, fp32; one block per stage
M, B, S, H, F32 = 2, 4, 16, 30, 4
U = B * S * H * F32  # one [b, s, h] activation
VEC = H * F32  # one LayerNorm weight or bias, one row layer's bias
N = B * S  # rows of the loss


def make_gpt_untied_v98():
    torch.manual_seed(1234)
    return GPT(GPTConfig(vocab_size=98, block_size=_models.SEQ, n_layer=2, n_head=2, n_embd=30, tie_weights=False))


_models.MODELS.setdefault("gpt_untied_v98", make_gpt_untied_v98)


def _run(runs):
    """On each rank (which imports this module, so knows the models above): ``_train(runs)``."""
    return _train(runs)


def _assert_traffic(results, run: int, expected: list[dict[str, int]], p2p: int):
    """Each rank's tp bytes per step (stage 0: ranks 0, 1; stage 1: ranks 2, 3) and p2p bytes sent."""
    for rank, rank_results in enumerate(results):
        got = {k: v for k, v in rank_results[run]["comm"].items() if k.startswith("tp_") and v}
        assert got == expected[rank // 2], (rank, got, expected[rank // 2])
        assert rank_results[run]["p2p"] == p2p, (rank, rank_results[run]["p2p"], p2p)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
def test_pp2_tp2_vocab_parallel_tied_and_untied_match_eager():
    """The embedding (stage 0) and the LM head + loss (stage 1) split over
    the vocabulary: GPT with its head tied to the embedding (one parameter
    read by both stages, vocab-split once; the copies of tp index i hold the
    same rows and their gradients are summed over the two stages' ranks of
    index i) and untied."""
    runs = [("gpt_v98", _config(0, **VOCAB)), ("gpt_untied_v98", _config(0, **VOCAB))]
    results = spawn(_run, 4, runs, timeout=TIMEOUT)
    _check(results, runs)
    for rank, rank_results in enumerate(results):
        tied, untied = (r["shapes"] for r in rank_results)
        if rank < 2:
            assert tied["chunks.0.model.lm_head.weight"] == (49, 30)  # torch.export names the tied weight once
            assert untied["chunks.0.model.wte.weight"] == (49, 30)
        assert tied.get("chunks.0.model.lm_head.weight", (49, 30)) == (49, 30)
        assert untied.get("chunks.0.model.lm_head.weight", (49, 30)) == (49, 30)
    # per micro-batch: stage 0 the embedding's all-reduce and Megatron's four; stage 1 Megatron's four, the
    # head's tp_copy (backward) and the loss's three all-reduces of one value per row; nothing gathered
    stages = [{"tp_all_reduce": M * 5 * U}, {"tp_all_reduce": M * (5 * U + 3 * N * F32)}]
    for run in range(2):
        _assert_traffic(results, run, stages, p2p=M * U)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
def test_pp2_tp2_megatron_sp_matches_eager():
    """Megatron-SP in both stages, with a whole and with a vocab-parallel
    embedding and loss: the residual stream crosses the stage boundary as
    each tp rank's sequence shard, so each rank sends 1/tp of the bytes
    plain tp sends (M * U, test_pipeline_tp's CI test)."""
    runs = [("gpt", _config(0, **SP)), ("gpt_v98", _config(0, **BOTH))]
    results = spawn(_run, 4, runs, timeout=TIMEOUT)
    _check(results, runs)
    # per micro-batch and block: two all-gathers and two reduce-scatters forward, the same backward; the
    # LayerNorm weights and biases and the row layers' biases (6 per block; ln_f's 2) all-reduce their
    # gradients. Stage 0: the scatter where the stream enters all-gathers its gradient; stage 1: the head
    # reads the stream gathered (a whole head: tp_all_gather; a vocab-split one: tp_seq_gather, whose
    # backward reduce-scatters); and the backward re-gathers each column group's input (2 per block, and a
    # vocab-split head's: zerograph.tp_sequence_parallel_regather)
    sp = [{"tp_all_gather": M * 7 * U, "tp_reduce_scatter": M * 4 * U, "tp_all_reduce": M * 6 * VEC},
          {"tp_all_gather": M * 7 * U, "tp_reduce_scatter": M * 4 * U, "tp_all_reduce": M * 8 * VEC}]
    both = [{"tp_all_gather": M * 7 * U, "tp_reduce_scatter": M * 4 * U, "tp_all_reduce": M * (U + 6 * VEC)},
            {"tp_all_gather": M * 8 * U, "tp_reduce_scatter": M * 5 * U,
             "tp_all_reduce": M * (8 * VEC + 3 * N * F32)}]
    _assert_traffic(results, 0, sp, p2p=M * U // 2)
    _assert_traffic(results, 1, both, p2p=M * U // 2)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
def test_pp2_tp2_llama_vocab_parallel_and_megatron_sp_match_eager():
    """Hugging Face Llama (untied head, grouped-query attention, its
    base_model_tp_plan, RMSNorm) with the vocab-parallel embedding and loss
    and Megatron-SP: the embedding is reduce-scattered along the sequence
    (the first norm reads it); the hidden states cross the boundary as
    sequence shards, the causal mask and rotary cos/sin (computed from the
    positions alone) whole."""
    llama = {"pipeline": {"stages": 2, "micro_batches": 2, "split_points": ["model.layers.1"]}, **BOTH}
    runs = [("llama_v98", {**_config(0), **llama})]
    results = spawn(_run, 4, runs, timeout=TIMEOUT)
    _check(results, runs)
    u, vec = B * S * 32 * F32, 32 * F32  # hidden size 32; RMSNorm has no bias, the layers none either
    mask, rotary = B * S * S, S * 8 * F32  # bool [b, 1, s, s]; cos, sin [1, s, head_dim 8]
    # the backward re-gathers each column group's input: 2 per block, and the vocab-split head's. Stage 1
    # receives cos and sin as activations (they carry a gradient back to stage 0) and broadcasts them over
    # its heads, so their gradients are summed over tp (tensor_parallel's tp_copy of a whole value)
    stages = [{"tp_all_gather": M * 7 * u, "tp_reduce_scatter": M * 5 * u, "tp_all_reduce": M * 2 * vec},
              {"tp_all_gather": M * 8 * u, "tp_reduce_scatter": M * 5 * u,
               "tp_all_reduce": M * (3 * vec + 3 * N * F32 + 2 * rotary)}]
    for rank, rank_results in enumerate(results):
        got = {k: v for k, v in rank_results[0]["comm"].items() if k.startswith("tp_") and v}
        assert got == stages[rank // 2], (rank, got)
        # stage 0 sends the hidden shard, the mask, cos and sin; stage 1 the gradients of the float ones
        sent = M * (u // 2 + mask + 2 * rotary) if rank < 2 else M * (u // 2 + 2 * rotary)
        assert rank_results[0]["p2p"] == sent, (rank, rank_results[0]["p2p"], sent)


# -- pass level (fake process group, CI) ---------------------------------------

@contextlib.contextmanager
def _fake_world4(rank: int):
    """A four-rank fake process group in this process as ``rank``."""
    import torch.distributed as dist

    from zerograph._torch_private import fake_store

    dist.init_process_group("fake", store=fake_store(), rank=rank, world_size=4)
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()
        dist.destroy_process_group()


def _stage_graph(rank: int) -> str:
    """pp=2 x tp=2 with both keys on a GPT with vocabulary 16, n_embd 8, 2
    heads, one block per stage, micro-batches [2, 4], as ``rank`` (tp index
    0 of stage ``rank // 2``): the stage graph's collectives and boundary
    handling (every ``zerograph.`` node but parameter reads, the aliases the
    boundary markers become, the output). Both plans send and receive
    [2, 2, 8]: 1/tp of the whole [2, 4, 8]."""
    import zerograph
    from zerograph.graph.format import format_graph

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=16, block_size=4, n_layer=2, n_head=2, n_embd=8))
    idx, targets = torch.randint(0, 16, (2, 4)), torch.randint(0, 16, (2, 4))
    with _fake_world4(rank):
        model = zerograph.compile(gpt, {"pipeline": {"stages": 2, "micro_batches": 1},
                                        "tensor_parallel": {"autotp_size": 2},
                                        "zerograph": {"device": "cpu", **BOTH["zerograph"]}},
                                  example_batch=(idx, targets))
        plan = model._split.stages[model.stage_ids[0]]
        assert [v.shape for v in plan.outgoing + plan.incoming] == [(2, 2, 8)]
        received = [torch.randn(v.shape) for v in plan.incoming]
        out = model.chunks[0](*[(idx, targets)[b] for b in plan.batch_inputs], *received)
        assert tuple(out[0].shape) == ((2, 2, 8) if rank == 0 else ())
        graph = format_graph(zerograph.inspect(model).regions[0]["graphs"]["dynamo"], canonical=True)
    return "\n".join(line for line in graph.splitlines()
                     if ("zerograph." in line or "aten.alias" in line or line.startswith("return"))
                     and "= unshard(" not in line)


def test_vocab_parallel_and_megatron_sp_stage0_golden():
    """Stage 0: the vocab-parallel embedding (this rank's rows, zeroed
    elsewhere, all-reduced), the stream scattered where it enters (after the
    position embedding is added), the block on sequence shards, its shard
    sent as is (``tp_seq_leave`` -> alias)."""
    from expecttest import assert_expected_inline

    assert_expected_inline(_stage_graph(0), """\
tp_all_reduce_default: f32[2, 4, 8] = zerograph.tp_all_reduce(masked_fill_1, 'zg0')
tp_seq_scatter_default: f32[2, 2, 8] = zerograph.tp_seq_scatter(add, 'zg0', 1)
tp_copy_default: f32[8] = zerograph.tp_copy(model_h_0_ln_1_weight, 'zg0')
tp_copy_default_1: f32[8] = zerograph.tp_copy(model_h_0_ln_1_bias, 'zg0')
tp_seq_gather_default: f32[2, 4, 8] = zerograph.tp_seq_gather(layer_norm, 'zg0', 1)
tp_copy_default_2: f32[8] = zerograph.tp_copy(model_h_0_attn_proj_bias, 'zg0')
tp_seq_reduce_scatter_default: f32[2, 2, 8] = zerograph.tp_seq_reduce_scatter(linear_1, 'zg0', 1)
tp_copy_default_3: f32[8] = zerograph.tp_copy(model_h_0_ln_2_weight, 'zg0')
tp_copy_default_4: f32[8] = zerograph.tp_copy(model_h_0_ln_2_bias, 'zg0')
tp_seq_gather_default_1: f32[2, 4, 8] = zerograph.tp_seq_gather(layer_norm_1, 'zg0', 1)
tp_copy_default_5: f32[8] = zerograph.tp_copy(model_h_0_mlp_proj_bias, 'zg0')
tp_seq_reduce_scatter_default_1: f32[2, 2, 8] = zerograph.tp_seq_reduce_scatter(linear_3, 'zg0', 1)
tp_seq_leave_default: f32[2, 2, 8] = aten.alias(add_4)
return [tp_seq_leave_default]""")


def test_vocab_parallel_and_megatron_sp_stage1_golden():
    """Stage 1: the received shard read as cut along the sequence
    (``tp_seq_enter`` -> alias), the block, ln_f on shards, the vocab-split
    head on the gathered stream, the vocab-parallel loss."""
    from expecttest import assert_expected_inline

    assert_expected_inline(_stage_graph(2), """\
tp_seq_enter_default: f32[2, 2, 8] = aten.alias(l_args_1_)
tp_copy_default: f32[8] = zerograph.tp_copy(model_h_1_ln_1_weight, 'zg0')
tp_copy_default_1: f32[8] = zerograph.tp_copy(model_h_1_ln_1_bias, 'zg0')
tp_seq_gather_default: f32[2, 4, 8] = zerograph.tp_seq_gather(layer_norm, 'zg0', 1)
tp_copy_default_2: f32[8] = zerograph.tp_copy(model_h_1_attn_proj_bias, 'zg0')
tp_seq_reduce_scatter_default: f32[2, 2, 8] = zerograph.tp_seq_reduce_scatter(linear_1, 'zg0', 1)
tp_copy_default_3: f32[8] = zerograph.tp_copy(model_h_1_ln_2_weight, 'zg0')
tp_copy_default_4: f32[8] = zerograph.tp_copy(model_h_1_ln_2_bias, 'zg0')
tp_seq_gather_default_1: f32[2, 4, 8] = zerograph.tp_seq_gather(layer_norm_1, 'zg0', 1)
tp_copy_default_5: f32[8] = zerograph.tp_copy(model_h_1_mlp_proj_bias, 'zg0')
tp_seq_reduce_scatter_default_1: f32[2, 2, 8] = zerograph.tp_seq_reduce_scatter(linear_3, 'zg0', 1)
tp_copy_default_6: f32[8] = zerograph.tp_copy(model_ln_f_weight, 'zg0')
tp_copy_default_7: f32[8] = zerograph.tp_copy(model_ln_f_bias, 'zg0')
tp_seq_gather_default_2: f32[2, 4, 8] = zerograph.tp_seq_gather(layer_norm_2, 'zg0', 1)
tp_all_reduce_max_default: f32[8, 1] = zerograph.tp_all_reduce_max(amax, 'zg0')
tp_all_reduce_default: f32[8] = zerograph.tp_all_reduce(sum, 'zg0')
tp_all_reduce_default_1: f32[8] = zerograph.tp_all_reduce(masked_fill_1, 'zg0')
return [reshape_1]""")


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
def test_pp2_dp2_tp2_vocab_parallel_and_megatron_sp_zero3_match_eager():
    """pp=2 x dp=2 x tp=2 (world 8, new processes) at ZeRO 3 with both
    keys: each dp index's rows, the boundary shards paired by (dp, tp)
    index, the tied embedding's gradient summed between the ranks of equal
    (dp, tp) indices; p2p per rank: its 2 rows of each micro-batch, 1/tp."""
    runs = [("gpt_v98", _config(3, **BOTH))]
    results = spawn(_run, 8, runs, timeout=TIMEOUT)
    _check(results, runs)
    for rank_results in results:
        assert rank_results[0]["p2p"] == M * (U // 2) // 2  # half the rows (dp=2), half the positions (tp=2)


def test_aten_embedding_and_cross_entropy_in_torch_level_form_compute_the_same():
    """``as_torch_level`` maps ATen's argument order and enums (embedding:
    weight first, padding_idx -1 = none; cross-entropy: reduction 0/1/2)
    to ``F.embedding`` / ``F.cross_entropy``: each graph computes what it
    did before, values and gradients."""
    import torch.fx as fx

    from zerograph.passes.tp_vocab import as_torch_level, vocab_operand

    aten = torch.ops.aten
    cases = [(aten.embedding.default, (-1,)), (aten.embedding.default, (3,)),
             (aten.cross_entropy_loss.default, (None, 0, -100, 0.0)),
             (aten.cross_entropy_loss.default, (None, 2, 5, 0.0)),
             (aten.cross_entropy_loss.default, (None, 1, -1, 0.0))]
    for target, extra in cases:
        graph = fx.Graph()
        a, b = graph.placeholder("a"), graph.placeholder("b")
        node = graph.call_function(target, (a, b, *extra))
        graph.output(node)
        gm = fx.GraphModule(torch.nn.Module(), graph)
        torch.manual_seed(0)
        if target is aten.embedding.default:
            inputs = [torch.randn(8, 4, requires_grad=True), torch.tensor([[1, 3, 7], [3, 0, 2]])]
        else:
            inputs = [torch.randn(6, 8, requires_grad=True), torch.tensor([1, 5, 7, 5, 0, 2])]
        expected = gm(*inputs)
        (grad,) = torch.autograd.grad(expected.sum(), inputs[0])
        assert vocab_operand(node) is a  # the weight (ATen embedding) or the logits
        as_torch_level(node)
        assert node.target in (torch.nn.functional.embedding, torch.nn.functional.cross_entropy)
        gm.recompile()
        got = gm(*inputs)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), inputs[0])[0], grad, rtol=0, atol=0)
