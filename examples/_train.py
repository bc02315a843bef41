"""The training loop every example shares (read an example first: hf_gpt2.py).

Launch with torchrun; each rank trains on its slice of the global batch of
the text shipped with zerograph (byte-level, vocab 256), so nothing is
downloaded. Rank 0 prints the loss and, at the end, saves the full model with
``save_pretrained`` (Hugging Face format: ``from_pretrained`` loads it).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.distributed as dist

import zerograph
from zerograph.models import data as textdata


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--stage", type=int, default=3, choices=(0, 1, 2, 3), help="ZeRO stage")
    p.add_argument("--config", default=None, help="a DeepSpeed-style JSON config (--stage overrides its stage)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (rows over all ranks)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bf16", action="store_true", help="bf16 compute with fp32 master weights")
    p.add_argument("--out", default=None, help="directory for save_pretrained at the end (rank 0)")
    return p.parse_args()


def train(model: torch.nn.Module, args: argparse.Namespace) -> list[float]:
    logging.basicConfig(level=logging.WARNING)
    config = zerograph.Config.load(args.config).to_dict() if args.config else {}
    config.setdefault("zero_optimization", {})["stage"] = args.stage
    if args.bf16:
        config["bf16"] = {"enabled": True}
    unwrapped = model
    model = zerograph.compile(model, config)  # initializes the process group from torchrun's environment
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    opt = zerograph.make_optimizer(model, torch.optim.AdamW, lr=args.lr)  # AdamW on the local shards
    train_data, _ = textdata.split(textdata.load_corpus())
    device = next(iter(model.parameters())).device
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx, targets = textdata.get_batch(train_data, step, args.batch_size, args.seq, rank, world)
        loss = model(input_ids=idx.to(device), labels=idx.to(device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.1f}s)", flush=True)
    state = zerograph.full_state_dict(model)  # collective: every rank calls it
    if rank == 0 and args.out:
        unwrapped.save_pretrained(args.out, state_dict=state)
        print(f"saved {args.out}")
    if rank == 0:
        print(zerograph.inspect(model).summary())
    return losses
