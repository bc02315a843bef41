"""ZeRO++ qwZ + qgZ composed with pipeline stages (p=2 x dp=2) and tensor
parallelism (tp=2 x dp=2), world 4, gloo, against single-process eager fp32
within the stated quantization bounds (docs/zeropp.md#composition). With
dp = 2, nodes of 2 are the whole data-parallel group, so hpZ is off there
(it needs dp >= 4); qgZ runs one hop over each stage's (or tp slice's)
data-parallel group."""

from __future__ import annotations

import pytest
import torch

import zerograph
from tests import _harness, _models, _pool
from tests.test_zeropp_quantized import _chunk, fake_world4  # noqa: F401  (fixture)
from zerograph.config import Config

TIMEOUT = _harness.TIMEOUT
STEPS = 5
# the default bucket sizes: blocks restart at each parameter inside a bucket, so the bounds of the
# data-parallel-only tests (one message per parameter) hold as they are (docs/zeropp.md#composition)
QUANTIZED = {"zero_quantized_weights": True, "zero_quantized_gradients": True}


def _gaps(result, ref_losses, ref_params, initial) -> tuple[float, float]:
    """The largest relative loss gap, and the largest parameter gap relative
    to how far the fp32 run moved it (norms per tensor)."""
    loss = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], ref_losses))
    param = max(float((result["params"][k] - v).norm() / (v - initial[k].detach()).norm())
                for k, v in ref_params.items() if k in initial)
    return loss, param


