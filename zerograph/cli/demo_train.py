"""What runs on every rank of the demo: training with a learning-rate schedule
and a progress bar, the validation loss, the text sample, the model-state
byte count and rank 0's checkpoint (:func:`rank_main`)."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

import zerograph
from zerograph.cli.demo_plan import Plan
from zerograph.config import Config
from zerograph.models import GPT, GPTConfig
from zerograph.models import data as textdata
from zerograph.runtime.offload import _local

__all__ = ["VAL_SEED_OFFSET", "rank_main"]

VAL_SEED_OFFSET = 1_000_000  # validation batches use steps far from the training ones


def _lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warmup over the first min(20, steps/10) steps, then cosine decay to 10% of peak."""
    warmup = max(1, min(20, steps // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class _Progress:
    """A one-line progress bar on stderr (rank 0 only)."""

    def __init__(self, total: int, enabled: bool, width: int = 30):
        self.total, self.enabled, self.width = total, enabled, width
        self.start = time.perf_counter()
        self.first_done: float | None = None  # the first step includes compilation: no ETA from it

    def update(self, done: int, loss: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.first_done is None:
            self.first_done = now
        elapsed = now - self.start
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        if done == 1 and self.total > 1:
            left = "   ?"
        else:
            left = f"{(now - self.first_done) / max(1, done - 1) * (self.total - done):4.0f}"
        sys.stderr.write(f"\rtraining [{bar}] {done}/{self.total}  loss {loss:.3f}  "
                         f"{elapsed:5.1f}s elapsed, ~{left}s left ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of this rank's local tensors: parameter shards, gradient shards,
    optimizer state (Adam's two moments; its 0-dim step counters separately).
    Tensors sharing storage (tied weights) are counted once."""
    seen: set[tuple[int, int]] = set()

    def nbytes(t: torch.Tensor) -> int:
        t = _local(t)
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    params = list(dict.fromkeys(model.parameters()))
    out = {"params": 0, "grads": 0, "optimizer": 0, "step_counters": 0}
    for p in params:
        out["params"] += nbytes(p)
        if p.grad is not None:
            out["grads"] += nbytes(p.grad)
    for state in opt.state.values():  # keyed by the parameters, or by make_optimizer's masters
        for value in state.values():
            if isinstance(value, torch.Tensor):
                out["step_counters" if value.dim() == 0 else "optimizer"] += nbytes(value)
    return out


def _mean_over_ranks(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t.item())


@torch.no_grad()
def _val_loss(model, val: torch.Tensor, plan: Plan, rank: int, world: int) -> float:
    a = plan.args
    total = 0.0
    for i in range(a["eval_batches"]):
        idx, targets = textdata.get_batch(val, VAL_SEED_OFFSET + i, plan.global_batch, a["block_size"],
                                          rank, world, seed=a["seed"])
        total += model(idx, targets).loss.item()
    return _mean_over_ranks(total / a["eval_batches"])


@torch.no_grad()
def _sample(model, plan: Plan, world: int) -> str:
    """Continue the prompt, one byte per forward.

    Every forward has one fixed shape (the validation batches' rows per
    rank x block size), so the growing text never triggers a recompilation:
    the context is right-padded, and since the model is causal the logits at
    the last real position do not depend on the padding. Every rank runs the
    same calls (stage 3 gathers parameters inside the forward) with the same
    generator; only row 0 is used.
    """
    a = plan.args
    block = a["block_size"]
    rows = plan.global_batch // world
    ids = textdata.encode(a["prompt"])
    gen = torch.Generator().manual_seed(a["seed"])
    window = torch.full((rows, block), ord(" "), dtype=torch.long)
    for _ in range(a["sample_bytes"]):
        context = ids[-block:]
        window[:, :len(context)] = context
        logits = model(window).logits[0, len(context) - 1].float()
        if a["top_k"] == 0:
            nxt = logits.argmax().view(1)
        else:
            top, where = logits.topk(min(a["top_k"], logits.numel()))
            probs = torch.softmax(top / a["temperature"], dim=-1)
            nxt = where[torch.multinomial(probs, 1, generator=gen)]
        ids = torch.cat([ids, nxt])
    return textdata.decode(ids)


def _save(plan: Plan, state: dict[str, torch.Tensor], losses: dict[str, Any]) -> dict[str, str]:
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"model": out / "model.pt", "config": out / "config.json", "losses": out / "losses.json"}
    torch.save(state, paths["model"])
    a = plan.args
    config = {
        "model": plan.model,
        "zerograph": Config.load(plan.zerograph).to_dict(),
        "training": {
            "world_size": a["world_size"],
            "steps": a["steps"],
            "global_batch": plan.global_batch,
            "gradient_accumulation_steps": plan.accumulation,
            "lr": a["lr"],
            "schedule": "linear warmup min(20, steps/10), cosine decay to 10%",
            "optimizer": "torch.optim.AdamW (default betas, weight_decay 0.01)",
            "seed": a["seed"],
            "data": "zerograph/data/corpus.txt (byte-level, first 90% train)",
        },
    }
    paths["config"].write_text(json.dumps(config, indent=2) + "\n")
    paths["losses"].write_text(json.dumps(losses, indent=2) + "\n")
    return {k: str(v) for k, v in paths.items()}


def rank_main(plan: Plan) -> dict[str, Any]:
    """One rank of the demo (run by :func:`zerograph.runtime.launch.spawn`)."""
    import torch.distributed as dist

    a = plan.args
    logging.basicConfig(level=logging.INFO if a["verbose"] else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1

    t0 = time.perf_counter()
    train, val = textdata.split(textdata.load_corpus())
    torch.manual_seed(a["seed"])  # the same initial model on every rank
    model = GPT(GPTConfig(**plan.model))
    model = zerograph.compile(model, plan.zerograph)
    opt = zerograph.make_optimizer(model, torch.optim.AdamW, lr=a["lr"])  # steps the local shards

    setup_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    val_before = _val_loss(model, val, plan, rank, world)
    val_before_time = time.perf_counter() - t0

    progress = _Progress(a["steps"], enabled=a["progress"] and rank == 0)
    losses: list[float] = []
    step_times: list[float] = []
    state_bytes: dict[str, int] = {}
    comm: dict[str, int] = {}
    start = time.perf_counter()
    for step in range(a["steps"]):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, a["steps"], a["lr"])
        idx, targets = textdata.get_batch(train, step, plan.global_batch, a["block_size"], rank, world, seed=a["seed"])
        total = 0.0
        for micro_idx, micro_targets in zip(idx.chunk(plan.accumulation), targets.chunk(plan.accumulation)):
            loss = model(micro_idx, micro_targets).loss
            loss.backward()
            total += loss.item() / plan.accumulation
        opt.step()
        if step == a["steps"] - 1:  # gradients and optimizer state are both alive here
            state_bytes = _state_bytes(model, opt)
            comm = dict(zerograph.inspect(model).comm_bytes_last_step)
        opt.zero_grad()
        losses.append(_mean_over_ranks(total))
        step_times.append(time.perf_counter() - t0)
        progress.update(step + 1, losses[-1])
    progress.close()
    train_time = time.perf_counter() - start

    t0 = time.perf_counter()
    val_after = _val_loss(model, val, plan, rank, world)
    eval_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    sample = _sample(model, plan, world) if a["sample_bytes"] else ""
    sample_time = time.perf_counter() - t0

    t0 = time.perf_counter()
    state = zerograph.full_state_dict(model)  # collective: every rank
    result: dict[str, Any] = {"rank": rank, "state_bytes": state_bytes, "comm": comm}
    if rank == 0:
        loss_record = {"train": losses, "val_before": val_before, "val_after": val_after}
        result.update(
            train_losses=losses,
            val_before=val_before,
            val_after=val_after,
            step_times=step_times,
            train_time=train_time,
            sample=sample,
            paths=_save(plan, state, loss_record),
            state_keys={k: tuple(v.shape) for k, v in state.items()},
        )
        result["phase_times"] = dict(setup=setup_time, val_before=val_before_time, train=train_time,
                                     val_after=eval_time, sample=sample_time, save=time.perf_counter() - t0)
    return result
