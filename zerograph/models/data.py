"""Byte-level text data for the demo and the tests.

The tokenizer is the identity on UTF-8 bytes: a vocabulary of 256 ids, no
training, no files. :func:`get_batch` draws the rows of a step's *global*
batch from ``(seed, step)`` alone, and each rank takes its contiguous slice,
so a run on 1, 2 or 4 ranks trains on exactly the same tokens.
"""

from __future__ import annotations

import importlib.resources

import torch

__all__ = ["VOCAB_SIZE", "encode", "decode", "load_corpus", "split", "get_batch"]

VOCAB_SIZE = 256
CORPUS = "corpus.txt"


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a 1-D int64 tensor of ids in [0, 256)."""
    raw = bytearray(text.encode("utf-8"))
    if not raw:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(raw, dtype=torch.uint8).long()


def decode(ids: torch.Tensor | list[int]) -> str:
    """Text from byte ids; invalid UTF-8 (a sample cut mid-character) is replaced."""
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def load_corpus(name: str = CORPUS) -> torch.Tensor:
    """The packaged corpus (``zerograph/data/<name>``) as byte ids."""
    resource = importlib.resources.files("zerograph").joinpath("data", name)
    return encode(resource.read_text(encoding="utf-8"))


def split(data: torch.Tensor, frac: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val): the first ``frac`` of the tokens and the rest."""
    if not 0.0 < frac < 1.0:
        raise ValueError(f"frac must be in (0, 1), got {frac}")
    n = int(len(data) * frac)
    return data[:n], data[n:]


def get_batch(
    data: torch.Tensor,
    step: int,
    batch_size: int,
    block_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the global batch of ``step``: ``(idx, targets)``.

    ``batch_size`` is the global number of rows; it must be divisible by
    ``world_size``. Row ``i`` of the global batch is the window of
    ``block_size`` tokens starting at an offset drawn from ``(seed, step)``;
    targets are the same window shifted by one token. Rank ``r`` gets rows
    ``[r * b, (r + 1) * b)`` with ``b = batch_size // world_size``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of world_size ({world_size})")
    span = len(data) - block_size - 1
    if span < 0:
        raise ValueError(f"data has {len(data)} tokens; need more than block_size + 1 = {block_size + 1}")
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    starts = torch.randint(0, span + 1, (batch_size,), generator=gen)
    per_rank = batch_size // world_size
    starts = starts[rank * per_rank:(rank + 1) * per_rank]
    offsets = torch.arange(block_size + 1)
    windows = data[starts[:, None] + offsets].long()
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
