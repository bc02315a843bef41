"""Sequence x tensor parallelism (``sequence_parallel_size`` with
``tensor_parallel.autotp_size``) trains exactly like single-process eager
PyTorch on the full sequences, moves the Ulysses and Megatron formulas'
bytes, and refuses what does not compose with errors that name the fix.

Equivalence tests run sp=2 x tp=2 on 4 real gloo ranks of the test pool (one
data-parallel index: every rank reads the same full rows; zerograph cuts the
sequences), train 5 AdamW steps on the same global batches as a
single-process eager run and compare every step's mean loss and every full
parameter (fp32: rtol 1e-5). Error tests use the fake process group.
"""

from __future__ import annotations

import gc

import pytest
import torch

import zerograph
from tests import _harness, _models, _pool
from tests.test_sequence_parallel import _batch, _ulysses_bytes
from zerograph.config import ConfigError
from zerograph.models import GPT, GPTConfig
from zerograph.runtime.launch import spawn
from zerograph.runtime.sequence import SequenceParallelError

SP, TP, WORLD = 2, 2, 4
HIDDEN, HEADS, LAYERS = 32, 4, 2


def make_gpt4():
    """nanoGPT with 4 heads: 2 per tp rank, 1 per (tp, sp) rank in attention."""
    torch.manual_seed(1234)
    return GPT(GPTConfig(vocab_size=_models.VOCAB, block_size=_models.SEQ, n_layer=LAYERS, n_head=HEADS,
                         n_embd=HIDDEN))


def _build(model_name: str):
    return make_gpt4() if model_name == "gpt4" else _models.MODELS[model_name]()


def _config(stage: int, sp: int = SP, tp: int = TP, **zg) -> dict:
    return {"zero_optimization": {"stage": stage}, "sequence_parallel_size": sp,
            "tensor_parallel": {"autotp_size": tp}, "zerograph": {"verify_graphs": True, **zg}}


