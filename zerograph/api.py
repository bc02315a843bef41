"""The user-facing entry points: ``compile``, ``inspect``, ``full_state_dict``."""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from zerograph.backend import ZerographBackend
from zerograph.graph import markers, sp_ops, tp_markers  # noqa: F401  (registers the marker ops graphs call)
from zerograph.config import Config, ConfigError
from zerograph.passes import PassList, PassRecord, default_passes
from zerograph.runtime.state import ModelState, check_position, context_of
from zerograph.pipeline.step import eager_eval_step, eager_train_step, evaluating
from zerograph.runtime.agreement import StepCheck, agree, model_id, setup_fingerprint
from zerograph.runtime.dist import DataParallelGroup, PipelineGroups, RankMonitor, ensure_process_group
from zerograph.runtime.errors import naming_failed_ranks
from zerograph.runtime.hierarchy import node_groups
from zerograph.runtime.mesh import mesh_of_config
from zerograph.runtime.offload import watch_plain_optimizer
from zerograph.runtime.plan import ParallelPlan
from zerograph.runtime.sequence import slice_sequences
from zerograph.runtime.training import TrainingRuntime, failure_translator
from zerograph.runtime.sharding import full_state_dict as _full_state_dict
from zerograph.runtime.sharding import shard_parameters

log = logging.getLogger(__name__)

__all__ = ["compile", "shard", "inspect", "full_state_dict", "batch_rows", "sequence_slice", "sequence_shard",
           "feed_sequence_slices", "Inspection"]


def _zerograph_call(self, *args, **kwargs):
    ctx = self._zg_runtime.ctx
    if ctx.sp is not None:
        if self._zg_runtime.compiled == self._call_impl and not torch.compiler.is_compiling():
            raise ValueError(
                f"sequence_parallel_size={ctx.sp.world_size}: {type(self).__name__} runs uncompiled (zerograph.shard), "
                "so attention would see only this rank's part of each sequence; use zerograph.compile(model, "
                "config) or torch.compile(model, backend=\"zerograph\")")
        if not ctx.sp_presliced:  # each rank's part of every sequence
            args, kwargs = slice_sequences(self, ctx.plan, args, kwargs)
    return self._zg_runtime(*args, **kwargs)


def _zerograph_train_step(self, batch) -> float:
    """One optimizer step's forward and backward passes over ``batch`` (this
    rank's rows), split into ``gradient_accumulation_steps`` micro-batches;
    returns the mean loss over micro-batches and data-parallel ranks. Then
    call ``opt.step()`` and ``opt.zero_grad()`` (the same loop as a pipeline)."""
    ctx = self._zg_runtime.ctx
    with naming_failed_ranks(ctx, "optimizer step boundary"):  # the loss all-reduce; passes name their own
        return eager_train_step(self, batch, ctx.loss_fn, ctx.config.gradient_accumulation_steps,
                                ctx.dp.group, ctx.world_size, ctx.dp.device)


def _zerograph_eval_step(self, batch) -> float:
    """The forwards of ``train_step`` under ``torch.no_grad()``: the mean loss
    over the ``gradient_accumulation_steps`` micro-batches of ``batch`` and
    the data-parallel ranks, without gradients and without touching the step
    counters, the step's communication counts or the RNG state. The model
    runs in its own mode (``model.eval()`` turns dropout off)."""
    ctx = self._zg_runtime.ctx
    with evaluating([ctx], ctx.dp.device), naming_failed_ranks(ctx, "eval_step"):
        return eager_eval_step(self, batch, ctx.loss_fn, ctx.config.gradient_accumulation_steps,
                               ctx.dp.group, ctx.world_size, ctx.dp.device)


