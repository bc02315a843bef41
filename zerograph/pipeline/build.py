"""``zerograph.compile`` with ``pipeline.stages > 1``: trace, split, shard, schedule."""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from zerograph.config import Config, ConfigError, PipelineConfig
from zerograph.graph.causal_mask import drop_constant_causal_mask
from zerograph.pipeline import step as step_mod
from zerograph.pipeline.modes import follow_training_mode
from zerograph.pipeline.runtime import PipelineModel
from zerograph.pipeline.schedule import build
from zerograph.pipeline.simulate import format_grid, simulate
from zerograph.pipeline.split import split_graph
from zerograph.pipeline.tp_boundary import sequence_sharded, shard_boundaries
from zerograph.runtime.mesh import mesh_of_config
from zerograph.runtime.sequence import slice_sequences

log = logging.getLogger(__name__)

_DROPPED = (torch.ops.aten._assert_tensor_metadata.default,)


def trace(model: nn.Module, micro_batch, loss_fn) -> torch.fx.GraphModule:
    """The model's forward plus loss on one micro-batch, as an unlifted
    ``torch.export`` graph ``forward(*batch_tensors) -> (loss,)``.

    ``aten._assert_tensor_metadata`` checks are dropped (they pin the traced
    dtypes, which mixed precision changes), and so is export's input-guard
    call, which would make the first stage read every batch tensor; the
    runtime checks micro-batch shapes itself."""
    flat = tuple(step_mod.flat_tensors(micro_batch))
    wrapper = step_mod.LossModule(model, micro_batch, loss_fn)
    try:
        exported = torch.export.export(wrapper, flat, strict=False)
    except Exception as exc:
        raise RuntimeError(
            f"pipeline parallelism could not trace {type(model).__name__} with torch.export: {exc}. "
            "Make the forward export-compatible (no data-dependent Python control flow on tensor values), "
            "or pass loss_fn if the loss is computed outside the model"
        ) from exc
    gm = exported.module()
    for sub in gm.modules():  # the root and the bodies of higher-order ops
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        for node in list(sub.graph.nodes):
            dropped = node.op == "call_function" and node.target in _DROPPED
            guards = node.op == "call_module" and node.target == "_guards_fn"  # export's input checks
            if (dropped or guards) and not node.users:
                sub.graph.erase_node(node)
        sub.recompile()
    return gm