def sp_tp_run(model_name: str, configs: list[dict], masked: bool):
    """On each rank: train one fresh model per config on the full rows of its
    data-parallel index."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for config in configs:
        torch._dynamo.reset()
        dp = world // (SP * TP)
        global_rows = _harness.PER_RANK_BATCH * dp
        mine = slice((rank // (SP * TP)) * _harness.PER_RANK_BATCH, (rank // (SP * TP) + 1) * _harness.PER_RANK_BATCH)
        args, kwargs = _batch(model_name, 0, global_rows, masked)
        example = tuple(a[mine] for a in args) if args else {k: v[mine] for k, v in kwargs.items()}
        model = zerograph.compile(_build(model_name), config, example_batch=example)
        assert zerograph.batch_rows(model, global_rows) == mine
        opt = _harness._optimizer(model.parameters())
        losses = []
        for step in range(_harness.STEPS):
            args, kwargs = _batch(model_name, step, global_rows, masked)
            loss = model(*(a[mine] for a in args), **{k: v[mine] for k, v in kwargs.items()}).loss
            losses.append(_harness.step_mean_loss(loss, opt))
        info = zerograph.inspect(model)
        results.append({
            "losses": losses,
            "params": {k: v.detach().float().clone() for k, v in zerograph.full_state_dict(model).items()},
            "local_shapes": {n: _harness.tp_local_shape(p) for n, p in model.named_parameters()},
            "comm_by_phase": _harness._comm_by_phase(info),
            "planned_comm": dict(info.memory.comm_bytes_per_step),
            "sequence_slice": zerograph.sequence_slice(model, _models.SEQ),
        })
        del model, opt
        gc.collect()
    return results


def _reference(model_name: str, masked: bool, dp: int = 1):
    model = _build(model_name)
    opt = _harness._optimizer(model.parameters())
    losses = []
    for step in range(_harness.STEPS):
        args, kwargs = _batch(model_name, step, _harness.PER_RANK_BATCH * dp, masked)
        loss = model(*args, **kwargs).loss
        losses.append(_harness.step_mean_loss(loss, opt))
    return losses, {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def _check(results, model_name: str, masked: bool, dp: int = 1):
    ref_losses, ref_params = _reference(model_name, masked, dp)
    for result in results[0]:
        _harness.assert_same_training(result, ref_losses, ref_params)
    _harness.assert_ranks_agree(results)  # every rank ends with the same full parameters


@pytest.mark.timeout(2 * _harness.TIMEOUT)
@pytest.mark.parametrize("stage", [3, pytest.param(0, marks=pytest.mark.slow)])
def test_sp2_tp2_gpt_matches_eager_and_moves_the_formula_bytes(stage):
    """World 4, mesh (dp 1, sp 2, tp 2): each rank holds the tp slice of the
    split layers (2 of the 4 heads) and computes half of every sequence; its
    attention sees 2/sp = 1 head of the whole sequence. Per step and layer,
    forward: Ulysses' all-to-alls of q, k, v and the output, each
    b * (N/sp) * (h/tp) elements, and Megatron's two all-reduces after the
    row-split linears, each b * (N/sp) * h; the backward mirrors both. -100
    labels are left out of the global mean. ZeRO shards over the dp x sp = 2
    ranks of each tp index (stage 3 in CI, stage 0 nightly)."""
    results = _pool.run(sp_tp_run, WORLD, "gpt4", [_config(stage)], True, timeout=2 * _harness.TIMEOUT)
    _check(results, "gpt4", True)
    slices = [r[0]["sequence_slice"] for r in results]
    assert slices == [slice(0, 8), slice(0, 8), slice(8, 16), slice(8, 16)]  # rank = sp_i * tp + tp_i
    assert results[0][0]["local_shapes"]["h.0.attn.proj.weight"] == (HIDDEN, HIDDEN // TP)
    b, tokens = _harness.PER_RANK_BATCH, _harness.PER_RANK_BATCH * _models.SEQ // SP
    ulysses = LAYERS * _ulysses_bytes(b, HIDDEN // TP, HIDDEN // TP, SP)
    assert ulysses == LAYERS * 4 * tokens * (HIDDEN // TP) * 4  # 4·N·h/(sp·tp) elements of 4 bytes per layer
    megatron = LAYERS * 2 * tokens * HIDDEN * 4
    for rank_results in results:
        for result in rank_results:
            comm = result["comm_by_phase"]
            for phase in ("forward", "backward"):
                assert comm[phase]["sp_all_to_all"] == ulysses, (phase, comm)
                assert comm[phase]["tp_all_reduce"] == megatron, (phase, comm)
            assert result["planned_comm"]["sp_all_to_all"] == 2 * ulysses
            assert result["planned_comm"]["tp_all_reduce"] == 2 * megatron


@pytest.mark.slow
@pytest.mark.timeout(2 * _harness.TIMEOUT)
def test_sp2_tp2_llama_gqa_matches_eager_at_stages_0_and_3():
    """Hugging Face Llama (4 query heads, 2 key/value heads, rotary): tp=2
    leaves 2 query heads and 1 key/value head per rank, which sp=2 splits by
    repeating the key/value head (as sp does for GQA); global position ids,
    shifted labels, -100 labels."""
    results = _pool.run(sp_tp_run, WORLD, "llama", [_config(0), _config(3)], True, timeout=2 * _harness.TIMEOUT)
    _check(results, "llama", True)
    head_dim = 32 // 4
    b = _harness.PER_RANK_BATCH
    for result in results[0]:  # per rank: 2 query heads' width for q/out, k/v repeated up to 2 heads
        assert result["comm_by_phase"]["forward"]["sp_all_to_all"] == 2 * _ulysses_bytes(b, 2 * head_dim,
                                                                                          2 * head_dim, SP)


@pytest.mark.slow
@pytest.mark.timeout(3 * _harness.TIMEOUT)
def test_dp2_sp2_tp2_gpt_matches_eager():
    """World 8 on the one mesh (dp 2, sp 2, tp 2), no pipeline: ranks 0-3
    read the first 4 rows of each global batch of 8, ranks 4-7 the last 4;
    ZeRO 3 shards over the dp x sp = 4 ranks of each tp index. Every step's
    mean loss and every full parameter equal single-process eager on the
    whole batch (no -100 labels: each data-parallel index's mean then
    averages to the global mean)."""
    results = spawn(sp_tp_run, 8, "gpt4", [_config(3)], False, timeout=3 * _harness.TIMEOUT)  # no 8-rank pool
    _check(results, "gpt4", False, dp=2)
    slices = [r[0]["sequence_slice"] for r in results]
    assert slices == [slice(0, 8), slice(0, 8), slice(8, 16), slice(8, 16)] * 2  # rank = (dp_i*sp + sp_i)*tp + tp_i


@pytest.fixture
def fake_world4():
    """A fake process group of ``world`` ranks in this process (rank 0)."""
    import torch.distributed as dist

    from zerograph._torch_private import fake_store

    def start(world: int):
        dist.init_process_group("fake", store=fake_store(), rank=0, world_size=world)

    torch._dynamo.reset()
    yield start
    torch._dynamo.reset()
    if dist.is_initialized():
        dist.destroy_process_group()


def test_heads_per_tp_rank_that_sp_does_not_divide_are_rejected(fake_world4):
    """nanoGPT with 2 heads: tp=2 leaves 1 head per rank, which sp=2 cannot
    split; the error names the module, the per-rank counts and valid sizes."""
    fake_world4(4)
    idx, targets = _models.global_batch(0, 2)
    model = zerograph.compile(_models.make_gpt(), _config(0), example_batch=(idx, targets))
    with pytest.raises(SequenceParallelError, match=r"h\.0\.attn: 1 query heads and 1 key/value heads "
                                                    r"\(per tensor-parallel rank: tensor_parallel.autotp_size=2 .*\) "
                                                    r"cannot be split over sequence_parallel_size=2.*values: 1"):
        model(idx, targets)


@pytest.mark.parametrize("key,match", [
    ("tp_sequence_parallel", r"zerograph\.tp_sequence_parallel: Megatron sequence parallelism.*set "
                             r"zerograph\.tp_sequence_parallel to false"),
    ("tp_vocab_parallel", r"zerograph\.tp_vocab_parallel.*set zerograph\.tp_vocab_parallel to false"),
])
def test_megatron_sp_and_vocab_parallel_with_ulysses_are_rejected(fake_world4, key, match):
    fake_world4(4)
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=2 with tensor_parallel\.autotp_size=2 and " + match):
        zerograph.compile(make_gpt4(), _config(0, **{key: True}))


def test_a_world_that_sp_times_tp_does_not_divide_is_rejected(fake_world4):
    fake_world4(6)
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=2 x tensor_parallel\.autotp_size=2 needs a world "
                                          r"size that is a multiple of 4; this run has 6"):
        zerograph.compile(make_gpt4(), _config(0))
