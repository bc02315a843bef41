"""The names a zerograph checkpoint stores, whatever layout saves or loads it.

A checkpoint holds the original model's fully-qualified names (a tied weight
once), so it loads into any ZeRO stage, world size or pipeline layout, or
into a model without a pipeline (docs/checkpoints.md, "Pipeline models").
:class:`CheckpointNames` maps a model's own state-dict keys to those names
for :mod:`zerograph.checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zerograph.runtime.dist import rank_and_world as _dist
from zerograph.runtime.offload import _local


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values without a boolean ==
        return repr(a) == repr(b)


def _listed(names, limit: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


class CheckpointNames:
    """The names a checkpoint stores: the original model's fully-qualified
    names (``model.named_parameters()``/``state_dict()`` of the user's
    model, before zerograph wrapped it), one name per distinct tensor (the
    first of a tied weight's names), whatever the layout that saves it.

    A model's *own* names are what ``get_model_state_dict`` and the optimizer
    state dicts give it: the same names without a pipeline; for a
    :class:`~zerograph.pipeline.PipelineModel` the wrapper's
    ``chunks.<c>.model.<name>``, mapped back through the pipeline's record of
    which original keys each stage tensor stands for. Each rank saves the
    tensors of its own stage(s); a tied weight held by several stages (GPT's
    embedding and LM head) is saved by the first of them only, and loaded into
    every copy. The optimizer's param groups are merged over the ranks, so the
    checkpoint lists every parameter, as a non-pipeline one does."""

    def __init__(self, names: dict[str, list[str]], writes: set[str], pipeline=None,
                 fallback: list[list[str]] | None = None):
        self.names = names  # own key -> the original keys of its tensor, the saved one first
        self.writes = writes  # own keys whose tensor this rank saves
        self.pipeline = pipeline
        self.fallback = fallback or []  # pipeline: original keys no stage reads, grouped by tensor
        self._model_copies: list[tuple[str, str]] = []
        self._optim_copies: list[tuple[str, str]] = []
        self._fallback_loaded: list[tuple[list[str], str]] = []
        self._covered: set[str] = set()

    @classmethod
    def of(cls, model: nn.Module) -> "CheckpointNames":
        if hasattr(model, "_split") and hasattr(model, "_original_keys") and hasattr(model, "stage_ids"):
            return cls._of_pipeline(model)
        by_id: dict[int, list[str]] = {}
        for key, value in model.state_dict(keep_vars=True).items():
            by_id.setdefault(id(value), []).append(key)
        names = {key: keys for keys in by_id.values() for key in keys}
        return cls(names, {keys[0] for keys in by_id.values()})

    @classmethod
    def _of_pipeline(cls, model: nn.Module) -> "CheckpointNames":
        split = model._split
        local = set(model.stage_ids)
        # copies of a tied parameter on stages after the first that reads it: not saved
        copies = {(k, split.tied_names[name][k]) for name, stages in split.tied.items()
                  for k in stages[1:] if k in local}
        names, writes = {}, set()
        for c, k in enumerate(model.stage_ids):
            for key, original in model._original_keys[k].items():
                own = f"chunks.{c}.{key}"
                names[own] = list(original)
                if (k, key) not in copies:
                    writes.add(own)
        by_storage: dict[tuple, list[str]] = {}  # the fallback dict holds detached tensors: group aliases by storage
        for key, value in model._fallback_state.items():
            ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                     value.stride(), value.dtype) if isinstance(value, torch.Tensor) else (id(value),)
            by_storage.setdefault(ident, []).append(key)
        return cls(names, writes, model, list(by_storage.values()))

    def _saved_name(self, own: str) -> str:
        names = self.names.get(own)
        return names[0] if names else own

    # -- saving ------------------------------------------------------------------
    def model_to_save(self, own: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in own.items():
            if key in self.writes:
                out[self.names[key][0]] = value
            elif key not in self.names and self.pipeline is None:
                out[key] = value
        if self.pipeline is not None and _dist()[0] == 0:  # the same on every rank: written once
            for group in self.fallback:
                out[group[0]] = self.pipeline._fallback_state[group[0]]
        return out

    def _groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**{k: v for k, v in group.items() if k != "params"},
                 "params": list(dict.fromkeys(self._saved_name(f) for f in group["params"]))} for group in groups]

    def optimizer_to_save(self, osd: dict[str, Any]) -> dict[str, Any]:
        state = {self._saved_name(fqn): values for fqn, values in osd["state"].items()
                 if fqn in self.writes or (fqn not in self.names and self.pipeline is None)}
        groups = self._groups(osd["param_groups"])
        if self.pipeline is not None and _dist()[1] > 1:
            groups = merge_param_groups(groups)
        return {"state": state, "param_groups": groups}

    # -- loading -------------------------------------------------------------------
    def _pick(self, names: list[str], prefix: str, saved_keys) -> str:
        """The saved one of a tensor's names (an older checkpoint may hold a tied weight under another)."""
        return next((n for n in names if prefix + n in saved_keys), names[0])

    def model_to_load(self, own: dict[str, Any], saved_keys) -> dict[str, Any]:
        request: dict[str, Any] = {}
        self._model_copies = []
        for key, value in own.items():
            names = self.names.get(key)
            if names is None:
                if self.pipeline is not None:
                    continue  # a constant of the traced graph, not a key of the user's model
                names = [key]
            self._covered.update(names)
            name = self._pick(names, "model.", saved_keys)
            if name in request:
                self._model_copies.append((key, name))
            else:
                request[name] = value
        self._fallback_loaded = []
        for group in self.fallback:
            self._covered.update(group)
            name = self._pick(group, "model.", saved_keys)
            request[name] = self.pipeline._fallback_state[group[0]].detach().clone()
            self._fallback_loaded.append((group, name))
        return request

    def model_loaded(self, own: dict[str, Any], loaded: dict[str, Any]) -> dict[str, Any]:
        """``own`` (filled in place by the load) with every copy of a tensor
        loaded from the checkpoint's one entry for it."""
        with torch.no_grad():
            for key, name in self._model_copies:
                dst, src = _local(own[key]), _local(loaded[name])
                if dst.shape != src.shape:
                    raise RuntimeError(f"zerograph: the copies of {name} are sharded differently "
                                       f"({tuple(dst.shape)} vs {tuple(src.shape)}); cannot load the checkpoint")
                dst.copy_(src)
        for group, name in self._fallback_loaded:
            for key in group:
                self.pipeline._fallback_state[key] = loaded[name]
        return own

    def optimizer_to_load(self, osd: dict[str, Any]) -> dict[str, Any]:
        request: dict[str, Any] = {}
        self._optim_copies = []
        for fqn, values in osd["state"].items():
            name = self._saved_name(fqn)
            if name in request:
                self._optim_copies.append((fqn, name))
            else:
                request[name] = values
        return {"state": request, "param_groups": self._groups(osd["param_groups"])}

    def optimizer_loaded(self, osd: dict[str, Any], loaded: dict[str, Any]) -> dict[str, Any]:
        """The loaded optimizer state under this model's own names: the
        first copy of each tensor's states were filled in place, the others
        get copies of them; param groups list every own name of their
        saved names."""
        with torch.no_grad():
            for fqn, name in self._optim_copies:
                dst, src = osd["state"][fqn], loaded["state"][name]
                for k, v in src.items():
                    if isinstance(v, torch.Tensor) and isinstance(dst.get(k), torch.Tensor) \
                            and _local(dst[k]).shape == _local(v).shape:
                        _local(dst[k]).copy_(_local(v))
                    else:
                        dst[k] = v.clone() if isinstance(v, torch.Tensor) else v
        copies = {fqn for fqn, _ in self._optim_copies}
        state = {fqn: values if fqn in copies else loaded["state"][self._saved_name(fqn)]
                 for fqn, values in osd["state"].items()}
        own_of: dict[str, list[str]] = {}
        for group in osd["param_groups"]:
            for fqn in group["params"]:
                own_of.setdefault(self._saved_name(fqn), []).append(fqn)
        groups = [{**{k: v for k, v in group.items() if k != "params"},
                   "params": [f for name in group["params"] for f in own_of.get(name, ())]}
                  for group in loaded["param_groups"]]
        return {"state": state, "param_groups": groups}

    def check(self, path: Path, state: dict[str, Any], saved: dict[str, Any]) -> None:
        """Every key this rank loads is in the checkpoint with the same
        shape, and every model key of the checkpoint is one of this model's
        (over all ranks: a pipeline rank loads only its stages): else a
        ValueError naming the keys, raised on every rank."""
        wanted = {"model." + name: value for name, value in state["model"].items()}
        optim = state.get("optim")
        if optim is not None:
            for name, values in optim["state"].items():
                wanted.update({f"optim.state.{name}.{k}": v for k, v in values.items()})
            for i, group in enumerate(optim["param_groups"]):
                wanted.update({f"optim.param_groups.{i}.{k}": group[k] for k in group})
        missing = [k for k in wanted if k not in saved]
        shapes = [f"{k} {tuple(saved[k].size)} in the checkpoint, {tuple(v.shape)} here" for k, v in wanted.items()
                  if k in saved and hasattr(v, "shape") and hasattr(saved[k], "size")
                  and tuple(saved[k].size) != tuple(v.shape)]
        report = (missing, shapes, sorted(self._covered))
        if _dist()[1] > 1:
            reports = [None] * _dist()[1]
            dist.all_gather_object(reports, report)
        else:
            reports = [report]
        missing = list(dict.fromkeys(k for r in reports for k in r[0]))
        shapes = list(dict.fromkeys(k for r in reports for k in r[1]))
        covered = {k for r in reports for k in r[2]}
        unexpected = [k for k in saved if k.startswith("model.") and k[len("model."):] not in covered]
        where = f"zerograph.load_checkpoint: {path}"
        if any(k.startswith("model.chunks.") for k in unexpected):
            raise ValueError(
                f"{where} was saved by an earlier zerograph under a pipeline wrapper's names (model.chunks.<c>...), "
                "which load only into that pipeline layout and this version reads no longer: load it with the "
                "zerograph version that saved it and save it again (checkpoints now hold the original model's "
                "parameter names, which load into any layout)")
        model_missing = [k[len("model."):] for k in missing if k.startswith("model.")]
        optim_missing = [k for k in missing if k.startswith("optim.state.")]
        groups_missing = [k for k in missing if k.startswith("optim.param_groups.")]
        fix = ("A checkpoint holds the original model's parameter names (model.named_parameters() of the model "
               "before zerograph.compile), so it loads into the same architecture at any ZeRO stage, world size or "
               "pipeline layout, not into another one: build the model with the configuration it was saved from")
        if model_missing:
            raise ValueError(f"{where} has no {_listed(model_missing)}, which this model has. {fix}"
                             + (f"; the checkpoint has {_listed(unexpected)} instead" if unexpected else "") + ".")
        if unexpected:
            raise ValueError(f"{where} has {_listed(unexpected)}, which this model lacks. {fix}.")
        if shapes:
            raise ValueError(f"{where}: shapes differ: {_listed(shapes, 4)}. {fix}.")
        if optim_missing:
            params = list(dict.fromkeys(k[len("optim.state."):].rsplit(".", 1)[0] for k in optim_missing))
            raise ValueError(
                f"{where} has no optimizer state for {_listed(params)}: the optimizer that saved it did not step "
                "these parameters (or keeps other states: another optimizer class). Build the optimizer over the "
                "same parameters, of the same class, as the run that saved it, or call load_checkpoint(path, model) "
                "without the optimizer to start it afresh")
        if groups_missing:
            raise ValueError(
                f"{where} has no {_listed(groups_missing)}: the optimizer that saved it had other param groups or "
                "hyperparameters. Build the optimizer with the param groups of the run that saved it, or call "
                "load_checkpoint(path, model) without the optimizer to start it afresh")


def merge_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pipeline ranks' param groups as one list (every rank's parameter
    names in each group), the same on every rank, as a model without a
    pipeline would save it (collective)."""
    world = _dist()[1]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, groups)
    counts = [len(g) for g in gathered]
    if len(set(counts)) > 1:
        raise ValueError(f"zerograph.save_checkpoint: the ranks' optimizers have {counts} param groups (rank by "
                         "rank); a checkpoint stores one list of param groups: build the same groups on every rank")
    merged = []
    for i, group in enumerate(gathered[0]):
        for r, other in enumerate(gathered[1:], start=1):
            for k, v in group.items():
                if k != "params" and not _same(v, other[i].get(k)):
                    raise ValueError(
                        f"zerograph.save_checkpoint: param group {i} has {k}={v!r} on rank 0 but "
                        f"{other[i].get(k)!r} on rank {r}; a checkpoint stores one value per param group: give "
                        "every rank's optimizer the same hyperparameters")
        merged.append({**group, "params": list(dict.fromkeys(n for g in gathered for n in g[i]["params"]))})
    return merged
