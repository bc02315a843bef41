"""Consolidated (full) state dicts: loading full tensors into a sharded model,
and exporting a Hugging Face ``save_pretrained`` directory from one."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zerograph.checkpoint.dcp import _broadcast_str, _unwrap
from zerograph.runtime.dist import rank_and_world as _dist
from zerograph.runtime.errors import naming_failed_ranks
from zerograph.runtime.sharding import full_state_dict as _full_state_dict
from zerograph.runtime.state import check_position, context_of
from zerograph.runtime.tp_params import is_tp_dtensor, local_of_whole

log = logging.getLogger(__name__)

__all__ = ["export_pretrained", "load_full_state_dict"]


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load full (unsharded) tensors into a zerograph model: each rank keeps
    its own shard of every parameter, without communication.

    ``state_dict`` has the original model's keys (what
    :func:`zerograph.full_state_dict` returns, or a Hugging Face checkpoint
    read with ``safetensors.torch.load_file``) and must be the same on every
    rank. ``strict``: missing or unexpected keys are an error (tied
    parameters need only one of their keys)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    model = _unwrap(model)
    own = model.state_dict(keep_vars=True)
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if strict and unexpected:
        raise KeyError(f"zerograph.load_full_state_dict: keys not in {type(model).__name__}: "
                       f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}; "
                       "pass strict=False to ignore them")
    # Tied parameters appear under several keys; one of them is enough.
    by_id: dict[int, list[str]] = {}
    for key, value in own.items():
        by_id.setdefault(id(value), []).append(key)
    missing = [k for k in missing if not any(alias in state_dict for alias in by_id[id(own[k])])]
    if strict and missing:
        raise KeyError(f"zerograph.load_full_state_dict: missing keys: {', '.join(missing[:8])}"
                       f"{' ...' if len(missing) > 8 else ''}; pass strict=False to keep their current values")
    done: set[int] = set()
    ctx = context_of(model)
    specs = {}  # tensor parallelism: id(parameter) -> its spec (how it is cut over the tp and dp ranks)
    if ctx is not None and getattr(ctx, "tp", None) is not None:
        specs = {id(p): ctx.specs[n] for n, p in model.named_parameters() if n in ctx.specs}
    with torch.no_grad():
        for key, target in own.items():
            source = next((state_dict[a] for a in by_id[id(target)] if a in state_dict), None)
            if source is None or id(target) in done:
                continue
            done.add(id(target))
            spec = specs.get(id(target))
            if spec is not None and is_tp_dtensor(target):  # the (dp, tp) DTensor: this rank's rows of its tp slice
                if tuple(source.shape) != tuple(target.shape):
                    raise ValueError(f"zerograph.load_full_state_dict: {key} has shape {tuple(source.shape)} in the "
                                     f"state dict but {tuple(target.shape)} in the model; is it the same model "
                                     "configuration?")
                target.to_local().copy_(local_of_whole(source.detach(), spec).to(target.device, target.dtype))
                continue
            layout = spec.tp if spec is not None else None
            if layout is not None:  # this rank's tensor-parallel slice of the whole tensor
                if tuple(source.shape) != layout.whole_shape:
                    raise ValueError(f"zerograph.load_full_state_dict: {key} has shape {tuple(source.shape)} in the "
                                     f"state dict but {layout.whole_shape} in the model; is it the same model "
                                     "configuration?")
                source = layout.local_part(source)
            full_shape = tuple(target.shape)  # a DTensor's shape is the global shape
            if tuple(source.shape) != full_shape:
                raise ValueError(f"zerograph.load_full_state_dict: {key} has shape {tuple(source.shape)} in the "
                                 f"state dict but {full_shape} in the model; is it the same model configuration?")
            if isinstance(target, DTensor):
                local = distribute_tensor(source.detach().to(target.device, target.dtype), target.device_mesh,
                                          target.placements, src_data_rank=None).to_local()
                target.to_local().copy_(local)
            else:
                target.copy_(source.detach().to(target.device, target.dtype))


def _hf_original_class(model: nn.Module) -> type:
    """The user's class of a model whose class zerograph replaced by a subclass."""
    for cls in type(model).__mro__:
        if "_zg_base_class" not in cls.__dict__ and "train_step" not in cls.__dict__:
            return cls
    return type(model)


def _fresh_hf_model(model: nn.Module, hf_model_or_config):
    """An unsharded Hugging Face model (parameters on the meta device when
    built here) of the architecture to export into."""
    if hf_model_or_config is not None and hasattr(hf_model_or_config, "save_pretrained") and \
            isinstance(hf_model_or_config, nn.Module):
        return hf_model_or_config, False
    config = hf_model_or_config if hf_model_or_config is not None else getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise TypeError(
            f"zerograph.export_pretrained: {type(model).__name__} is not a Hugging Face model; pass the "
            "transformers config (e.g. GPT2Config) or an unsharded model of the same architecture as "
            "hf_model_or_config, or save zerograph.full_state_dict(model) yourself")
    import transformers

    if hf_model_or_config is None and isinstance(model, transformers.PreTrainedModel):
        cls = _hf_original_class(model)
    elif getattr(config, "architectures", None) and hasattr(transformers, config.architectures[0]):
        cls = getattr(transformers, config.architectures[0])
    else:
        cls = transformers.AutoModelForCausalLM
    with torch.device("meta"):
        fresh = cls.from_config(config) if cls is transformers.AutoModelForCausalLM else cls(config)
    return fresh, True


def export_pretrained(model: nn.Module, path: str | os.PathLike, hf_model_or_config=None,
                      **save_kwargs: Any) -> Path:
    """Write ``model``'s full weights as a Hugging Face checkpoint that
    ``from_pretrained(path)`` loads (config + safetensors), from rank 0.

    ``hf_model_or_config``: None when ``model`` is a transformers model
    (its own class and config are used); otherwise its transformers config
    or an unsharded instance of the architecture (its weights are replaced).
    ``save_kwargs`` go to ``save_pretrained`` (e.g. ``max_shard_size``).
    Collective (the parameters are gathered): call it on every rank."""
    ctx = context_of(model)
    with naming_failed_ranks(ctx, "zerograph.export_pretrained"):
        check_position(ctx, "zerograph.export_pretrained")
        return _export(_unwrap(model), Path(path), hf_model_or_config, save_kwargs)


def _export(model: nn.Module, path: Path, hf_model_or_config, save_kwargs: dict[str, Any]) -> Path:
    rank, _ = _dist()
    full = {k: v.detach() for k, v in _full_state_dict(model).items()}
    error = None
    if rank == 0:
        try:
            hf_model, on_meta = _fresh_hf_model(model, hf_model_or_config)
            if on_meta:
                hf_model.load_state_dict(full, strict=False, assign=True)
                if hasattr(hf_model, "tie_weights"):
                    hf_model.tie_weights()
                still_meta = [k for k, v in hf_model.state_dict().items() if v.is_meta]
                if still_meta:
                    raise KeyError(f"zerograph.export_pretrained: the model has no weights for "
                                   f"{', '.join(still_meta[:8])}; is hf_model_or_config the model's architecture?")
            else:
                hf_model.load_state_dict(full, strict=False)
            hf_model.save_pretrained(str(path), **save_kwargs)
        except BaseException as exc:  # tell the other ranks instead of leaving them in the barrier
            error = exc
    failed = _broadcast_str("" if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"zerograph.export_pretrained failed on rank 0: {failed}")
    log.info("zerograph: Hugging Face checkpoint written to %s", path)
    return path