def _save_pretrained_of(base: type):
    """Hugging Face's ``save_pretrained`` for a sharded ``base`` model: it would
    write this rank's DTensor shards, so it is refused unless given a full
    ``state_dict``."""

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        if state_dict is None and any(isinstance(p, DTensor) for p in self.parameters()):
            raise TypeError(
                f"{base.__name__}.save_pretrained would save this rank's ZeRO shards, not the model: call "
                "zerograph.export_pretrained(model, path) on every rank instead (it gathers the full weights and "
                "writes them from rank 0), or pass state_dict=zerograph.full_state_dict(model), gathered on "
                "every rank"
            )
        return base.save_pretrained(self, save_directory, *args, state_dict=state_dict, **kwargs)

    return save_pretrained


def shard(
    model: nn.Module,
    config: Config | dict | str | os.PathLike | None = None,
    *,
    passes: PassList | None = None,
    loss_fn=None,
    group: DataParallelGroup | PipelineGroups | None = None,
    example_batch=None,
    _tp_layouts: dict | None = None,
) -> nn.Module:
    """Shard ``model`` for ZeRO without compiling it (collective: call on every rank).

    ``loss_fn(outputs, batch)`` is what ``model.train_step(batch)`` minimises
    (default: the output's ``.loss``). ``group``: the data-parallel ranks to
    shard over (default: every rank; pipeline stages pass their own, with
    tensor parallelism their place on the mesh and ``_tp_layouts``, the
    splits decided on the whole model).
    ``example_batch``: with ``tensor_parallel.autotp_size`` > 1 and neither
    layer specs nor a Hugging Face tp plan, the model is traced on it once to
    find the layers to split (docs/tensor_parallel.md).

    The returned module (the same object) is correct when run eagerly: its
    marker ops communicate. ``torch.compile(model, backend="zerograph")``
    then compiles it with this config and pass list.
    """
    cfg = Config.load(config)
    prepared = getattr(getattr(model, "_orig_mod", model), "_zg_runtime", None)
    if prepared is not None:
        raise ValueError(
            f"zerograph: this {type(model).__name__} is already prepared by zerograph.compile/shard (ZeRO stage "
            f"{prepared.ctx.config.stage}); its parameters are shards. Use it as it is, or pass a fresh "
            "nn.Module (for another config, load the weights into it: "
            "model.load_state_dict(zerograph.full_state_dict(prepared_model)))"
        )
    for line in cfg.inactive_settings():
        log.warning("zerograph: %s", line)
    pass_list = passes.copy() if passes is not None else default_passes()
    known = set(pass_list.names) | set(default_passes().names)  # a list filtered by default_passes(config) too
    for name in cfg.zerograph.disabled_passes:
        if name not in known:
            raise ConfigError(
                f"zerograph.disabled_passes: no pass named {name!r}; passes are: {', '.join(pass_list.names)}"
            )
    if cfg.pipeline.stages > 1:
        raise ConfigError(
            f"pipeline.stages={cfg.pipeline.stages}: zerograph.shard cannot split a model into pipeline stages; "
            "use zerograph.compile(model, config, example_batch=batch)"
        )
    model_device = next(iter(model.parameters()), torch.empty(0)).device
    timeout_s = cfg.zerograph.collective_timeout_s
    ensure_process_group(timeout_s)
    setup_group = group.group if group is not None else (dist.group.WORLD if dist.is_initialized() else None)
    checked = _communicates(setup_group)
    ranks = dist.get_process_group_ranks(setup_group) if checked else [0]
    # heartbeats from the start, so that a rank missing from (or dying in) the setup is named
    monitor = RankMonitor.for_group(setup_group, timeout_s) if checked else None
    setup = SimpleNamespace(collective_failure=failure_translator(monitor, timeout_s))
    try:
        with naming_failed_ranks(setup, "zerograph.compile/shard"):
            world = dist.get_world_size(setup_group) if checked else 1
            fingerprint = setup_fingerprint(cfg, model, world_size=world, group_ranks=ranks,
                                            passes=_enabled_pass_names(pass_list))
            if checked:  # before any other collective: mismatched ranks raise here, on every rank. Ranks
                # reach compile at different times (loading data, weights): this first meeting waits as
                # long as the process group's own timeout; collective_timeout_s applies from the next one
                agree(setup_group, fingerprint, "zerograph.compile/shard")
            dp, sp, tp, mesh, coords = _mesh_setup(cfg, group, model_device)
            tp_layouts = None
            if tp is not None:  # a pipeline stage's splits were decided on the whole model
                tp_layouts = (dict(_tp_layouts or {}) if isinstance(group, PipelineGroups)
                              else _tp_layouts_of(model, cfg, example_batch, tp))
            cfg = cfg.with_resolved_batch(mesh["dp"])  # derived accumulation steps take effect
            plan = ParallelPlan.build(cfg, mesh, coords)
            ctx = ModelState(cfg, dp, plan, loss_fn=loss_fn)
            ctx.tp, ctx.sp = tp, sp
            ctx.node_groups = node_groups(dp, plan.zero.zeropp.node_size, timeout_s)
            step_check = StepCheck(ranks, model_id(fingerprint), timeout_s) if checked else None
            runtime = TrainingRuntime(ctx, model._call_impl, [], monitor=monitor, step_check=step_check)
            with naming_failed_ranks(ctx, "zerograph.compile/shard"):  # the parameters' broadcast and scatter
                shard_parameters(model, ctx, tp_layouts)
    except BaseException:
        if monitor is not None:
            monitor.stop()
        raise
    ctx.backend = ZerographBackend(ctx, passes=pass_list)
    params = list(dict.fromkeys(model.parameters()))
    runtime.params = params
    model._zg_runtime = runtime
    model._zg_runtime.named_params = dict(model.named_parameters())
    model._zg_runtime.model_ref = weakref.ref(model)
    if cfg.zero_optimization.offload_optimizer.device != "none":
        # warns when a plain torch optimizer, not make_optimizer's, steps these parameters
        watch_plain_optimizer(model, params)
    base = type(model)
    attrs = {
        "__call__": _zerograph_call,
        "train_step": _zerograph_train_step,
        "eval_step": _zerograph_eval_step,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
    }
    if callable(getattr(base, "save_pretrained", None)):  # Hugging Face
        attrs["save_pretrained"] = _save_pretrained_of(base)
    model.__class__ = type(base.__name__, (base,), attrs)
    log.info("zerograph: sharded %s with ZeRO stage %d on %d rank(s)", base.__name__, cfg.stage, dp.world_size)
    return model


