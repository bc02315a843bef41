"""Sharded, atomic checkpoints on ``torch.distributed.checkpoint`` (DCP).

    zerograph.save_checkpoint("ckpt/step-100", model, opt, step=100)
    extra = zerograph.load_checkpoint("ckpt/step-100", model, opt)   # {"step": 100, ...}

Every rank writes its own parameter and optimizer-state shards (DTensors at
ZeRO stages 1-3, full tensors at stage 0, deduplicated by DCP), under the
original model's names (:class:`CheckpointNames`: a tied weight once; a
pipeline rank its own stages' tensors). Loading reshards: a checkpoint saved
at one world size, ZeRO stage or pipeline layout loads into a model sharded
or split another way, or without a pipeline. Writes go to ``<path>.tmp-<uuid>``; after every
rank has written, rank 0 writes the commit marker and renames the directory
to ``path``, so a crash mid-save leaves the previous checkpoint whole.
Collective: call both functions on every rank. Multi-node runs need a
filesystem that every rank sees.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from zerograph.runtime.state import check_position, context_of
from zerograph.runtime.dist import rank_and_world as _dist
from zerograph.runtime.errors import CheckpointError, naming_failed_ranks
from zerograph.checkpoint.integrity import (
    COMMIT_MARKER,
    METADATA,
    candidates,
    file_digest,
    is_complete,
    marker_for,
    what_to_do,
    written_by,
)
from zerograph.checkpoint.verify import _advice, run_dcp, verified_checkpoint
from zerograph.checkpoint.names import CheckpointNames
from zerograph.checkpoint import tp
from zerograph.runtime.optimizer import ShardOptimizer
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

log = logging.getLogger(__name__)

__all__ = ["save_checkpoint", "load_checkpoint", "COMMIT_MARKER"]


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def _all_gather_obj(value: Any) -> list[Any]:
    if _dist()[1] == 1:
        return [value]
    everyone: list[Any] = [None] * _dist()[1]
    dist.all_gather_object(everyone, value)
    return everyone


def _broadcast_str(value: str) -> str:
    if _dist()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _optimizer_state(model: nn.Module, optimizer) -> dict[str, Any]:
    """The optimizer's state dict keyed by parameter name, shard-shaped
    states as DTensors: the same layout for a host optimizer (ZeRO-Offload)
    as for a plain one, so either loads the other's checkpoint."""
    if isinstance(optimizer, ShardOptimizer):
        return optimizer.sharded_state_dict(model)
    return get_optimizer_state_dict(model, optimizer)


def _set_optimizer_state(model: nn.Module, optimizer, state: dict[str, Any]) -> None:
    if isinstance(optimizer, ShardOptimizer):
        optimizer.load_sharded_state_dict(model, state)
    else:
        set_optimizer_state_dict(model, optimizer, state)


def _never_stepped(optimizer) -> bool:
    """An optimizer without states (before its first step). torch's
    state-dict helpers (and :class:`ShardOptimizer`'s, which mirror them)
    fill such an optimizer in with a zero-gradient step at lr 0 (AdamW:
    ``step`` 1, zero moments), which would change the saving run and give the
    resumed one a different bias correction."""
    return optimizer is not None and not optimizer.state


def _rng_state() -> bytes:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _runtime_state(model: nn.Module) -> dict[str, Any]:
    runtime = getattr(model, "_zg_runtime", None)
    if runtime is None:
        return {}
    ctx = runtime.ctx
    state: dict[str, Any] = {"step": ctx.step, "micro_step": ctx.micro_step,
                             "config": ctx.config.to_dict(),
                             # every rank's RNG state is saved: the global world size decides whether
                             # they can be restored (a pipeline stage's ctx.world_size is only its dp group)
                             "world_size": _dist()[1],
                             "stage": ctx.config.zero_optimization.stage}
    if runtime.scaler is not None:
        state["loss_scaler"] = runtime.scaler.state_dict()
    return state


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    **extra: Any) -> Path:
    """Save this rank's shards of the model and optimizer, every rank's RNG
    state, zerograph's step counters and fp16 loss-scaler state, and
    ``extra`` (picklable values taken from rank 0) to the directory ``path``,
    with a SHA-256 checksum of every file in the commit marker.

    Atomic: an existing checkpoint at ``path`` is replaced only once the new
    one is complete. Collective: call on every rank; a rank that dies
    meanwhile ends the others with a RankFailureError naming it. A failed
    write (no space left, a path below a regular file, no permission) on any
    rank raises :class:`~zerograph.runtime.errors.CheckpointError` on every
    rank, naming the rank, the path and the cause, and leaves the previous
    checkpoint at ``path`` as it was."""
    ctx = context_of(model)
    with naming_failed_ranks(ctx, "zerograph.save_checkpoint"):
        check_position(ctx, "zerograph.save_checkpoint")
        return _save(Path(path), _unwrap(model), optimizer, extra)


