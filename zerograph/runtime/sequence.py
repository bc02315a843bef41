"""Sequence parallelism (Ulysses): the sequence-parallel group and the
slicing of a batch's sequences (docs/long_sequences.md).

The ranks form the mesh ``("pp", "dp", "sp", "tp")``
(:func:`zerograph.runtime.mesh.build_mesh`, one builder for every kind of
parallelism): ``r = ((pp_i * dp + dp_i) * sp + sp_i) * tp + tp_i``. ZeRO
shards over the dp x sp ranks of one (pp, tp) index (as DeepSpeed does); the
sp group is the sp ranks of one (pp, dp, tp) index. The ranks of one sp group
read the same batch rows, and each computes one contiguous ``1/sp`` of every
sequence.

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

from zerograph.runtime.dist import SequenceParallelGroup  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # PyTorch's and Hugging Face's ignored label


class SequenceParallelError(ValueError):
    """A model the sequence-parallel pass cannot split (the message names the
    module, the counts and the fix)."""


def refuse_with_tensor_parallelism(cfg) -> None:
    """Raise ConfigError for the settings of ``cfg`` that do not compose
    Ulysses (``sequence_parallel_size`` > 1) with tensor parallelism."""
    from zerograph.config import ConfigError

    sp, tp, zg = cfg.sequence_parallel_size, cfg.tensor_parallel.autotp_size, cfg.zerograph
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
