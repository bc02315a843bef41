"""The demo's run plan: the options validated and resolved (config merged with
``--stage``, global batch, gradient accumulation) into one picklable
:class:`Plan` that the parent builds and every rank receives."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from zerograph.config import Config
from zerograph.models import GPTConfig
from zerograph.models import data as textdata

__all__ = ["Plan", "build_plan"]


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _zerograph_config(args: argparse.Namespace) -> dict[str, Any]:
    """The user's config file (if any) with the stage merged over it, as a dict."""
    user: dict[str, Any] = {}
    if args.config is not None:
        Config.load(args.config)  # a missing file or bad JSON is reported with the file's name
        user = json.loads(Path(args.config).read_text())
    stage = args.stage
    if stage is None:
        stage = user.get("zero_optimization", {}).get("stage", 3)
    merged = _deep_merge(user, {"zero_optimization": {"stage": stage}})
    Config.load(merged)  # validate here, with a clear error, before any process starts
    return merged


def _model_config(args: argparse.Namespace) -> GPTConfig:
    return GPTConfig(
        vocab_size=textdata.VOCAB_SIZE,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        dropout=0.0,
        bias=True,
        tie_weights=True,
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a rank needs, picklable."""

    args: dict[str, Any]
    model: dict[str, Any]
    zerograph: dict[str, Any]
    global_batch: int
    accumulation: int
    out_dir: str


def build_plan(args: argparse.Namespace) -> Plan:
    for name in ("world_size", "steps", "n_layer", "n_embd", "n_head", "block_size", "eval_batches"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.n_embd % args.n_head:
        raise ValueError(f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})")
    if args.lr <= 0 or args.temperature <= 0:
        raise ValueError("--lr and --temperature must be positive")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be positive (seconds before the run is stopped), got {args.timeout:g}")
    if args.sample_bytes < 0 or args.top_k < 0:
        raise ValueError("--sample-bytes and --top-k must not be negative")
    zg = _zerograph_config(args)
    cfg = Config.load(zg)
    train_batch, _, accumulation = cfg.resolve_batch(args.world_size)
    global_batch = train_batch if train_batch is not None else args.batch_size
    if global_batch % (args.world_size * accumulation):
        raise ValueError(
            f"the global batch ({global_batch}) must be divisible by world size ({args.world_size}) "
            f"x gradient accumulation steps ({accumulation}); change --batch-size"
        )
    if not args.prompt.encode("utf-8"):
        raise ValueError("--prompt must not be empty")
    return Plan(
        args=vars(args).copy(),
        model=dataclasses.asdict(_model_config(args)),
        zerograph=zg,
        global_batch=global_batch,
        accumulation=accumulation,
        out_dir=str(Path(args.out).resolve()),
    )