def _save(path: Path, model: nn.Module, optimizer, extra: dict[str, Any]) -> Path:
    rank, world = _dist()
    tmp = Path(_broadcast_str(f"{path}.tmp-{uuid.uuid4().hex}"))
    names = CheckpointNames.of(model)
    state: dict[str, Any] = {"model": names.model_to_save(get_model_state_dict(model))}
    fresh = _never_stepped(optimizer)
    if optimizer is not None:
        state["optim"] = names.optimizer_to_save(_optimizer_state(model, optimizer))
    state = tp.wrap(state, tp.tp_layouts(model))  # split parameters: their boxes of the whole tensors
    state[f"rng/rank{rank}"] = _rng_state()
    try:
        if rank == 0:
            buf = io.BytesIO()  # one opaque value: DCP would flatten a dict into keys
            torch.save({"extra": dict(extra), "zerograph": _runtime_state(model), "optimizer_fresh": fresh}, buf)
            state["zerograph_extra"] = buf.getvalue()
        run_dcp(functools.partial(dcp.save, planner=tp.TpSavePlanner()), state, path=tmp, action="save", target=path)
        files = _gather_digests(written_by(rank, tmp), world)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if fresh:  # undo the zero-gradient step that filled the states in (see _never_stepped)
            optimizer.state.clear()
    failure = None
    if rank == 0:
        runtime = getattr(model, "_zg_runtime", None)
        try:
            files[METADATA] = file_digest(tmp / METADATA)
            marker = marker_for(files, world_size=world, has_optimizer=optimizer is not None,
                                torch=torch.__version__, step=runtime.ctx.step if runtime is not None else None)
            _commit(tmp, path, marker)
        except OSError as exc:
            failure = f"{type(exc).__name__}: {exc}"
            shutil.rmtree(tmp, ignore_errors=True)
    failure = _broadcast_obj(failure)
    if failure is not None:
        state_of_path = f"{path} still holds the checkpoint saved before" if is_complete(path) else \
            f"nothing was written to {path}"
        raise CheckpointError(
            f"zerograph: rank {rank}: rank 0 could not commit the checkpoint {path}: {failure}. Every rank's "
            f"shards were written, but without the commit the save is void: {state_of_path}. {_advice(failure)}",
            path, ranks=[0])
    if rank == 0:
        _remove_leftovers(path)
    log.info("zerograph: checkpoint saved to %s", path)
    return path


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _commit(tmp: Path, path: Path, marker: dict[str, Any]) -> None:
    """Write the commit marker into ``tmp`` and move it to ``path`` (rank 0).

    Two renames: an existing ``path`` to ``<path>.old-*``, then ``tmp`` to
    ``path``. A crash between them leaves no ``path``, and load_checkpoint
    loads the complete ``tmp`` instead (integrity.resolve)."""
    with open(tmp / COMMIT_MARKER, "w") as f:
        json.dump(marker, f)
        f.flush()
        os.fsync(f.fileno())
    old = None
    if path.exists():
        old = path.with_name(f"{path.name}.old-{uuid.uuid4().hex}")
        _rename(path, old)
    try:
        _rename(tmp, path)
    except OSError:
        if old is not None and not path.exists():
            _rename(old, path)  # put the previous checkpoint back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(path: Path) -> None:
    """Remove what interrupted saves of ``path`` left (``.tmp-*``, ``.old-*``):
    ``path`` now holds a newer complete checkpoint than any of them."""
    for leftover in candidates(path)[1:] if path.exists() else []:
        log.info("zerograph: removing %s, left by an interrupted save of %s", leftover, path)
        shutil.rmtree(leftover, ignore_errors=True)


def _gather_digests(mine: dict[str, Any], world: int) -> dict[str, Any]:
    return {name: digest for part in _all_gather_obj(mine) for name, digest in part.items()}


