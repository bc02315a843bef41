"""Checksums, the commit marker, and finding the newest complete checkpoint.

A zerograph checkpoint directory holds DCP's files (``.metadata``, written
by rank 0, and ``__<rank>_<n>.distcp``, each rank's shards) and the commit
marker ``ZEROGRAPH_COMMITTED``, written last by rank 0: a JSON object with
the SHA-256 and size of every other file (``"files"``), the world size, the
step and the time of the save. A directory without a readable marker is
not a complete checkpoint.

Every rank hashes the files it wrote; rank 0 puts the digests into the
marker. On load every rank checks ``.metadata`` and a share of the shard
files (file ``i`` of ``n``, sorted, on rank ``i % world``), so a checkpoint
is read once in all, in parallel; any corruption, truncation or missing file
raises :class:`~zerograph.runtime.errors.CheckpointError` on every rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from zerograph.runtime.errors import CheckpointError

log = logging.getLogger(__name__)

COMMIT_MARKER = "ZEROGRAPH_COMMITTED"
METADATA = ".metadata"
_CHUNK = 8 << 20


def file_digest(path: Path) -> dict[str, Any]:
    """``{"sha256": hex digest, "bytes": size}`` of the file at ``path``."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
    return {"sha256": h.hexdigest(), "bytes": size}


def written_by(rank: int, directory: Path) -> dict[str, dict[str, Any]]:
    """The digests of the shard files rank ``rank`` wrote into ``directory``
    (DCP names them ``__<rank>_<n>.distcp``)."""
    return {p.name: file_digest(p) for p in sorted(directory.glob(f"__{rank}_*.distcp"))}


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The commit marker of ``directory``, or None when there is none or it
    cannot be read (a torn write, a flipped byte)."""
    try:
        marker = json.loads((directory / COMMIT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_complete(directory: Path) -> bool:
    return directory.is_dir() and read_marker(directory) is not None


def marker_for(files: dict[str, dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {**fields, "saved_at": time.time(), "files": files}


def _written_rank(name: str) -> str:
    if name == METADATA:
        return "rank 0"
    if name.startswith("__") and "_" in name[2:]:
        return f"rank {name[2:].split('_', 1)[0]}"
    return "an unknown rank"


def check_files(directory: Path, marker: dict[str, Any], rank: int, world: int) -> list[tuple[str, str]]:
    """This rank's share of the checks of ``directory`` against ``marker``:
    ``.metadata`` (every rank reads it) and shard file ``i`` when
    ``i % world == rank``. One ``(file path, what is wrong)`` per problem."""
    files = marker.get("files")
    if not isinstance(files, dict):
        return []  # written before checksums: see load_checkpoint's warning
    problems = []
    shards = sorted(n for n in files if n != METADATA)
    mine = [METADATA] if METADATA in files else []
    mine += [n for i, n in enumerate(shards) if i % world == rank]
    for name in mine:
        expected = files[name]
        path = directory / name
        who = _written_rank(name)
        if not path.is_file():
            problems.append((str(path), f"{path} (written by {who}) is missing"))
            continue
        size = path.stat().st_size
        if size != expected.get("bytes"):
            problems.append((str(path), f"{path} (written by {who}) has {size} bytes, the save wrote "
                                        f"{expected.get('bytes')} (truncated or overwritten)"))
            continue
        if file_digest(path)["sha256"] != expected.get("sha256"):
            problems.append((str(path), f"{path} (written by {who}) is corrupt: its SHA-256 differs from the "
                                        "one recorded when it was saved"))
    return problems


def candidates(path: Path) -> list[Path]:
    """``path`` and what an interrupted save of it left: ``<path>.tmp-*``
    (a new checkpoint, complete once it has a marker) and ``<path>.old-*``
    (the checkpoint it replaced; the save renames ``path`` to it, then the
    ``.tmp-*`` to ``path``)."""
    parent = path.parent
    found = [path] if path.exists() else []
    if parent.is_dir():
        found += sorted(parent.glob(f"{path.name}.tmp-*")) + sorted(parent.glob(f"{path.name}.old-*"))
    return found


def _saved_at(directory: Path) -> float:
    marker = read_marker(directory) or {}
    saved = marker.get("saved_at")
    return float(saved) if isinstance(saved, (int, float)) else (directory / COMMIT_MARKER).stat().st_mtime


def newest_complete(path: Path) -> Path | None:
    """The newest complete checkpoint among ``path`` and its interrupted saves' leftovers."""
    complete = [p for p in candidates(path) if is_complete(p)]
    return max(complete, key=_saved_at) if complete else None


def other_complete(path: Path) -> Path | None:
    """The newest complete checkpoint in ``path``'s folder other than ``path``
    itself (the previous one, to load instead of a damaged ``path``)."""
    parent = path.parent
    if not parent.is_dir():
        return None
    others = [p for p in parent.iterdir() if p != path and is_complete(p)]
    return max(others, key=_saved_at) if others else None


def what_to_do(path: Path) -> str:
    """Advice naming the checkpoint to load instead of a damaged ``path``."""
    other = other_complete(path)
    if other is None:
        return (f"no other complete zerograph checkpoint is in {path.parent}: restore {path} from a copy, or "
                "start the run afresh")
    marker = read_marker(other) or {}
    step = f" (optimizer step {marker['step']})" if isinstance(marker.get("step"), int) else ""
    return f"load the previous complete checkpoint instead: {other}{step}"


def resolve(path: Path) -> tuple[Path, str]:
    """The directory to load for ``path`` and a note for the log ("" when it
    is ``path`` itself). A save interrupted between its two renames leaves
    no ``path`` but a complete ``<path>.tmp-*`` (the newer checkpoint) and
    ``<path>.old-*`` (the one it replaced): the newest complete one is
    loaded. Raises :class:`CheckpointError` when there is none."""
    if is_complete(path):
        return path, ""
    newest = None if path.exists() else newest_complete(path)
    if newest is not None:
        return newest, (f"zerograph: {path} does not exist: a save to it was interrupted between its two "
                        f"renames; loading the newest complete checkpoint that save left, {newest}. "
                        f"Rename it to {path} to make this permanent")
    if not path.exists():
        raise CheckpointError(f"zerograph: no checkpoint at {path}; {what_to_do(path)}", path)
    if (path / COMMIT_MARKER).exists():
        raise CheckpointError(
            f"zerograph: the commit marker {path / COMMIT_MARKER} cannot be read (corrupt); {what_to_do(path)}",
            path, str(path / COMMIT_MARKER))
    raise CheckpointError(
        f"zerograph: {path} has no {COMMIT_MARKER} marker: it is not a complete zerograph checkpoint (a save "
        f"was interrupted, or it was not written by zerograph.save_checkpoint); {what_to_do(path)}", path)
