"""3D parallelism: pipeline stages x data parallelism (ZeRO) x tensor
parallelism on one (pp, dp, tp) mesh, global rank = (pp_i * dp + dp_i) * tp
+ tp_i (docs/tensor_parallel.md#3d-parallelism-pipeline-x-data-x-tensor).

Real gloo ranks (new processes: each stage's step check is a subgroup made
with ``use_local_synchronization``, whose name can recur in a reused pool
rank, docs/testing.md) train 5 AdamW steps with ``train_step`` on the same global
batches as single-process eager PyTorch (``tests/_harness.reference_run``),
each rank reading its data-parallel index's rows (``zerograph.batch_rows``);
every step's loss and every full parameter afterwards must match (fp32,
rtol 1e-5).
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

import zerograph
from tests import _harness, _models
from tests._harness import TIMEOUT
from tests.test_tensor_parallel import _assert_within_roundoff, _reference64, fake_world4  # noqa: F401  (fixture)
from zerograph.runtime.launch import spawn

GLOBAL_ROWS = 8  # rows per step: _harness.reference_run(model, world=2)


def _batch(name: str, step: int, rows: int):
    idx, targets = _models.global_batch(step, rows)
    return (idx, targets) if name.startswith("gpt") else {"input_ids": idx, "labels": idx}


def _rows(batch, rows: slice):
    if isinstance(batch, tuple):
        return tuple(t[rows] for t in batch)
    return {k: v[rows] for k, v in batch.items()}


def _train(runs: list[tuple[str, dict]], steps: int = _harness.STEPS):
    """On each rank: for each (model, config), train ``steps`` steps with
    ``train_step`` on this rank's data-parallel rows (tp and sp ranks of one
    dp index read the same rows); the losses, the full parameters, this
    rank's local parameter shapes, the mesh as the plan sees it and the last
    step's bytes. tests/pipeline/test_pipeline_sp.py trains with it too."""
    import torch.distributed as dist

    out = []
    for name, config in runs:
        torch._dynamo.reset()
        pp, sp = config["pipeline"]["stages"], config.get("sequence_parallel_size", 1)
        tp = config.get("tensor_parallel", {}).get("autotp_size", 1)
        dp = dist.get_world_size() // (pp * sp * tp)
        dp_index = dist.get_rank() // (sp * tp) % dp
        per = GLOBAL_ROWS // dp
        example = _rows(_batch(name, 0, GLOBAL_ROWS), slice(dp_index * per, (dp_index + 1) * per))
        model = zerograph.compile(_models.MODELS[name](), config, example_batch=example)
        rows = zerograph.batch_rows(model, GLOBAL_ROWS)
        assert rows == slice(dp_index * per, (dp_index + 1) * per), rows
        opt = _harness._optimizer(model.parameters())
        losses = []
        state_bytes = 0
        for step in range(steps):
            losses.append(model.train_step(_rows(_batch(name, step, GLOBAL_ROWS), rows)))
            opt.step()
            if step == 0:
                state_bytes = _harness.model_state_bytes(model, opt)
            opt.zero_grad()
        plan = model._zg_runtime.ctx.plan
        out.append({
            "losses": losses,
            "params": {k: v.float().clone() for k, v in zerograph.full_state_dict(model).items()},
            "shapes": {n: tuple(_local(p).shape) for n, p in model.named_parameters()},
            "mesh": {d: (plan.mesh.size(d), plan.mesh.index(d)) for d in ("pp", "dp", "sp", "tp")},
            "zero": plan.zero.stage,
            "grad_norm": model._zg_runtime.ctx.last_grad_norm,
            "comm": dict(zerograph.inspect(model).comm_bytes_last_step),
            "state_bytes": state_bytes,
            "p2p": model.last_stats["p2p_sent_bytes"],  # the last step's sends to other stages
        })
    return out


def _local(p):
    return p.to_local() if isinstance(p, DTensor) else p