def compile_pipeline(model: nn.Module, cfg: Config, *, example_batch, loss_fn,
                     compile_stage: Callable[..., nn.Module], split_tp: Callable[..., dict] | None = None) -> PipelineModel:
    """``compile_stage(module, config, group, tp_layouts)`` compiles one stage;
    with ``tensor_parallel.autotp_size`` > 1, ``split_tp(model, micro_batch,
    tp_group)`` decides on the whole model how each parameter is cut (FQN ->
    layout), and every stage applies that to its own parameters (3D
    parallelism, docs/tensor_parallel.md)."""
    p = cfg.pipeline.stages
    v = cfg.pipeline.chunks  # model stages per rank (virtual stages)
    if example_batch is None:
        raise ConfigError(
            f"pipeline.stages={p}: zerograph.compile traces the model to split it, so it needs one batch: "
            "zerograph.compile(model, config, example_batch=batch) with a batch like those given to train_step"
        )
    if cfg.fp16.enabled:
        raise ConfigError("fp16 loss scaling is not supported with pipeline parallelism yet; use bf16 or fp32")
    m = cfg.micro_batches
    try:
        schedule = build(cfg.pipeline.schedule, p, m, v)
    except ValueError as exc:  # e.g. micro-batches from gradient_accumulation_steps not a multiple of p
        raise ConfigError(str(exc)) from None
    timeline = simulate(schedule)  # raises ScheduleError before anything runs
    sp = cfg.sequence_parallel_size
    groups = mesh_of_config(cfg).pipeline()  # the one ("pp", "dp", "sp", "tp") mesh (zerograph.runtime.mesh)
    cfg.resolve_batch(groups.dp.world_size)
    log.info("pipeline schedule %s (bubble %.3f):\n%s", schedule.name, timeline.bubble_fraction, format_grid(timeline))
    device = groups.dp.device
    fallback = {k: v.detach() for k, v in model.state_dict().items()}
    model.to(device)
    cut = sequence_cutter(model, groups) if sp > 1 else None  # each sp rank traces its slice of the sequence
    micro = step_mod.split_batch(cut(example_batch) if cut else example_batch, m)[0]
    micro = step_mod.with_tensors(micro, [t.to(device) for t in step_mod.flat_tensors(micro)])
    layouts = split_tp(model, micro, groups.tp) if groups.tp is not None else {}
    gm = trace(model, micro, loss_fn)
    if sp > 1:  # a traced causal mask would cross stage boundaries as an activation: is_causal before the split
        dropped = sum(drop_constant_causal_mask(gm, n) for n in list(gm.graph.nodes) if n.op == "call_function")
        if dropped:
            gm.recompile()
    split = split_graph(gm, p * v, cfg.pipeline.split_points)
    if groups.tp is not None and cfg.zerograph.tp_sequence_parallel:  # Megatron-SP: the stream crosses as shards
        tp = groups.tp.world_size
        shard_boundaries(split, sequence_sharded(gm, split, step_mod.flat_tensors(micro), tp), tp)
    log.info("pipeline split of %s:\n%s", type(model).__name__, split.describe())
    mine = schedule.stages_of(groups.stage)  # this rank's model stages
    zg = cfg.zerograph
    if zg.seed_from_rank0:
        for k in mine:
            _seed_from_first_rank(split.stages[k].module, groups)
    stage_cfg = cfg.model_copy(update={
        "zerograph": zg.model_copy(update={"seed_from_rank0": False}),  # done above, per stage group
        "gradient_accumulation_steps": m,
        "gradient_clipping": 0.0,  # clipped over all stages by the pipeline runtime
        "train_batch_size": None,
        "train_micro_batch_size_per_gpu": None,
        "pipeline": PipelineConfig(),
    })
    keys = [_original_keys(model, st.module) for st in split.stages]
    covered = {k for stage_keys in keys for names in stage_keys.values() for k in names}
    fallback = {k: val for k, val in fallback.items() if k not in covered}  # read by no stage: never changes
    _untie_copies_on_one_rank(split, mine)
    modules = {k: split.stages[k].module for k in mine}
    for st in split.stages:  # other ranks' stages' parameters are not this rank's to keep
        if st.index not in modules:
            st.module = None
    for module in modules.values():  # dropout follows stage.training (model.eval() for eval_step)
        follow_training_mode(module)
    # each stage's parameters cut as the whole model's are (stage key -> the user's keys -> layout); with sp
    # ZeRO shards over the stage's dp x sp ranks and the sp pass finds the ATen attention
    staged = groups if groups.tp is not None or groups.sp is not None else groups.dp
    chunks = {k: compile_stage(modules[k], stage_cfg, group=staged,
                               tp_layouts=_stage_layouts(layouts, keys[k]) if groups.tp is not None else None)
              for k in mine}
    if groups.sp is not None:  # the pipeline cut the batch (cut above); activations are sequence shards
        for chunk in chunks.values():
            chunk._zg_runtime.ctx.sp_presliced = True
    for k, chunk in chunks.items():  # the memory limit checks a stage's regions on their own (backend._step_order)
        chunk._zg_runtime.ctx.enter_pipeline(k, p, groups.stage)
    shapes = [tuple(t.shape) for t in step_mod.flat_tensors(micro)]
    pipe = PipelineModel(chunks, split, schedule, groups, cfg.gradient_clipping, shapes, fallback,
                         {k: keys[k] for k in mine})
    pipe.cut_sequences = cut
    return pipe


