"""``python -m zerograph explain``: the command line of :func:`zerograph.explain`."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from zerograph.config import Config
from zerograph.explain import explain



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG",
                        help="DeepSpeed-style JSON config: a file, or inline JSON such as '{\"zero_optimization\": {\"stage\": 3}}'")
    parser.add_argument("--model", default="gpt-tiny", metavar="NAME",
                        help="gpt-tiny (2 layers, d=64), gpt-small (GPT-2 small shape: 12 layers, d=768), "
                             "gpt-12x768 (same), or a Hugging Face model name (its config only, random weights); "
                             "default %(default)s")
    parser.add_argument("--world-size", type=int, default=2, metavar="N", help="ranks to plan for; default %(default)s")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="rows per rank (default: the config's train_micro_batch_size_per_gpu, else 1)")
    parser.add_argument("--seq-len", type=int, default=64, metavar="N", help="tokens per row; default %(default)s")
    parser.add_argument("--trace", metavar="PATH", default=None, help="also write the Chrome trace JSON here")


def _build_model(name: str, seq_len: int):
    """(model, vocabulary size, needs_kwargs) for a CLI model name."""
    from zerograph.models import GPT, GPTConfig

    torch.manual_seed(0)
    if name == "gpt-tiny":
        return GPT(GPTConfig(vocab_size=256, block_size=seq_len, n_layer=2, n_head=2, n_embd=64)), 256, False
    if name in ("gpt-small", "gpt-12x768"):
        return GPT(GPTConfig(vocab_size=50304, block_size=seq_len, n_layer=12, n_head=12, n_embd=768)), 50304, False
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:
        raise ValueError(f"--model {name!r}: not a built-in model (gpt-tiny, gpt-small) and transformers "
                         "is not installed") from exc
    try:
        hf_config = AutoConfig.from_pretrained(name)
    except Exception as exc:
        raise ValueError(f"--model {name!r}: not a built-in model (gpt-tiny, gpt-small) and no Hugging Face "
                         f"config could be loaded for it ({exc})") from exc
    return AutoModelForCausalLM.from_config(hf_config), hf_config.vocab_size, True


def _load_config(text: str) -> Config:
    """The CONFIG argument: inline JSON (it starts with ``{`` or ``[``) or a file path."""
    if not text.lstrip().startswith(("{", "[")):
        return Config.load(text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"inline config: invalid JSON at column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"inline config: expected a JSON object such as '{{\"zero_optimization\": {{\"stage\": 3}}}}'; "
                         f"got a {type(data).__name__}")
    return Config.load(data)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``python -m zerograph explain``."""
    try:
        cfg = _load_config(args.config)
        for flag, value in (("--world-size", args.world_size), ("--batch-size", args.batch_size),
                            ("--seq-len", args.seq_len)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        model, vocab, hf = _build_model(args.model, args.seq_len)
        batch = args.batch_size or cfg.train_micro_batch_size_per_gpu or 1
        if cfg.train_batch_size is not None and cfg.train_micro_batch_size_per_gpu is None:
            batch = args.batch_size or max(1, cfg.train_batch_size // (args.world_size * cfg.gradient_accumulation_steps))
        gen = torch.Generator().manual_seed(0)
        idx = torch.randint(0, vocab, (batch, args.seq_len), generator=gen)
        targets = torch.randint(0, vocab, (batch, args.seq_len), generator=gen)
        if hf:
            report = explain(model, cfg, world_size=args.world_size, input_ids=idx, labels=targets)
        else:
            report = explain(model, cfg, idx, targets, world_size=args.world_size)
    except (ValueError, TypeError, OSError, json.JSONDecodeError) as exc:
        print(f"zerograph explain: error: {exc}", file=sys.stderr)
        return 2
    print(report)
    if args.trace:
        try:
            report.write_chrome_trace(args.trace)
        except OSError as exc:
            print(f"zerograph explain: error: --trace {args.trace}: cannot write the Chrome trace: {exc}",
                  file=sys.stderr)
            return 2
        print(f"\nChrome trace written to {args.trace} (open it in https://ui.perfetto.dev)")
    return 0