def _check(results, runs):
    """Each rank's losses and full parameters equal the fp32 eager run (rtol
    1e-5), or, where fp32 round-off itself moves that far (Llama's embedding:
    tensor parallelism sums the row-split products in another order), are
    as close to the fp64 eager run as the fp32 one is."""
    for i, (name, config) in enumerate(runs):
        clip = config.get("gradient_clipping", 0.0)
        ref_losses, ref_params = _harness.reference_run(name, 2, clip=clip)
        exact = None
        for rank, rank_results in enumerate(results):
            result, where = rank_results[i], f"{name} {config}, rank {rank}"
            try:
                _harness.assert_same_training(result, ref_losses, ref_params)
            except AssertionError:
                exact = exact or _reference64(name, 2, clip)
                _assert_within_roundoff(torch.tensor(result["losses"]), torch.tensor(ref_losses), exact[0],
                                        f"{where}: losses")
                assert result["params"].keys() == ref_params.keys()
                for key, ref in ref_params.items():
                    _assert_within_roundoff(result["params"][key], ref, exact[1][key], f"{where}: {key}")


def _config(stage: int, micro_batches: int = 2, **extra) -> dict:
    return {"pipeline": {"stages": 2, "micro_batches": micro_batches}, "tensor_parallel": {"autotp_size": 2},
            "zero_optimization": {"stage": stage}, **extra}


def _split_over_tp(name: str) -> bool:
    """Whether the test GPT's parameter ``name`` is cut over tp (a row-split layer's bias is whole)."""
    layer = name.rsplit(".", 1)[0]
    return layer.endswith(("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")) and not name.endswith("proj.bias")


def _assert_split(results, pp: int, dp: int, tp: int, stage_of_block: dict[int, int]):
    """Every rank holds its stage's blocks, cut over tp (the test GPT:
    n_embd 30, fused qkv [90, 30] -> [45, 30] at tp=2, proj [30, 30] ->
    [30, 15]; whole dims / dp rows at ZeRO 1-3), and the plan's mesh."""
    for rank, rank_results in enumerate(results):
        stage, rest = divmod(rank, dp * tp)
        dp_index, tp_index = divmod(rest, tp)
        for result in rank_results:
            assert result["mesh"] == {"pp": (pp, stage), "dp": (dp, dp_index), "sp": (1, 0), "tp": (tp, tp_index)}
            shapes = {n.split(".model.", 1)[1]: s for n, s in result["shapes"].items()}
            for block, st in stage_of_block.items():
                held = f"h.{block}.attn.qkv.weight" in shapes
                assert held == (st == stage), (rank, block, sorted(shapes))
                if held:  # ZeRO 1-3 over dp > 1: dp index i holds torch.chunk's rows i of the tp slice
                    rows = (lambda n: n if result["zero"] == 0 or dp == 1 else len(range(n)[dp_index::dp]))
                    assert shapes[f"h.{block}.attn.qkv.weight"] == (rows(45), 30)
                    assert shapes[f"h.{block}.attn.proj.weight"] == (rows(30), 15)
                    assert shapes[f"h.{block}.mlp.fc.weight"] == (rows(60), 30)


def _train_then_save(runs, path: str):
    """``_train(runs)``, then ``_save_pp_tp(path, ...)``: one launch for both."""
    from tests.checkpoint.test_tp_checkpoint import ROWS, SAVE_AT

    return _train(runs), _save_pp_tp(path, SAVE_AT, ROWS)


