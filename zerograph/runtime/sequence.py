"""Sequence parallelism (Ulysses): the sequence-parallel group and the
slicing of a batch's sequences (docs/long_sequences.md).

The ranks form the mesh ``("dp", "sp")``, sp innermost: global rank ``r`` is
data-parallel index ``r // sp`` and sequence-parallel index ``r % sp``. ZeRO
shards over all of them (dp x sp, as DeepSpeed does); the ranks of one sp
group read the same batch rows, and each computes one contiguous
``1/sp`` of every sequence. With tensor parallelism the mesh is
``("dp", "sp", "tp")``, tp innermost: ``r = (dp_i * sp + sp_i) * tp + tp_i``;
ZeRO shards over the dp x sp ranks of one tp index, the sp group is the sp
ranks of one (dp, tp) index and the tp group the tp ranks of one (dp, sp)
index (:func:`data_sequence_and_tensor_parallel_groups`).

:func:`slice_sequences` cuts a model call's arguments: every tensor whose
second dimension is the sequence length (input ids, labels, targets, position
ids) keeps this rank's positions. Before cutting it

* adds ``position_ids`` (global positions, ``arange(seq)``) for a model whose
  forward takes them (Hugging Face), so rotary embeddings see where each token is;
* turns Hugging Face's ``labels`` into ``shift_labels`` (each position's next
  token, ``-100`` at the end), so the label of a shard's last token, which
  lives on the next rank, is not lost;
* drops an all-ones ``attention_mask``, and leaves one with padding uncut
  (``[b, s]``): after the all-to-all attention sees every key, so the
  ``sequence_parallel`` pass rebuilds Hugging Face's causal + padding mask
  over the whole sequence from it. Padded positions need labels ``-100``
  to stay out of the loss, as without sp.
"""

from __future__ import annotations

import inspect
import logging

import torch

from zerograph.runtime.dist import (  # noqa: F401  (SequenceParallelGroup: re-exported)
    DataParallelGroup,
    SequenceParallelGroup,
    data_parallel_group,
    default_device,
    apply_collective_timeout,
    data_and_tensor_parallel_groups,
    dp_by_inner_mesh,
    ensure_process_group,
)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # PyTorch's and Hugging Face's ignored label


class SequenceParallelError(ValueError):
    """A model the sequence-parallel pass cannot split (the message names the
    module, the counts and the fix)."""


def data_and_sequence_parallel_groups(
    sp: int, timeout_s: float = 300.0, device: str | None = None, model_device: torch.device | None = None
) -> tuple[DataParallelGroup, SequenceParallelGroup, int]:
    """ZeRO's group (every rank: dp x sp), the sequence-parallel group, and
    this rank's data-parallel index, from a ``("dp", "sp")`` mesh."""
    ensure_process_group(timeout_s)
    dev = default_device(device, model_device)
    mesh, dp, dp_index, sp_index = dp_by_inner_mesh("sp", sp, "sequence_parallel_size", timeout_s, dev)
    zero = data_parallel_group(timeout_s, device, model_device)  # every rank, in global rank order
    group = SequenceParallelGroup(rank=sp_index, world_size=sp, mesh=mesh,
                                  group_name=mesh["sp"].get_group().group_name)
    log.info("sequence-parallel mesh: %d data-parallel x %d sequence-parallel rank(s); this rank is dp %d, sp %d",
             dp, sp, dp_index, sp_index)
    return zero, group, dp_index


def data_sequence_and_tensor_parallel_groups(
    sp: int, tp: int, timeout_s: float = 300.0, device: str | None = None, model_device: torch.device | None = None
):
    """sp x tp on the ``("dp", "sp", "tp")`` mesh: ZeRO's group (the dp x sp
    ranks of this rank's tp index), the sequence-parallel group (the sp ranks
    of this rank's (dp, tp) index), the tensor-parallel group (the tp ranks
    of its (dp, sp) index) and this rank's data-parallel index."""
    from torch.distributed.device_mesh import init_device_mesh

    from zerograph.config import ConfigError

    ensure_process_group(timeout_s)
    dev = default_device(device, model_device)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world % (sp * tp):
        raise ConfigError(
            f"sequence_parallel_size={sp} x tensor_parallel.autotp_size={tp} needs a world size that is a multiple "
            f"of {sp * tp}; this run has {world} rank(s): launch data-parallel x {sp} x {tp} ranks, or change "
            "sequence_parallel_size or tensor_parallel.autotp_size")
    # the (dp*sp, tp) mesh: ZeRO's group (same tp index, global rank order) and the tp group
    zero, tp_group = data_and_tensor_parallel_groups(tp, timeout_s, device, model_device)
    dp = world // (sp * tp)
    mesh = init_device_mesh(dev.type, (dp, sp, tp), mesh_dim_names=("dp", "sp", "tp"))
    apply_collective_timeout(mesh["sp"].get_group(), timeout_s)
    dp_index, rest = divmod(torch.distributed.get_rank(), sp * tp)
    sp_index = rest // tp
    group = SequenceParallelGroup(rank=sp_index, world_size=sp, mesh=mesh,
                                  group_name=mesh["sp"].get_group().group_name)
    log.info("sequence x tensor-parallel mesh: %d data-parallel x %d sequence-parallel x %d tensor-parallel "
             "rank(s); this rank is dp %d, sp %d, tp %d", dp, sp, tp, dp_index, sp_index, tp_group.rank)
    return zero, group, tp_group, dp_index


