"""The built-in pass pipeline, in order."""

from __future__ import annotations

from zerograph.config import Config
from zerograph.runtime.dist import rank_and_world
from zerograph.runtime.plan import ParallelPlan
from zerograph.passes.activation_checkpointing import activation_checkpointing
from zerograph.passes.comm_analysis import comm_analysis
from zerograph.passes.dce import dce
from zerograph.passes.dedupe_markers import dedupe_markers
from zerograph.passes.defer_grad_sync import defer_grad_sync
from zerograph.passes.fusion import FUSION_PASSES
from zerograph.passes.hpz import hpz_secondary
from zerograph.passes.liveness import liveness
from zerograph.passes.lower_markers import lower_markers
from zerograph.passes.lower_sp_markers import lower_sp_markers
from zerograph.passes.lower_tp_markers import lower_tp_markers
from zerograph.passes.manager import GraphPass, PassList
from zerograph.passes.nvme_read_ahead import nvme_read_ahead
from zerograph.passes.reuse_comm_buffers import reuse_comm_buffers
from zerograph.passes.schedule_collectives import schedule_collectives
from zerograph.passes.sequence_parallel import sequence_parallel
from zerograph.passes.sequence_tiling import sequence_tiling
from zerograph.passes.tag_nodes import tag_nodes
from zerograph.passes.tensor_parallel import tensor_parallel
from zerograph.passes.tp_regather import tp_regather
from zerograph.passes.zero_policy import zero_policy
from zerograph.passes.zeropp_quantize import quantize_grad_reduction, quantize_weight_gathers


def _sharded(config, plan) -> bool:
    return plan is not None


def _tensor_parallel(config, plan) -> bool:
    return plan is not None and plan.tp_size > 1


def _tp_regather(config, plan) -> bool:
    zg = config.zerograph
    return _tensor_parallel(config, plan) and zg.tp_sequence_parallel and zg.tp_sequence_parallel_regather


def _sequence_parallel(config, plan) -> bool:
    return plan is not None and plan.sp_size > 1


def _tiling(config, plan) -> bool:
    return config.zerograph.sequence_tiling is not None


def _fusion(config, plan) -> bool:
    return bool(config.zerograph.fusion)


def _regathers(config, plan) -> bool:
    return plan is not None and plan.zero.regathers_in_backward


def _hpz(config, plan) -> bool:
    return plan is not None and plan.zero.zeropp.hpz


def _qwz(config, plan) -> bool:
    return plan is not None and plan.zero.zeropp.qwz


def _qgz(config, plan) -> bool:
    return plan is not None and plan.zero.zeropp.qgz


def _checkpointing(config, plan) -> bool:
    ac = config.activation_checkpointing
    return ac.policy != "none" or bool(ac.offload_activations)


def _defers_grad_sync(config, plan) -> bool:
    return plan is not None and plan.defers_grad_sync


def _nvme_params(config, plan) -> bool:
    return plan is not None and config.zero_optimization.offload_param.device == "nvme"


def _overlaps(config, plan) -> bool:
    return plan is not None and bool(config.zero_optimization.overlap_comm)


def _eager_buffers(config, plan) -> bool:
    # Inductor plans its own buffers
    return plan is not None and config.zerograph.compiler == "eager"


def default_passes(config=None, plan=None, *, sharded: bool = True) -> PassList:
    """The built-in pipeline, in order.

    Without a ``config``: every built-in pass (the list to edit and give to
    ``zerograph.compile``, which runs only those that apply). Given a
    ``config`` (a :class:`~zerograph.config.Config`, dict or path), only the
    passes that do something for it and for ``plan`` (default: the
    :class:`~zerograph.runtime.plan.ParallelPlan` of a model sharded over the
    current process group; ``sharded=False``: a model zerograph did not
    shard), as ``zerograph.inspect`` will list them."""
    passes = PassList(
        [
            GraphPass("tensor_parallel", tensor_parallel, phases=("dynamo",), applies=_tensor_parallel,
                      ensures=("tensor_parallel",)),
            GraphPass("sequence_parallel", sequence_parallel, phases=("dynamo",), applies=_sequence_parallel,
                      ensures=("sequence_parallel",)),
            GraphPass("sequence_tiling", sequence_tiling, phases=("dynamo",), applies=_tiling),
            GraphPass("dedupe_markers", dedupe_markers, phases=("dynamo",), applies=_sharded,
                      ensures=("markers_deduplicated",)),
            *(GraphPass(name, fn, phases=("dynamo",), applies=_fusion) for name, fn in FUSION_PASSES),
            GraphPass("tag_nodes", tag_nodes, phases=("joint", "forward", "backward", "inference"),
                      ensures=("tagged",)),
            GraphPass("zero_policy", zero_policy, phases=("joint",), applies=_regathers,
                      requires=("tagged",), ensures=("recompute_policy",)),
            GraphPass("tp_regather", tp_regather, phases=("joint",), applies=_tp_regather, requires=("tagged",),
                      ensures=("recompute_policy",)),
            GraphPass("activation_checkpointing", activation_checkpointing, phases=("joint",),
                      applies=_checkpointing, requires=("tagged",), ensures=("recompute_policy",)),
            GraphPass("hpz_secondary", hpz_secondary, phases=("joint",), applies=_hpz,
                      requires=("tagged", "recompute_policy")),
            GraphPass("defer_grad_sync", defer_grad_sync, phases=("backward",), applies=_defers_grad_sync),
            GraphPass("lower_markers", lower_markers, applies=_sharded, requires=("tagged",),
                      ensures=("collectives",)),
            GraphPass("lower_tp_markers", lower_tp_markers, applies=_tensor_parallel, requires=("tagged",),
                      ensures=("collectives",)),
            GraphPass("lower_sp_markers", lower_sp_markers, applies=_sequence_parallel, requires=("tagged",),
                      ensures=("collectives",)),
            GraphPass("quantize_weight_gathers", quantize_weight_gathers, phases=("forward", "inference"),
                      applies=_qwz, requires=("collectives",)),
            GraphPass("quantize_grad_reduction", quantize_grad_reduction, phases=("backward",), applies=_qgz,
                      requires=("collectives",)),
            GraphPass("schedule_collectives", schedule_collectives, applies=_overlaps,
                      requires=("collectives",), ensures=("scheduled",)),
            GraphPass("nvme_read_ahead", nvme_read_ahead, applies=_nvme_params, requires=("collectives",)),
            GraphPass("dce", dce),
            GraphPass("reuse_comm_buffers", reuse_comm_buffers, applies=_eager_buffers, requires=("collectives",)),
            GraphPass("comm_analysis", comm_analysis, analysis=True),
            GraphPass("liveness", liveness, analysis=True),
        ]
    )
    if config is None:
        return passes
    config = Config.load(config)
    if plan is None and sharded:
        _, world = rank_and_world()
        tp = max(1, config.tensor_parallel.autotp_size)
        sp = max(1, config.sequence_parallel_size)
        plan = ParallelPlan.build(config, {"dp": max(1, world // (tp * sp)), "sp": sp, "tp": tp})
    return passes.active(config, plan)
