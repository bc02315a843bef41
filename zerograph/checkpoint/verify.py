"""Errors of checkpoint I/O as :class:`~zerograph.runtime.errors.CheckpointError`,
the same on every rank.

``torch.distributed.checkpoint`` reports a failed read or write as a
``CheckpointException``, a ``BaseException`` (it passes ``except
Exception``) whose text is every rank's traceback. :func:`run_dcp`
translates it into a CheckpointError naming the ranks, the path, the cause
and what to do; a failed collective inside it is handed on as itself, so
that ``naming_failed_ranks`` names the dead rank. :func:`verified_checkpoint`
runs the checks before a load (which directory, commit marker, checksums)
and agrees on their outcome across the ranks, so a problem one rank sees
never leaves the others waiting in DCP's collectives.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from torch.distributed.checkpoint.api import CheckpointException

from zerograph.checkpoint.integrity import COMMIT_MARKER, check_files, read_marker, resolve, what_to_do
from zerograph.runtime.errors import CheckpointError, is_collective_failure

log = logging.getLogger(__name__)

_ADVICE = (
    (("No space left", "Disk quota"), "Free space on the filesystem of the checkpoint (or save elsewhere), then "
                                      "save again."),
    (("Not a directory", "File exists"), "A part of the path is a regular file, not a folder: choose a path whose "
                                         "parent folders are folders, or move that file away."),
    (("Permission denied", "Read-only"), "Make the folder writable by every rank, or save elsewhere."),
)


def _advice(cause: str) -> str:
    for needles, text in _ADVICE:
        if any(n in cause for n in needles):
            return text
    return "Check the cause above and the filesystem every rank writes to, then try again."


def _root(failure: Any) -> BaseException:
    return failure[0] if isinstance(failure, tuple) else failure


def run_dcp(fn: Callable, state: dict[str, Any], *, path: Path, action: str, target: Path | None = None) -> Any:
    """``fn(state, checkpoint_id=path)`` (``dcp.save`` or ``dcp.load``) with
    its errors as :class:`CheckpointError`; ``action``: "save" or "load";
    ``target``: the checkpoint the messages name (a save writes to a
    temporary ``path`` next to it)."""
    import torch.distributed as dist

    me = dist.get_rank() if dist.is_initialized() else 0
    checkpoint_id, path = path, target if target is not None else path
    try:
        return fn(state, checkpoint_id=str(checkpoint_id))
    except CheckpointException as exc:
        roots = {rank: _root(f) for rank, f in exc.failures.items()}
        if not roots:
            error = CheckpointError(f"zerograph: rank {me}: could not {action} the checkpoint {path}: {exc}", path)
            raise error from None
        for root in roots.values():
            if is_collective_failure(root):
                raise root from None  # a rank died: naming_failed_ranks names it
        ranks = sorted(roots)
        first = roots[ranks[0]]
        cause = f"{type(first).__name__}: {first}"
        todo = f" {what_to_do(path)}." if action == "load" else ""
        error = CheckpointError(
            f"zerograph: rank {me}: could not {action} the checkpoint {path}: rank(s) {', '.join(map(str, ranks))} "
            f"failed: {cause}\n{_advice(cause)}{todo}", path, getattr(first, "filename", None), ranks)
        raise error from first
    except OSError as exc:  # raised outside DCP's own error collection (e.g. creating the folder)
        cause = f"{type(exc).__name__}: {exc}"
        todo = f" {what_to_do(path)}." if action == "load" else ""
        raise CheckpointError(f"zerograph: rank {me}: could not {action} the checkpoint {path}: {cause}\n"
                              f"{_advice(cause)}{todo}", path, exc.filename, [me]) from exc


def verified_checkpoint(path: Path, rank: int, world: int, verify: bool, broadcast: Callable,
                        all_gather: Callable) -> Path:
    """The directory to load for ``path`` (rank 0 decides, see
    :func:`~zerograph.checkpoint.integrity.resolve`), after every rank
    checked its share of the files against the commit marker's checksums
    (with ``verify``). Raises the same :class:`CheckpointError` on every rank
    when any rank found a problem (collective)."""
    decision = None
    if rank == 0:
        try:
            resolved, note = resolve(path)
            decision = ("ok", str(resolved), note)
        except CheckpointError as exc:
            decision = ("error", str(exc), exc.file)
    decision = broadcast(decision)
    if decision[0] == "error":
        raise CheckpointError(decision[1], path, decision[2], [0])
    resolved, note = Path(decision[1]), decision[2]
    if note:
        log.warning("%s", note)
    marker = read_marker(resolved)
    if marker is None:
        problems = [(str(resolved / COMMIT_MARKER), f"{resolved / COMMIT_MARKER} cannot be read on rank {rank} "
                                                    "(is the folder on a filesystem every rank sees?)")]
    else:
        problems = check_files(resolved, marker, rank, world) if verify else []
    found = [(r, file, text) for r, mine in enumerate(all_gather(problems)) for file, text in mine]
    if found:
        ranks = sorted({r for r, _, _ in found})
        lines = "\n".join(f"  rank {r} found: {text}" for r, _, text in found[:8])
        more = f"\n  ... and {len(found) - 8} more" if len(found) > 8 else ""
        raise CheckpointError(
            f"zerograph: rank {rank}: the checkpoint {resolved} is damaged; nothing was loaded:\n{lines}{more}\n"
            f"What to do: {what_to_do(resolved)}.", resolved, found[0][1], ranks)
    if verify and rank == 0 and marker is not None and not isinstance(marker.get("files"), dict):
        log.warning("zerograph: %s was saved without checksums (an earlier zerograph): not verified", resolved)
    return resolved