def _communicates(group) -> bool:
    """Whether ``group`` (None: no process group) has several ranks on a real
    backend (gloo/NCCL; not the fake test backend): then ranks must agree."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return False
    backend = str(dist.get_backend(group)).lower()
    return "gloo" in backend or "nccl" in backend


def _agreed(model: nn.Module, cfg: Config, passes: PassList | None, build):
    """``build()`` after every rank of the world agreed on the whole model and
    config (a pipeline: each stage's ranks then agree on their stage in
    ``shard``), with a failed collective in either naming the dead rank."""
    timeout_s = cfg.zerograph.collective_timeout_s
    ensure_process_group(timeout_s)
    world = dist.group.WORLD if dist.is_initialized() else None
    if not _communicates(world):
        return build()
    monitor = RankMonitor.for_group(world, timeout_s)
    setup = SimpleNamespace(collective_failure=failure_translator(monitor, timeout_s))
    try:
        with naming_failed_ranks(setup, "zerograph.compile"):
            fingerprint = setup_fingerprint(cfg, model, world_size=dist.get_world_size(),
                                            group_ranks=list(range(dist.get_world_size())),
                                            passes=_enabled_pass_names(passes or default_passes()))
            agree(world, fingerprint, "zerograph.compile")
            return build()
    finally:
        monitor.stop()


def _enabled_pass_names(pass_list: PassList) -> list[str]:
    return [p.name for p in pass_list if any(p in pass_list.enabled(phase) for phase in p.phases)]


def _mesh_setup(cfg: Config, group, model_device):
    """ZeRO's group (dp x sp ranks of one tp index), the sequence- and
    tensor-parallel groups (None when their size is 1), and the plan's mesh
    sizes and this rank's indices (without "pp": a stage adds it,
    ``ModelState.enter_pipeline``). ``group``: a pipeline stage's
    :class:`PipelineGroups`, a data-parallel group, or None (the one mesh
    over every rank, :func:`zerograph.runtime.mesh.build_mesh`)."""
    sp, tp = cfg.sequence_parallel_size, max(1, cfg.tensor_parallel.autotp_size)
    if isinstance(group, PipelineGroups):  # a pipeline stage (docs/pipeline.md)
        zero = group.zero if group.zero is not None else group.dp
    elif group is not None:
        if sp > 1:
            raise ConfigError(f"sequence_parallel_size={sp} with a given data-parallel group is not supported yet; "
                              "remove sequence_parallel_size or the group (pipeline stages build their own)")
        if tp > 1:
            raise ConfigError(f"tensor_parallel.autotp_size={tp} with a given data-parallel group is not supported; "
                              "leave group out (zerograph builds the (dp, tp) mesh), or remove the tensor_parallel "
                              "section")
        return group, None, None, {"dp": group.world_size}, {"dp": group.rank}
    else:
        group = mesh_of_config(cfg, model_device)
        zero = group.zero
    mesh = {"dp": zero.world_size // sp, "sp": sp, "tp": tp}
    coords = {"dp": zero.rank // sp, "sp": group.sp.rank if group.sp is not None else 0,
              "tp": group.tp.rank if group.tp is not None else 0}
    return zero, group.sp, group.tp, mesh, coords


def _tp_layouts_of(model, cfg: Config, example_batch, tp) -> dict:
    """Parameter FQN -> this tp rank's layout, from the plan's split decision."""
    from zerograph.backend.capture import capture_graphs
    from zerograph.planner.tp_plan import decide_splits, describe, tp_layouts

    capture = None if example_batch is None else (lambda: capture_graphs(model, example_batch))
    splits = decide_splits(model, cfg.tensor_parallel.partition_config, capture, cfg.zerograph.tp_vocab_parallel)
    log.info("zerograph: tensor parallelism over %d ranks splits %d layer(s) of %s:\n%s", tp.world_size, len(splits),
             type(model).__name__, describe(splits))
    return tp_layouts(model, splits, tp.world_size, tp.rank)


def batch_rows(model: nn.Module, global_rows: int) -> slice:
    """The rows of each global batch of ``global_rows`` rows that this rank
    reads: its data-parallel index's share. The tensor-parallel ranks of one
    data-parallel index read the same rows (docs/tensor_parallel.md)::

        idx = global_idx[zerograph.batch_rows(model, len(global_idx))]
    """
    return _context(getattr(model, "_orig_mod", model)).plan.batch_rows(global_rows)


def sequence_slice(model: nn.Module, seq_len: int) -> slice:
    """The positions of every ``seq_len``-token sequence this rank computes
    with ``sequence_parallel_size`` > 1 (docs/long_sequences.md)."""
    return _context(getattr(model, "_orig_mod", model)).plan.sequence_slice(seq_len)


def sequence_shard(model: nn.Module, *args, **kwargs):
    """This rank's part of a call's full-length sequences, cut as zerograph
    cuts full rows itself (Hugging Face labels shifted first, global
    ``position_ids`` added): ``args, kwargs``. For a loader that feeds only
    the slices: call it, then ``feed_sequence_slices(model)``."""
    module = getattr(model, "_orig_mod", model)
    return slice_sequences(module, _context(module).plan, args, kwargs)


def feed_sequence_slices(model: nn.Module, presliced: bool = True) -> None:
    """From now on the caller gives each rank only its slice of every sequence
    (``sequence_shard``'s result); ``False``: zerograph cuts full rows again."""
    _context(getattr(model, "_orig_mod", model)).sp_presliced = presliced


def compile(
    model: nn.Module,
    config: Config | dict | str | os.PathLike | None = None,
    *,
    passes: PassList | None = None,
    dynamic: bool | None = None,
    fullgraph: bool = False,
    loss_fn=None,
    example_batch=None,
    group: DataParallelGroup | PipelineGroups | None = None,
    _tp_layouts: dict | None = None,
) -> nn.Module:
    """Shard ``model`` for ZeRO and compile it with zerograph's passes.

    Returns the same module object, whose parameters are now this rank's
    shards (DTensors) and whose calls run the compiled graphs. Collective:
    call it on every rank.

    With ``pipeline.stages > 1`` it returns a
    :class:`~zerograph.pipeline.PipelineModel` holding this rank's stage
    instead: the model is traced on ``example_batch`` (required) and split
    (docs/pipeline.md); train it with ``model.train_step(batch)``.
    """
    cfg = Config.load(config)
    if cfg.pipeline.stages > 1:
        from zerograph.pipeline.build import compile_pipeline

        def compile_stage(stage, stage_cfg, group, tp_layouts=None):
            return compile(stage, stage_cfg, passes=passes, dynamic=dynamic, fullgraph=fullgraph, group=group,
                           _tp_layouts=tp_layouts)

        def split_tp(whole, micro, tp):  # decided on the whole model, before it is traced and split
            return _tp_layouts_of(whole, cfg, micro, tp)

        return _agreed(model, cfg, passes, lambda: compile_pipeline(
            model, cfg, example_batch=example_batch, loss_fn=loss_fn, compile_stage=compile_stage,
            split_tp=split_tp))
    model = shard(model, cfg, passes=passes, loss_fn=loss_fn, group=group, example_batch=example_batch,
                  _tp_layouts=_tp_layouts)
    runtime = model._zg_runtime
    backend = runtime.ctx.backend
    call_impl = model._call_impl

    def call_model(*args, **kwargs):
        # A frame of zerograph's own, so Dynamo traces the module call even
        # when the model's forward is a torch.nn class (nn.Sequential).
        return call_impl(*args, **kwargs)

    # Dynamo keeps its compiled graphs and its recompile limit per code object: a
    # code object of this model's own keeps models compiled in one process (or a
    # pipeline rank's stages) from sharing, and exhausting, one budget
    call_model.__code__ = call_model.__code__.replace()
    runtime.compiled = torch.compile(call_model, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every sharded tensor gathered (collective:
    call it on every rank; a rank that dies meanwhile ends the others with a
    RankFailureError naming it). Keys are the original model's keys; a
    pipeline model's state dict covers every stage."""
    if hasattr(model, "_split") and hasattr(model, "full_state_dict"):
        return model.full_state_dict()
    ctx = context_of(model)
    with naming_failed_ranks(ctx, "zerograph.full_state_dict"):
        check_position(ctx, "zerograph.full_state_dict")
        return _full_state_dict(model)


@dataclasses.dataclass
class Inspection:
    """What zerograph did to a model: one entry per compiled region (Dynamo graph)."""

    regions: list[dict[str, Any]]
    passes: list[PassRecord]
    comm_bytes_last_step: dict[str, int]
    # the compile steps that ran, region by region, in order (zerograph.backend.steps.StepRecord)
    steps: list = dataclasses.field(default_factory=list)
    # the liveness analysis of the final graphs (zerograph.planner.step_plan.MemoryPlan; docs/planner.md)
    memory: Any = None
    # with zerograph.track_memory: the measuring interpreter's record (zerograph.planner.measured.MemoryTracker)
    memory_measured: Any = None
    # comm_bytes_last_step by scope: "intra_group" (collectives inside a node,
    # ZeRO++'s node groups) and "cross_group" (the rest), then by kind
    comm_bytes_by_scope_last_step: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    # NVMe offload: this rank's disk and mapped bytes (zerograph.planner.nvme.NvmePlan; None without it)
    nvme: Any = None

    @property
    def forward(self) -> list[torch.fx.GraphModule]:
        return [r["graphs"]["forward"] for r in self.regions if "forward" in r["graphs"]]

    @property
    def backward(self) -> list[torch.fx.GraphModule]:
        return [r["graphs"]["backward"] for r in self.regions if "backward" in r["graphs"]]

    def summary(self) -> str:
        """The compile steps and, under each ``*_passes`` step, the passes that ran."""
        lines = [f"{len(self.regions)} compiled region(s)"]
        for region in self.regions:
            stage = "" if region["stage"] is None else f" (pipeline stage {region['stage']})"
            lines.append(f"region {region['index']}{stage}:")
            records = region["pass_records"]
            for step in region["steps"]:
                lines.append("  " + step.summary())
                if step.name.endswith("_passes"):
                    lines += ["    " + r.summary() for r in records.get(step.phase, ())]
        fused: dict[str, int] = {}
        for r in self.passes:
            for k, v in getattr(r, "counts", {}).items():
                fused[k] = fused.get(k, 0) + v
        if fused:
            lines.append("fused patterns: " + ", ".join(f"{k}={v}" for k, v in sorted(fused.items())))
        lines.append("communication last step (bytes): " + ", ".join(f"{k}={v}" for k, v in self.comm_bytes_last_step.items()))
        intra = self.comm_bytes_by_scope_last_step.get("intra_group", {})
        if any(intra.values()):  # ZeRO++ node groups: where the bytes went
            for scope, counts in self.comm_bytes_by_scope_last_step.items():
                lines.append(f"  {scope.replace('_', '-')} (bytes): " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        return "\n".join(lines)


def _context(model: nn.Module) -> ModelState:
    runtime = getattr(model, "_zg_runtime", None)
    if runtime is None:
        raise TypeError(f"{type(model).__name__} was not compiled by zerograph.compile; call zerograph.compile(model, config) first")
    return runtime.ctx


def inspect(model: nn.Module) -> Inspection:
    """The final forward/backward graphs, the passes applied (time, nodes
    added/removed) and this rank's communication bytes in the last step.

    A pipeline model with several stages on this rank (interleaved 1F1B) shows
    all of them: each region says its model ``stage`` (``None`` without a
    pipeline), passes and regions are listed stage by stage, and the
    communication bytes are summed over the stages."""
    parts = _stage_contexts(model)
    regions = [
        {"index": r.index, "stage": stage, "graphs": dict(r.graphs), "comm_bytes": dict(r.comm_bytes),
         "comm_bytes_by_scope": dict(r.comm_bytes_by_scope),
         "steps": list(r.step_records), "pass_records": dict(r.pass_records)}
        for stage, ctx in parts for r in ctx.regions
    ]
    records = [rec for _, ctx in parts for r in ctx.regions for recs in r.pass_records.values() for rec in recs]
    from zerograph.planner.nvme import nvme_plan
    from zerograph.planner.step_plan import plan_model

    first = parts[0][1]
    # the regions' execution order as the runtime recorded it (one context:
    # several pipeline stages on a rank interleave micro-batches, unknown here)
    order = list(first.region_order) if len(parts) == 1 and first.region_order else None
    memory = plan_model([r for _, ctx in parts for r in ctx.regions], first.config.gradient_accumulation_steps,
                        order)
    comm: dict[str, int] = {}
    by_scope: dict[str, dict[str, int]] = {}
    for _, ctx in parts:
        for kind, nbytes in ctx.stats.last_step.items():
            comm[kind] = comm.get(kind, 0) + nbytes
        for scope, counts in ctx.stats.last_step_by_scope.items():
            for kind, nbytes in counts.items():
                by_scope.setdefault(scope, {})[kind] = by_scope.get(scope, {}).get(kind, 0) + nbytes
    steps = [step for region in regions for step in region["steps"]]
    return Inspection(regions=regions, passes=records, comm_bytes_last_step=comm, steps=steps,
                      memory=memory, memory_measured=first.stats.memory, comm_bytes_by_scope_last_step=by_scope,
                      nvme=nvme_plan(first))


def _stage_contexts(model: nn.Module) -> list[tuple[Optional[int], ModelState]]:
    """``(model stage, context)`` of each compiled part of ``model`` on this rank."""
    stages = getattr(model, "stage_runtimes", None)
    if callable(stages):
        return [(stage, runtime.ctx) for stage, runtime in stages()]
    return [(None, _context(model))]