@pytest.mark.timeout(TIMEOUT + 30)
def test_pp2_tp2_matches_eager_and_its_checkpoint_loads_without_pipeline_or_tp(tmp_path):
    """pp=2 x tp=2 (world 4) on the nanoGPT model, ZeRO 0, clipping by the
    global norm over both stages and both tp ranks (the cheap CI case; ZeRO
    3, Llama and data parallelism in the slow tests). Then a pp=2 x tp=2
    checkpoint saved after 3 steps, loaded by one process with neither (the
    checkpoint holds whole tensors under the user's keys), 2 more steps: the
    losses and parameters of 5 uninterrupted eager steps."""
    from tests.checkpoint.test_tp_checkpoint import END, SAVE_AT, _assert_continues, tp_checkpoint_run

    runs = [("gpt", _config(0, gradient_clipping=0.05))]
    path = str(tmp_path / "pp2tp2")
    out = spawn(_train_then_save, 4, runs, path, timeout=TIMEOUT)
    results = [trained for trained, _ in out]
    _check(results, runs)
    _assert_split(results, 2, 1, 2, {0: 0, 1: 1})
    # Megatron's traffic on each stage's one block: per micro-batch (4 rows x 16 tokens x 30 features,
    # fp32) two all-reduces in the forward and two in the backward; 2 micro-batches
    for rank_results in results:
        assert rank_results[0]["comm"]["tp_all_reduce"] == 2 * 4 * (4 * 16 * 30 * 4)
        # p2p: stage 0 sends each micro-batch's [4, 16, 30] activation, stage 1 its gradient (with
        # Megatron-SP 1/tp of it: test_pipeline_tp_sp.py)
        assert rank_results[0]["p2p"] == 2 * (4 * 16 * 30 * 4)

    ref_losses, ref_params = _harness.reference_run("gpt", 1, steps=END)
    saved_losses, saved_shapes = out[0][1]
    torch.testing.assert_close(torch.tensor(saved_losses), torch.tensor(ref_losses[:SAVE_AT]), rtol=1e-5, atol=1e-6)
    assert saved_shapes["chunks.0.model.h.0.attn.qkv.weight"] == (45, 30)  # really split at save time
    resumed = tp_checkpoint_run("gpt", {"zero_optimization": {"stage": 0}}, path, "resume")
    _assert_continues(resumed, ref_losses[SAVE_AT:], ref_params, "pp2 x tp2 -> one process")


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
def test_pp2_tp2_zero3_gpipe_and_llama_match_eager():
    """pp=2 x tp=2 (world 4): nanoGPT at ZeRO 3 with GPipe, and Hugging Face
    Llama (its base_model_tp_plan, grouped-query attention) at ZeRO 0."""
    gpipe = {"pipeline": {"stages": 2, "micro_batches": 4, "schedule": "gpipe"}}
    llama = {"pipeline": {"stages": 2, "micro_batches": 2, "split_points": ["model.layers.1"]}}
    runs = [("gpt", {**_config(3), **gpipe}), ("llama", {**_config(0), **llama})]
    results = spawn(_train, 4, runs, timeout=TIMEOUT)
    _check(results, runs)
    _assert_split([r[:1] for r in results], 2, 1, 2, {0: 0, 1: 1})


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
def test_pp2_dp2_tp2_matches_eager():
    """pp=2 x dp=2 x tp=2 (world 8, new processes: the pool holds at most 6
    ranks) at ZeRO 3, and at ZeRO 1 with clipping."""
    runs = [("gpt", _config(3)), ("gpt", _config(1, gradient_clipping=0.05))]
    results = spawn(_train, 8, runs, timeout=TIMEOUT)
    _check(results, runs)
    _assert_split(results, 2, 2, 2, {0: 0, 1: 1})
    # model states per rank at ZeRO-3 = 16 bytes x (split elements / tp + whole elements) / dp of the
    # rank's stage (the tied embedding is held by both stages); ZeRO's row padding adds a little
    whole = {k: v.numel() for k, v in _models.make_gpt().state_dict().items()}
    for rank_results in results:
        held = [n.split(".model.", 1)[1] for n in rank_results[0]["shapes"]]
        split = sum(whole[n] for n in held if _split_over_tp(n))
        expected = 16 * (split / 2 + sum(whole[n] for n in held if not _split_over_tp(n))) / 2
        assert abs(rank_results[0]["state_bytes"] - expected) / expected < 0.03, (rank_results[0]["state_bytes"],
                                                                                   expected)


def _save_pp_tp(path: str, steps: int, rows: int):
    """pp=2 x tp=2: train ``steps`` steps on ``rows``-row global batches, save."""
    torch._dynamo.reset()
    config = _config(0)
    model = zerograph.compile(_models.MODELS["gpt"](), config, example_batch=_batch("gpt", 0, rows))
    opt = _harness._optimizer(model.parameters())
    losses = []
    for step in range(steps):
        losses.append(model.train_step(_batch("gpt", step, rows)))
        opt.step()
        opt.zero_grad()
    zerograph.save_checkpoint(path, model, opt, step=steps)
    return losses, {n: tuple(_local(p).shape) for n, p in model.named_parameters()}


