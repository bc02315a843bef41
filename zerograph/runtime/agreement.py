"""Ranks that must agree, checked before they talk.

Two checks keep mismatched tensors away from the collectives (gloo aborts
the process from a C++ thread when two ranks' buffers differ in size, and
ranks that run different ZeRO stages or batch splits train wrong without a
word):

* :func:`agree` -- at ``zerograph.compile``/``shard``, before any other
  collective, every rank all-gathers a 32-byte digest of its
  :func:`setup_fingerprint` (resolved config, model structure with parameter
  shapes and dtypes, mesh, passes, zerograph and torch versions). Only when
  the digests differ do the ranks exchange the fingerprints themselves (an
  object all-gather, whose buffers have the same size on every rank), and
  every rank raises :class:`RankMismatchError` naming the ranks, the key and
  the values.
* :class:`StepCheck` -- at the start of every phase of training that
  communicates (a forward, a backward, ``full_state_dict``, a checkpoint),
  every rank all-gathers four int64s (phase, micro-batch, optimizer step,
  model id) on a gloo group of its own, so that ranks that drifted apart (one
  skipped a backward after catching an exception) raise
  :class:`RankMismatchError` before any of the phase's collectives.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zerograph.runtime.errors import RankMismatchError

log = logging.getLogger(__name__)

# Settings that only change what this rank logs or where its tensors live.
RANK_LOCAL_KEYS = frozenset({
    "zerograph.device", "zerograph.debug", "zerograph.track_memory", "zerograph.verify_graphs",
    "steps_per_print", "wall_clock_breakdown",
})
_SHOWN = 8  # differing keys spelled out in a message


def _flatten(value: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key in sorted(value):
            _flatten(value[key], f"{prefix}.{key}" if prefix else str(key), out)
    elif prefix not in RANK_LOCAL_KEYS:
        out[prefix] = json.dumps(value, sort_keys=True, default=str)


def setup_fingerprint(config, model: nn.Module, *, world_size: int, group_ranks: list[int],
                      passes: list[str]) -> dict[str, str]:
    """What must be the same on every rank that shards ``model`` together,
    as ``{dotted key: value text}``: ``config.*`` (every setting but
    :data:`RANK_LOCAL_KEYS`, and the batch sizes resolved for the world
    size), ``model.param.*`` / ``model.buffer.*`` (shape, dtype, tying),
    ``model.module.*`` (each submodule's class), the mesh, the pass list and
    the zerograph and torch versions."""
    out: dict[str, str] = {}
    _flatten(config.to_dict(), "config", out)
    try:
        out["config.resolved_batch"] = json.dumps(list(config.resolve_batch(world_size)))
    except ValueError as exc:  # a ConfigError: the same on every rank that has this config
        out["config.resolved_batch"] = f"invalid: {exc}"
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied = f" tied to {seen[id(p)]}" if id(p) in seen else ""
        seen.setdefault(id(p), name)
        out[f"model.param.{name}"] = f"{tuple(p.shape)} {p.dtype} requires_grad={p.requires_grad}{tied}"
    for name, b in model.named_buffers():
        out[f"model.buffer.{name}"] = f"{tuple(b.shape)} {b.dtype}"
    for name, module in model.named_modules():
        out[f"model.module.{name or '(root)'}"] = type(module).__qualname__
    out["mesh.world_size"] = str(world_size)
    out["mesh.group_ranks"] = str(list(group_ranks))
    out["passes"] = ", ".join(passes)
    # the package's __version__, read without importing the top level from this layer
    out["version.zerograph"] = str(getattr(sys.modules.get("zerograph"), "__version__", "unknown"))
    out["version.torch"] = torch.__version__
    return out


def digest(fingerprint: dict[str, str]) -> bytes:
    """The 32-byte SHA-256 digest of a fingerprint."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).digest()


def model_id(fingerprint: dict[str, str]) -> int:
    """A signed 64-bit number naming the model and config (for :class:`StepCheck`)."""
    return int.from_bytes(digest(fingerprint)[:8], "little", signed=True)


def collective_device(group) -> torch.device:
    """Where tensors for a collective on ``group`` live: the CPU for gloo
    (also a group with a gloo CPU backend), else the current CUDA device."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def agree(group, fingerprint: dict[str, str], where: str) -> None:
    """Raise :class:`RankMismatchError` on every rank of ``group`` unless
    every rank passed the same ``fingerprint`` (collective; see the module
    docstring). ``where``: the function, for the message."""
    world = dist.get_world_size(group)
    device = collective_device(group)
    mine = torch.frombuffer(bytearray(digest(fingerprint)), dtype=torch.int64).to(device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, fingerprint, group=group)
    ranks = dist.get_process_group_ranks(group)
    raise _mismatch(dict(zip(ranks, everyone)), where)


def _mismatch(by_rank: dict[int, dict[str, str]], where: str) -> RankMismatchError:
    me = dist.get_rank()
    first = min(by_rank)
    base = by_rank[first]
    keys = sorted(set().union(*by_rank.values()))
    differences: dict[str, dict[int, str]] = {}
    for key in keys:
        values = {r: fp.get(key, "(absent)") for r, fp in by_rank.items()}
        if len(set(values.values())) > 1:
            differences[key] = values
    # config keys first: they explain the model and mesh differences that follow from them
    ordered = sorted(differences, key=lambda k: (not k.startswith("config."), not k.startswith("version."), k))
    ranks = sorted(r for r, fp in by_rank.items() if any(fp.get(k, "(absent)") != base.get(k, "(absent)")
                                                        for k in differences))
    lines = []
    for key in ordered[:_SHOWN]:
        values = differences[key]
        lines.append(f"  {key}: " + ", ".join(f"rank {r} has {v}" for r, v in sorted(values.items())))
    if len(ordered) > _SHOWN:
        lines.append(f"  ... and {len(ordered) - _SHOWN} more differing key(s)")
    names = ", ".join(map(str, ranks))
    message = (
        f"zerograph: rank {me}: the ranks disagree in {where}: rank(s) {names} differ from rank {first} in "
        f"{len(ordered)} setting(s):\n" + "\n".join(lines) + "\n"
        f"Every rank must call {where} with the same config, the same model (sizes, dtypes, layers) and "
        "the same zerograph and torch versions: fix the config or code of the rank(s) named, then restart "
        "every rank. Nothing was communicated besides this check."
    )
    key = ordered[0]
    return RankMismatchError(message, ranks, key, differences[key], differences)


# -- the per-phase position check ------------------------------------------------

PHASES = ("forward", "backward", "inference forward", "zerograph.full_state_dict", "zerograph.save_checkpoint",
          "zerograph.load_checkpoint", "eval_step", "zerograph.export_pretrained")


class StepCheck:
    """Every rank of a data-parallel group says where it is before a phase
    of training communicates; ranks that are not in the same place raise
    :class:`RankMismatchError` naming each rank's place (collective).

    The check runs on a gloo group of its own over the same ranks (CPU
    tensors, so with NCCL it costs no device synchronization), so it never
    pairs with a collective of the model or of the user's code: two ranks
    that drifted apart meet in this check before either issues the phase's
    collectives. ``model``: :func:`model_id` of the model's fingerprint (two
    models trained in one process are told apart)."""

    def __init__(self, ranks: list[int], model: int, timeout_s: float):
        self.ranks = list(ranks)
        self.model = model
        # Every rank creates this group (with the whole world: named by torch's group counter, like any
        # new_group; a subgroup, e.g. a pipeline stage's data-parallel ranks: only its members, named from
        # the ranks and how many groups each member created before, the same for zerograph's own meshes).
        subgroup = len(self.ranks) != dist.get_world_size()
        self.group = dist.new_group(self.ranks, backend="gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                    use_local_synchronization=subgroup)
        self.count = 0  # checks run, for benchmarks

    def __call__(self, phase: str, micro_step: int, step: int) -> None:
        mine = torch.tensor([PHASES.index(phase), micro_step, step, self.model], dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in self.ranks]
        dist.all_gather(gathered, mine, group=self.group)
        self.count += 1
        rows = torch.stack(gathered)
        if bool((rows == mine).all()):
            return
        raise self._mismatch(phase, rows.tolist())

    def _mismatch(self, phase: str, rows: list[list[int]]) -> RankMismatchError:
        me = dist.get_rank()

        def place(row) -> str:
            kind, micro, step, model = row
            name = PHASES[kind] if 0 <= kind < len(PHASES) else f"phase {kind}"
            text = f"{name} of micro-batch {micro}" if name in ("forward", "backward") else name
            text += f" (optimizer step {step + 1})" if name in ("forward", "backward") else \
                f" after optimizer step {step}"
            return text + ("" if model == self.model else " of another model")

        values = {r: place(row) for r, row in zip(self.ranks, rows)}
        first = values[self.ranks[0]]
        ranks = [r for r in self.ranks if values[r] != first]
        lines = "\n".join(f"  rank {r}: {v}" for r, v in values.items())
        message = (
            f"zerograph: rank {me}: the ranks are not at the same point of training (checked before the "
            f"{phase}; rank(s) {', '.join(map(str, ranks))} differ from rank {self.ranks[0]}):\n{lines}\n"
            "A rank skipped or repeated a forward, a backward or a collective call (full_state_dict, "
            "save_checkpoint, load_checkpoint), e.g. after catching an exception on one rank only, or runs "
            "another model. Every rank must run the same micro-batches and calls in the same order; the "
            "ranks' states now differ: restart every rank from the last checkpoint."
        )
        return RankMismatchError(message, ranks, "position", values)