def sequence_parallel_groups(cfg, model_device: torch.device | None = None):
    """For ``cfg`` (a :class:`zerograph.config.Config` with
    ``sequence_parallel_size`` > 1): ZeRO's group, the sequence-parallel
    group, the tensor-parallel group (None without ``tensor_parallel``) and
    this rank's data-parallel index. Raises ConfigError for the settings
    that do not compose with Ulysses."""
    from zerograph.config import ConfigError

    sp, tp, zg = cfg.sequence_parallel_size, cfg.tensor_parallel.autotp_size, cfg.zerograph
    if tp <= 1:
        zero, group, dp_index = data_and_sequence_parallel_groups(sp, zg.collective_timeout_s, zg.device, model_device)
        return zero, group, None, dp_index
    if zg.tp_sequence_parallel:
        raise ConfigError(
            f"sequence_parallel_size={sp} with tensor_parallel.autotp_size={tp} and zerograph.tp_sequence_parallel: "
            "Megatron sequence parallelism cuts the sequence over the tensor-parallel ranks, which Ulysses "
            "(sequence_parallel_size) already cuts over the sequence-parallel ranks; use one of them: set "
            "zerograph.tp_sequence_parallel to false (or sequence_parallel_size to 1)")
    if zg.tp_vocab_parallel:
        raise ConfigError(
            f"sequence_parallel_size={sp} with tensor_parallel.autotp_size={tp} and zerograph.tp_vocab_parallel: "
            "the vocab-parallel cross-entropy is not summed over the sequence-parallel ranks yet; set "
            "zerograph.tp_vocab_parallel to false")
    return data_sequence_and_tensor_parallel_groups(sp, tp, zg.collective_timeout_s, zg.device, model_device)


def _takes(forward, name: str) -> bool:
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def slice_sequences(module, plan, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args``/``kwargs`` of a call of ``module`` with every sequence cut to
    this rank's positions (``plan.sequence_slice``); see the module docstring."""
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() >= 2), None)
    if first is None:
        return args, kwargs
    seq = first.shape[1]
    where = plan.sequence_slice(seq)
    kwargs = dict(kwargs)
    forward = getattr(module, "forward", None)
    mask = kwargs.get("attention_mask")
    whole = None  # a padded attention_mask, passed uncut
    if isinstance(mask, torch.Tensor):
        if mask.dim() != 2 or mask.shape != first.shape[:2]:
            raise ValueError(
                f"sequence_parallel_size > 1: an attention_mask of shape {tuple(mask.shape)}; zerograph takes a "
                f"[batch, seq] 0/1 padding mask ({tuple(first.shape[:2])} here), as Hugging Face models do")
        if bool((mask == 1).all()):
            kwargs["attention_mask"] = None
        else:
            implementation = getattr(getattr(module, "config", None), "_attn_implementation", "sdpa")
            if implementation != "sdpa":
                raise ValueError(
                    f"sequence_parallel_size > 1: an attention_mask with padding needs SDPA attention, where "
                    f"zerograph rebuilds the mask over the whole sequence; {type(module).__name__} uses "
                    f"attn_implementation={implementation!r}: load it with attn_implementation=\"sdpa\", or pad on "
                    "the right with labels -100 and pass no attention_mask")
            whole = mask
    if _takes(forward, "position_ids") and kwargs.get("position_ids") is None:
        kwargs["position_ids"] = torch.arange(seq, device=first.device).unsqueeze(0).expand(first.shape[0], seq)
    labels = kwargs.get("labels")
    if isinstance(labels, torch.Tensor) and callable(getattr(module, "loss_function", None)) \
            and kwargs.get("shift_labels") is None:
        shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
        kwargs["shift_labels"] = shifted
        kwargs["labels"] = shifted

    def cut(value):
        if value is whole:  # attention needs every key's padding: the sp pass rebuilds the mask from it
            return value
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == seq:
            return value[:, where].contiguous()
        return value

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}