class _SequenceSlice:
    """``sequence_slice`` of this rank's sp index (what ``slice_sequences`` reads of a plan)."""

    def __init__(self, sp: int, index: int):
        self.sp, self.index = sp, index

    def sequence_slice(self, seq_len: int) -> slice:
        if seq_len % self.sp:
            raise ValueError(f"a sequence of {seq_len} tokens does not split over sequence_parallel_size={self.sp} "
                             f"ranks; pad the sequences to a multiple of {self.sp} (labels -100 on the padding)")
        per = seq_len // self.sp
        return slice(self.index * per, (self.index + 1) * per)


def sequence_cutter(model: nn.Module, groups) -> Callable:
    """``batch -> batch`` with every sequence cut to this rank's sp slice, as
    a non-pipeline sp model cuts its call's arguments (Hugging Face labels
    shifted first, global ``position_ids`` added): the first stage reads the
    sliced inputs, the stages using labels or positions their slices."""
    where = _SequenceSlice(groups.sp.world_size, groups.sp.rank)

    def cut(batch):
        if isinstance(batch, dict):
            out = slice_sequences(model, where, (), batch)[1]
            if isinstance(out.get("attention_mask"), torch.Tensor):  # padding: attention needs every key's
                raise ValueError(
                    "sequence_parallel_size > 1 with pipeline stages: an attention_mask with padding is not "
                    "supported yet; pad on the right with labels -100 and pass no attention_mask")
            return out
        if isinstance(batch, (tuple, list)):
            return type(batch)(slice_sequences(model, where, tuple(batch), {})[0])
        return slice_sequences(model, where, (batch,), {})[0][0]

    return cut


def _untie_copies_on_one_rank(split, mine) -> None:
    """A parameter read by two stages that one rank runs (interleaved 1F1B:
    stages ``k`` and ``k + p``; ALBERT-style weights shared across blocks)
    gets its own copy in every such stage but the first, so that each compiled
    stage shards and owns a distinct tensor. The copies start equal and the
    runtime sums their gradients (locally, then over the ranks holding the
    other copies), so they stay equal, as one tied parameter would."""
    for name, stages in split.tied.items():
        local = [k for k in stages if k in mine]
        for k in local[1:]:
            *path, leaf = split.tied_names[name][k].split(".")
            owner = split.stages[k].module
            for part in path:
                owner = owner._modules[part]
            shared = owner._parameters[leaf]
            owner._parameters[leaf] = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)


def _stage_layouts(layouts: dict, keys: dict[str, list[str]]) -> dict:
    """Stage parameter FQN -> the tensor-parallel layout of the user's parameter it is."""
    out = {}
    for key, names in keys.items():
        found = [layouts[n] for n in names if n in layouts]
        if found:
            out[key] = found[0]
    return out


@torch.no_grad()
def _seed_from_first_rank(module: nn.Module, groups) -> None:
    """Every rank of a stage (data-, sequence- and tensor-parallel) starts
    from its first rank's values: a broadcast over ZeRO's group (dp, with sp
    dp x sp) from its index 0, then over the tp group from tp index 0."""
    inner = (groups.zero if groups.zero is not None else groups.dp, groups.tp)
    subgroups = [g.group for g in inner if g is not None and g.world_size > 1]
    for group in subgroups:
        src = dist.get_global_rank(group, 0)
        for tensor in module.state_dict(keep_vars=True).values():
            dist.broadcast(tensor.data, src=src, group=group)


def _original_keys(model: nn.Module, stage: nn.Module) -> dict[str, list[str]]:
    """Stage state-dict key -> every key of the user's model holding the same
    tensor. ``torch.export`` names a tied parameter once (GPT's embedding may
    read ``lm_head.weight``), so one stage tensor can stand for several keys."""
    by_id: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(value), []).append(key)
    out = {}
    for key, value in stage.state_dict(keep_vars=True).items():
        if id(value) in by_id:
            out[key] = by_id[id(value)]
    return out