def _pipeline_rank(configs: list[dict]):
    """p=2 x dp=2: train_step on this data-parallel rank's rows of each
    global batch of 8 rows (2 micro-batches); losses, full parameters and
    bytes by kind."""
    from tests.pipeline.test_pipeline import GLOBAL_ROWS, _batch, _rows_of

    out = []
    for config in configs:
        torch._dynamo.reset()
        cfg = Config.load(config)
        model = zerograph.compile(_models.make_gpt(), cfg, example_batch=_batch("gpt", 0, GLOBAL_ROWS // 2))
        dp = model.groups.dp
        opt = _harness._optimizer(model.parameters())
        losses = []
        for step in range(STEPS):
            losses.append(model.train_step(_rows_of(_batch("gpt", step, GLOBAL_ROWS), dp.rank, dp.world_size)))
            opt.step()
            opt.zero_grad()
        info = zerograph.inspect(model)
        out.append({"losses": losses, "params": {k: v.float().clone() for k, v in zerograph.full_state_dict(model).items()},
                    "comm_by_phase": _harness._comm_by_phase(info),
                    "passes": sorted({r.name for r in info.passes if r.details.get("collectives")})})
    return out


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
def test_qwz_qgz_with_two_pipeline_stages_times_two_data_parallel():
    """p=2 x dp=2 (world 4), 1F1B, ZeRO-3 in each stage, qwZ + qgZ (int8, and
    int4 gradients): each stage's forward gathers int8 over its 2 data-parallel
    ranks and its gradients go by one all-to-all. Stated: losses within 5e-4
    (int8) / 3e-3 (int4 gradients) relative and each parameter within 10% /
    50% of the fp32 run's update over 5 steps, the bounds of the
    data-parallel-only tests (tests/test_zeropp_quantized.py, test_zeropp_int4.py)."""
    pp = {"stages": 2, "micro_batches": 2}
    configs = [{"pipeline": pp, "zero_optimization": {"stage": 3, **QUANTIZED}},
               {"pipeline": pp, "zero_optimization": {"stage": 3, **QUANTIZED},
                "zerograph": {"zeropp_gradient_bits": 4}}]
    results = _pool.run(_pipeline_rank, 4, configs, timeout=TIMEOUT)
    ref_losses, ref_params = _harness.reference_run("gpt", 2)
    initial = dict(_models.make_gpt().named_parameters())
    for rank_results in results:
        for result, (max_loss, max_param) in zip(rank_results, [(5e-4, 0.1), (3e-3, 0.5)]):
            assert result["passes"] == ["quantize_grad_reduction", "quantize_weight_gathers"], result["passes"]
            assert "all_to_all" in result["comm_by_phase"]["backward"]
            loss, param = _gaps(result, ref_losses, ref_params, initial)
            assert loss < max_loss and param < max_param, (loss, param)
        assert rank_results[0]["losses"] != pytest.approx(ref_losses, rel=1e-7)  # the quantization shows


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
def test_qwz_qgz_with_tensor_parallelism_times_two_data_parallel():
    """tp=2 x dp=2 (world 4, new processes as the other tp x dp tests), ZeRO-3
    over each tp slice's 2 data-parallel ranks: qwZ gathers and qgZ reduces
    the tp-local shards over the dp group only; the tp all-reduces stay fp32.
    Stated: the same bounds as without tp (5e-4 relative loss, 10% of the
    fp32 run's update per parameter, 5 steps); the tp all-reduce bytes equal
    the fp32 run's."""
    from tests.test_tensor_parallel import tp_run
    from zerograph.runtime.launch import spawn

    base = {"tensor_parallel": {"autotp_size": 2}, "zerograph": {"verify_graphs": True}}
    configs = [{**base, "zero_optimization": {"stage": 3}}, {**base, "zero_optimization": {"stage": 3, **QUANTIZED}}]
    results = spawn(tp_run, 4, "gpt_untied", configs, timeout=TIMEOUT)
    ref_losses, ref_params = _harness.reference_run("gpt_untied", 2)
    initial = dict(_models.make_gpt_untied().named_parameters())
    for plain, quantized in results:
        assert _gaps(plain, ref_losses, ref_params, initial)[1] < 1e-3  # fp32 tp x dp: exact up to round-off
        loss, param = _gaps(quantized, ref_losses, ref_params, initial)
        assert loss < 5e-4 and param < 0.1, (loss, param)
        assert quantized["losses"] != pytest.approx(plain["losses"], rel=1e-7)  # the quantization shows
        assert quantized["comm"]["tp_all_reduce"] == plain["comm"]["tp_all_reduce"] > 0
        assert quantized["comm"]["all_to_all"] > 0 and quantized["comm"].get("reduce_scatter", 0) == 0
        assert quantized["comm"]["all_gather"] < plain["comm"]["all_gather"]  # int8 forward gathers


def test_qwz_qgz_rewrite_only_the_data_parallel_collectives_under_tensor_parallelism(fake_world4):
    """The cheap CI case of the tp x dp composition (fake process group, rank
    1 of tp=2 x dp=2): qwZ and qgZ rewrite every ZeRO-3 gather and reduction,
    which run over the 2 data-parallel ranks of this rank's tp slice, and
    leave the tp all-reduces fp32; the int8 messages are the per-parameter
    formula W * (n + 4 * ceil(n / 256)) over the tp-local shards."""
    from zerograph.graph.tags import get_tag
    from zerograph.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=_models.VOCAB, block_size=_models.SEQ, n_layer=1, n_head=2, n_embd=30))
    idx, targets = _models.global_batch(0, 2)
    config = {"zero_optimization": {"stage": 3, **QUANTIZED}, "tensor_parallel": {"autotp_size": 2},
              "zerograph": {"device": "cpu", "nonfinite_grads": "ignore"}}
    net = zerograph.compile(model, config, example_batch=(idx, targets))
    net(idx, targets).loss.backward()
    info = zerograph.inspect(net)
    records = {(r.phase, r.name): r.details for r in info.passes if r.details.get("collectives")}
    gathers = records[("forward", "quantize_weight_gathers")]
    reductions = records[("backward", "quantize_grad_reduction")]
    shards = dict(net.named_parameters())
    assert sorted(gathers["quantized"]) == sorted(reductions["quantized"]) == sorted(shards)
    collectives = [(get_tag(n).role, get_tag(n).mesh_dim, n.args[0].meta["val"].dtype)
                   for gm in (*info.forward, *info.backward) for n in gm.graph.nodes
                   if get_tag(n) is not None and get_tag(n).role in ("all_gather", "all_to_all", "all_reduce",
                                                                     "reduce_scatter")]
    assert {c for c in collectives if c[1] == "dp"} == {("all_gather", "dp", torch.int8),
                                                        ("all_to_all", "dp", torch.int8),
                                                        ("all_gather", "dp", torch.float32)}  # backward re-gather
    assert {c for c in collectives if c[1] == "tp"} == {("all_reduce", "tp", torch.float32)}
    # each parameter's tp slice (the (dp, tp) DTensor has the whole shape), as a shape-only tensor
    slices = [torch.empty(_harness.tp_local_shape(p), device="meta") for p in net.parameters()]
    packed = sum(2 * (n + 4 * -(-n // 256)) for n in (_chunk(p, 2) for p in slices))
    assert gathers["bytes_before"] == 4 * sum(2 * _chunk(p, 2) for p in slices)
    assert gathers["bytes_after"] == reductions["bytes_after"] == packed