def _broadcast_obj(value: Any) -> Any:
    if _dist()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, *, verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and
    ``optimizer``, created from ``model.parameters()`` or by
    :func:`zerograph.make_optimizer`: a host optimizer's and a plain one's
    checkpoints load into either), resharding to this
    run's world size and ZeRO stage. Restores zerograph's step counters, the
    fp16 loss scale and, when the world size is unchanged, every rank's RNG
    state. Returns the ``extra`` keywords given to ``save_checkpoint``.

    ``verify`` (default): check every file against the checksums saved in
    the commit marker first (the ranks share the reading); a corrupt,
    truncated or missing file raises
    :class:`~zerograph.runtime.errors.CheckpointError` on every rank, naming
    the file and the previous complete checkpoint. ``verify=False`` skips
    the checksums (faster for huge checkpoints on trusted storage). When
    ``path`` is missing because a save was interrupted between its renames,
    the newest complete checkpoint that save left is loaded, with a warning.
    Collective: call on every rank; a rank that dies meanwhile ends the
    others with a RankFailureError naming it."""
    ctx = context_of(model)
    with naming_failed_ranks(ctx, "zerograph.load_checkpoint"):
        check_position(ctx, "zerograph.load_checkpoint")
        return _load(Path(path), _unwrap(model), optimizer, verify)


def _resumed_micro_step(saved: dict[str, Any], accumulation: int) -> int:
    """The micro-batch counter to resume with: the saved run's completed
    optimizer steps counted in this run's ``gradient_accumulation_steps``, so
    the next boundary comes after a whole step's micro-batches also when the
    accumulation changed (e.g. with the world size)."""
    micro = saved["micro_step"]
    saved_accumulation = saved.get("config", {}).get("gradient_accumulation_steps", accumulation)
    if saved_accumulation == accumulation:
        return micro
    steps, within = divmod(micro, saved_accumulation)
    if within:
        log.warning("zerograph: checkpoint saved after %d of %d micro-batches of a step; the next step starts "
                    "afresh with gradient_accumulation_steps %d", within, saved_accumulation, accumulation)
    return steps * accumulation


def _load(path: Path, model: nn.Module, optimizer, verify: bool) -> dict[str, Any]:
    rank, world = _dist()
    path = verified_checkpoint(path, rank, world, verify, _broadcast_obj, _all_gather_obj)
    try:
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as exc:  # noqa: BLE001 -- a torn .metadata (verify=False), an unreadable file
        raise CheckpointError(f"zerograph: rank {rank}: cannot read {path / METADATA}: {type(exc).__name__}: "
                              f"{exc}; {what_to_do(path)}", path, str(path / METADATA), [rank]) from exc
    keys = saved.keys()
    has_optim = any(k.startswith("optim.") for k in keys)
    if optimizer is not None and not has_optim:
        raise ValueError(f"zerograph: {path} holds no optimizer state; call load_checkpoint(path, model) without it")
    names = CheckpointNames.of(model)
    own_model = get_model_state_dict(model)
    state: dict[str, Any] = {"model": names.model_to_load(own_model, keys), "zerograph_extra": None}
    own_optim = None
    if optimizer is not None:
        own_optim = _optimizer_state(model, optimizer)
        state["optim"] = names.optimizer_to_load(own_optim)
    state = tp.wrap(state, tp.tp_layouts(model))  # split parameters: their boxes of the whole tensors
    names.check(path, state, saved)
    rng_key = f"rng/rank{rank}"
    if rng_key in keys:
        state[rng_key] = None
    run_dcp(functools.partial(dcp.load, planner=tp.TpLoadPlanner()), state, path=path, action="load")
    state = tp.unwrap(state)
    set_model_state_dict(model, names.model_loaded(own_model, state["model"]))
    if optimizer is not None:
        _set_optimizer_state(model, optimizer, names.optimizer_loaded(own_optim, state["optim"]))
    try:
        payload = torch.load(io.BytesIO(state["zerograph_extra"]), weights_only=False)
    except Exception as exc:  # noqa: BLE001 -- corrupt bytes that were not verified
        raise CheckpointError(f"zerograph: rank {rank}: the step counters and extras in {path} cannot be "
                              f"read: {type(exc).__name__}: {exc}; {what_to_do(path)}", path, ranks=[rank]) from exc
    if payload.get("optimizer_fresh") and optimizer is not None:
        optimizer.state.clear()  # saved before its first step: keep the learning rates, no states
    zg = payload.get("zerograph", {})
    saved_world = zg.get("world_size", world)
    if state.get(rng_key) is not None and saved_world == world:
        rng = torch.load(io.BytesIO(state[rng_key]), weights_only=False)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    elif saved_world != world:
        log.warning("zerograph: checkpoint saved on %d rank(s), loaded on %d: RNG states not restored", saved_world, world)
    runtime = getattr(model, "_zg_runtime", None)
    # a pipeline model runs one compiled stage per chunk, each with its own counters
    runtimes = [rt for _, rt in model.stage_runtimes()] if hasattr(model, "stage_runtimes") else [runtime]
    for runtime in runtimes:
        if runtime is None or not zg:
            continue
        runtime.ctx.step = zg["step"]
        runtime.ctx.micro_step = _resumed_micro_step(zg, runtime.ctx.config.gradient_accumulation_steps)
        if runtime.scaler is not None and "loss_scaler" in zg:
            runtime.scaler.load_state_dict(zg["loss_scaler"])
    log.info("zerograph: checkpoint loaded from %s", path)
    return dict(payload.get("extra", {}))