def test_tensor_parallel_pass_on_a_pipeline_stage_golden(fake_world4):
    """Stage 0 of pp=2 x tp=2 (fake process group, rank 0: stage 0, tp index
    0) of a GPT with n_embd 8 and 2 heads: the stage's graph is torch.export's
    ATen IR, and the tensor_parallel pass gives it Megatron's f and g and
    per-rank heads (1) and split sizes (4 of each of q, k, v), as it does
    for a torch-level graph (attention block shown; parameter reads left out)."""
    from expecttest import assert_expected_inline

    from zerograph.graph.format import format_graph
    from zerograph.models import GPT, GPTConfig

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=16, block_size=4, n_layer=2, n_head=2, n_embd=8))
    idx, targets = torch.randint(0, 16, (2, 4)), torch.randint(0, 16, (2, 4))
    model = zerograph.compile(gpt, {"pipeline": {"stages": 2, "micro_batches": 1}, "tensor_parallel": {"autotp_size": 2},
                                    "zerograph": {"device": "cpu"}}, example_batch=(idx, targets))
    assert _harness.tp_local_shape(dict(model.named_parameters())["chunks.0.model.h.0.attn.qkv.weight"]) == (12, 8)
    model.chunks[0](idx)  # compiles stage 0's forward
    lines = format_graph(zerograph.inspect(model).regions[0]["graphs"]["dynamo"], canonical=True).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("tp_copy_default:"))
    end = next(i for i, line in enumerate(lines) if line.startswith("add_2:"))
    attention = [line for line in lines[start:end] if "= unshard(" not in line]
    assert_expected_inline("\n".join(attention), """\
tp_copy_default: f32[2, 4, 8] = zerograph.tp_copy(layer_norm, 'zg0')
linear: f32[2, 4, 12] = aten.linear(tp_copy_default, model_h_0_attn_qkv_weight, model_h_0_attn_qkv_bias)
split_tensor:  = aten.split.Tensor(linear, 4, 2)
getitem: f32[2, 4, 4] = getitem(split_tensor, 0)
getitem_1: f32[2, 4, 4] = getitem(split_tensor, 1)
getitem_2: f32[2, 4, 4] = getitem(split_tensor, 2)
view: f32[2, 4, 1, 4] = aten.view(getitem, [2, 4, 1, 4])
transpose: f32[2, 1, 4, 4] = aten.transpose.int(view, 1, 2)
view_1: f32[2, 4, 1, 4] = aten.view(getitem_1, [2, 4, 1, 4])
transpose_1: f32[2, 1, 4, 4] = aten.transpose.int(view_1, 1, 2)
view_2: f32[2, 4, 1, 4] = aten.view(getitem_2, [2, 4, 1, 4])
transpose_2: f32[2, 1, 4, 4] = aten.transpose.int(view_2, 1, 2)
scaled_dot_product_attention: f32[2, 1, 4, 4] = aten.scaled_dot_product_attention(transpose, transpose_1, transpose_2, None, 0.0, True)
transpose_3: f32[2, 4, 1, 4] = aten.transpose.int(scaled_dot_product_attention, 1, 2)
reshape: f32[2, 4, 4] = aten.reshape(transpose_3, [2, 4, 4])
local_6: f32[8, 4] = to_local(l_call_impl_self_modules_model_modules_h_modules_0_modules_attn_modules_proj_parameters_weight_)
local_7: f32[8] = to_local(l_call_impl_self_modules_model_modules_h_modules_0_modules_attn_modules_proj_parameters_bias_)
linear_1: f32[2, 4, 8] = aten.linear(reshape, model_h_0_attn_proj_weight, None)
tp_all_reduce_default: f32[2, 4, 8] = zerograph.tp_all_reduce(linear_1, 'zg0')
add_1: f32[2, 4, 8] = add(tp_all_reduce_default, model_h_0_attn_proj_bias)""")


def test_3d_config_errors(fake_world):
    """A world size that stages x tp does not divide is a ConfigError naming
    the keys (the vocab-parallel loss and Megatron-SP with pipeline stages:
    tests/pipeline/test_pipeline_tp_sp.py)."""
    example = _batch("gpt", 0, 4)
    with pytest.raises(zerograph.ConfigError, match=r"pipeline.stages=2 x tensor_parallel.autotp_size=2 needs a world "
                                                    r"size that is a multiple of 4; this run has 2 rank\(s\)"):
        zerograph.compile(_models.make_gpt(), _config(0), example_batch=example)
