"""zerograph.initialize (DeepSpeed's initialize and engine): training with the
config's optimizer and scheduler equals a hand-written torch loop at ZeRO 0-3
on 2 gloo ranks with gradient accumulation and clipping; tagged checkpoints
resume exactly; the monitoring sections write what they promise."""

from __future__ import annotations

import argparse
import csv
import gc
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zerograph
from zerograph.config import ConfigError
from zerograph.runtime.launch import spawn

TIMEOUT = 420
WORLD = 2
MICRO = 4  # rows per rank per micro-batch
GAS = 2
STEPS = 4
LR, BETAS, EPS, WD, CLIP = 0.05, (0.9, 0.99), 1e-4, 0.01, 0.5
WARMUP, TOTAL = 2, 6  # WarmupDecayLR


class Net(nn.Module):
    """Odd widths: uneven shards and padding."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 27)
        self.norm = nn.LayerNorm(27)
        self.fc2 = nn.Linear(27, 5)

    def forward(self, x, y):
        return F.cross_entropy(self.fc2(torch.tanh(self.norm(self.fc1(x)))), y)


def make_net() -> Net:
    torch.manual_seed(7)
    return Net()


def global_batch(step: int, rows: int = MICRO * GAS * WORLD):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(rows, 12, generator=g), torch.randint(0, 5, (rows,), generator=g)


def config(stage: int, **extra) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS, "gradient_clipping": CLIP,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR,
                                                          "warmup_num_steps": WARMUP, "total_num_steps": TOTAL,
                                                          "warmup_type": "linear"}},
        **extra,
    }


def warmup_decay(epoch: int) -> float:
    """DeepSpeed's WarmupDecayLR (linear warmup from 0 to LR, then linear decay), written out;
    its iteration is torch's last_epoch minus one."""
    it = epoch - 1
    if it < 0:
        return 0.0
    if it < WARMUP:
        return LR * it / WARMUP
    return LR * max(0.0, (TOTAL - it) / max(1.0, TOTAL - WARMUP))


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weight matrices only (the Hugging Face grouping)."""
    named = dict(model.named_parameters())
    return [{"params": [p for n, p in named.items() if p.dim() > 1], "weight_decay": weight_decay},
            {"params": [p for n, p in named.items() if p.dim() <= 1], "weight_decay": 0.0}]


def reference(steps: int = STEPS, grouped: bool = False):
    """The hand-written loop: one process, the whole global batch, torch's AdamW and a LambdaLR."""
    model = make_net()
    params = decay_groups(model, WD) if grouped else model.parameters()
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: warmup_decay(e) / LR)
    losses, lrs = [], []
    for step in range(steps):
        x, y = global_batch(step)
        lrs.append(opt.param_groups[0]["lr"])
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, lrs, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rank_rows(step: int):
    import torch.distributed as dist

    x, y = global_batch(step)
    rank, world = dist.get_rank(), dist.get_world_size()
    return x.chunk(world)[rank], y.chunk(world)[rank]


def train(engine, steps) -> tuple[list[float], list[float]]:
    """DeepSpeed's loop: forward, backward, step per micro-batch; mean losses over micro-batches and ranks."""
    import torch.distributed as dist

    losses, lrs = [], []
    for step in steps:
        x, y = _rank_rows(step)
        lrs.append(engine.get_lr()[0])
        total = torch.zeros(())
        for mx, my in zip(x.chunk(GAS), y.chunk(GAS)):
            loss = engine(mx, my)
            engine.backward(loss)
            engine.step()
            total += loss.detach() / GAS
        dist.all_reduce(total)
        losses.append(total.item() / dist.get_world_size())
    return losses, lrs


def _result(engine, losses, lrs):
    return {"losses": losses, "lrs": lrs, "global_steps": engine.global_steps,
            "params": {k: v.detach().clone() for k, v in zerograph.full_state_dict(engine.module).items()}}


def run_stages():
    results = {}
    for stage in (0, 1, 2, 3):
        torch._dynamo.reset()
        model = make_net()
        engine, opt, loader, sched = zerograph.initialize(model=model, model_parameters=model.parameters(),
                                                          config=config(stage))
        assert loader is None and sched is engine.lr_scheduler and opt is engine.optimizer
        assert engine.gradient_accumulation_steps() == GAS and engine.train_batch_size() == MICRO * GAS * WORLD
        results[stage] = _result(engine, *train(engine, range(STEPS)))
        del engine, opt, sched
        gc.collect()
    # a client optimizer over model.parameters() (two weight-decay groups) and a scheduler on it, built before
    # initialize: rebuilt over the shards
    torch._dynamo.reset()
    model = make_net()
    client = torch.optim.AdamW(decay_groups(model, WD), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    client_sched = torch.optim.lr_scheduler.LambdaLR(client, lambda e: warmup_decay(e) / LR)
    cfg = {k: v for k, v in config(3).items() if k not in ("optimizer", "scheduler")}
    engine, opt, _, sched = zerograph.initialize(model=model, optimizer=client, lr_scheduler=client_sched, config=cfg)
    assert sched is client_sched and [g["weight_decay"] for g in opt.param_groups] == [WD, 0.0]
    results["client"] = _result(engine, *train(engine, range(STEPS)))
    return results


def _assert_same(result, ref_losses, ref_lrs, ref_params):
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert result["lrs"] == pytest.approx(ref_lrs, rel=1e-12)
    assert result["params"].keys() == ref_params.keys()
    for key, ref in ref_params.items():
        torch.testing.assert_close(result["params"][key], ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.timeout(TIMEOUT + 30)
def test_initialize_trains_like_a_hand_written_torch_loop_at_every_stage():
    results = spawn(run_stages, WORLD, timeout=TIMEOUT)
    ref_losses, ref_lrs, ref_params = reference()
    assert ref_lrs[:3] == [0.0, 0.0, LR / 2] and ref_losses[-1] < ref_losses[0]
    for rank_results in results:
        for name in (0, 1, 2, 3):
            assert rank_results[name]["global_steps"] == STEPS
            _assert_same(rank_results[name], ref_losses, ref_lrs, ref_params)
    grouped_losses, grouped_lrs, grouped_params = reference(grouped=True)
    assert not torch.equal(grouped_params["fc2.bias"], ref_params["fc2.bias"])  # the groups matter
    _assert_same(results[0]["client"], grouped_losses, grouped_lrs, grouped_params)


# -- checkpoints ---------------------------------------------------------------------


def run_resume(root: str, stage: int):
    import torch.distributed as dist

    torch._dynamo.reset()
    model = make_net()
    engine, _, _, _ = zerograph.initialize(model=model, config=config(stage))
    straight = _result(engine, *train(engine, range(STEPS)))
    del engine
    torch._dynamo.reset()
    model = make_net()
    engine, _, _, _ = zerograph.initialize(model=model, config=config(stage))
    assert engine.load_checkpoint(root) == (None, None)  # no "latest" file yet: nothing loaded
    first = train(engine, range(2))
    engine.save_checkpoint(root, client_state={"epoch": 3, "note": "half"})
    engine.save_checkpoint(root, tag="other", save_latest=False)
    del engine
    torch._dynamo.reset()
    model = make_net()
    engine, _, _, _ = zerograph.initialize(model=model, config=config(stage))
    path, client_state = engine.load_checkpoint(root)
    assert path == str(Path(root) / "global_step2") and client_state == {"epoch": 3, "note": "half"}
    assert engine.global_steps == 2 and engine.micro_steps == 2 * GAS
    rest = train(engine, range(2, STEPS))
    dist.barrier()
    return {"straight": straight, "resumed": _result(engine, first[0] + rest[0], first[1] + rest[1]),
            "latest": (Path(root) / "latest").read_text(), "tags": sorted(p.name for p in Path(root).iterdir())}


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("stage", [3])
def test_save_and_load_checkpoint_resume_exactly(tmp_path, stage):
    results = spawn(run_resume, WORLD, str(tmp_path / "ckpt"), stage, timeout=TIMEOUT)
    for r in results:
        assert r["latest"] == "global_step2" and r["tags"] == ["global_step2", "latest", "other"]
        assert r["resumed"]["losses"] == r["straight"]["losses"] and r["resumed"]["lrs"] == r["straight"]["lrs"]
        for key, value in r["straight"]["params"].items():
            assert torch.equal(r["resumed"]["params"][key], value), key


# -- monitors ------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run_monitors(out: str):
    handler = _Records()
    logger = logging.getLogger("zerograph.integrations")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    torch._dynamo.reset()
    model = make_net()
    cfg = config(2, steps_per_print=1, wall_clock_breakdown=True,
                 csv_monitor={"enabled": True, "output_path": out, "job_name": "job"},
                 comms_logger={"enabled": True, "verbose": True},
                 flops_profiler={"enabled": True, "profile_step": 1, "output_file": f"{out}/flops.txt"})
    engine, _, _, _ = zerograph.initialize(model=model, config=cfg)
    rank_losses = []
    import torch.distributed as dist

    for step in range(3):
        x, y = _rank_rows(step)
        micro = []
        for mx, my in zip(x.chunk(GAS), y.chunk(GAS)):
            loss = engine(mx, my)
            engine.backward(loss)
            engine.step()
            micro.append(loss.item())
        rank_losses.append(sum(micro) / GAS)
    dist.barrier()
    logger.removeHandler(handler)
    return {"messages": handler.messages, "rank_losses": rank_losses, "flops": engine.flops_profiler.result,
            "comms_last": engine.comms_logger.last_step, "comms_total": dict(engine.comms_logger.total),
            "inspect": dict(zerograph.inspect(engine.module).comm_bytes_last_step)}


def _padded_bytes(model: nn.Module, world: int) -> int:
    """fp32 bytes of every parameter with dim 0 padded to a multiple of the world size."""
    return 4 * sum(-(-p.shape[0] // world) * world * (p.numel() // p.shape[0]) for p in model.parameters())


def _linear_flops(rows: int) -> int:
    """Forward and backward FLOPs of Net on ``rows`` rows: 2 per multiply-add; the backward computes both
    gradients of fc2 and only the weight gradient of fc1 (its input needs none)."""
    fc1, fc2 = 2 * rows * 12 * 27, 2 * rows * 27 * 5
    return (fc1 + fc2) + (fc1 + 2 * fc2)


@pytest.mark.timeout(TIMEOUT + 30)
def test_monitors_log_time_count_flops_and_bytes(tmp_path):
    results = spawn(run_monitors, WORLD, str(tmp_path), timeout=TIMEOUT)
    rank0, rank1 = results
    # steps_per_print: one progress line per optimizer step, rank 0 only
    progress = [m for m in rank0["messages"] if m.startswith("zerograph: step=")]
    assert [m.split(",")[0] for m in progress] == ["zerograph: step=1", "zerograph: step=2", "zerograph: step=3"]
    assert not any(m.startswith("zerograph: step=") for m in rank1["messages"])
    assert sum("time (ms) per optimizer step" in m for m in rank0["messages"]) == 3
    # csv_monitor: DeepSpeed's files, rows at the sample count, rank 0's loss
    job = tmp_path / "job"
    with open(job / "Train_Samples_train_loss.csv") as f:
        rows = list(csv.reader(f))
    batch = MICRO * GAS * WORLD
    assert rows[0] == ["step", "train_loss"] and [int(r[0]) for r in rows[1:]] == [batch, 2 * batch, 3 * batch]
    assert [float(r[1]) for r in rows[1:]] == pytest.approx(rank0["rank_losses"], rel=1e-6)
    lrs = [float(r[1]) for r in list(csv.reader(open(job / "Train_Samples_lr.csv")))[1:]]
    assert lrs == pytest.approx([warmup_decay(e) for e in (1, 2, 3)])
    for name in ("forward", "backward", "step"):
        times = [float(r[1]) for r in list(csv.reader(open(job / f"Train_Samples_elapsed_time_ms_{name}.csv")))[1:]]
        assert len(times) == 3 and all(t > 0 for t in times)
    # comms_logger: ZeRO-2 gathers every (padded) parameter and reduce-scatters every gradient per micro-batch
    padded = _padded_bytes(make_net(), WORLD)
    expected = {"all_gather": GAS * padded, "reduce_scatter": GAS * padded, "all_reduce": 0}
    for r in results:
        assert r["comms_last"] == expected == r["inspect"]
        assert r["comms_total"] == {k: 3 * v for k, v in expected.items()}
    assert sum(m.startswith("zerograph: comms, optimizer step") for m in rank0["messages"]) == 3
    # flops_profiler: the second optimizer step (profile_step 1), both micro-batches, rank 0
    flops = rank0["flops"]
    assert rank1["flops"] is None and flops["step"] == 2 and flops["micro_batches"] == GAS
    assert flops["total_flops"] == GAS * _linear_flops(MICRO)
    assert flops["forward_flops"] == GAS * (2 * MICRO * 12 * 27 + 2 * MICRO * 27 * 5)
    assert flops["params"] == sum(p.numel() for p in make_net().parameters())
    assert f"total {GAS * _linear_flops(MICRO):,}" in (tmp_path / "flops.txt").read_text()


# -- arguments -------------------------------------------------------------------------


def test_tensorboard_writes_events_or_names_the_missing_package(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            zerograph.initialize(model=make_net(), config={"tensorboard": {"enabled": True, "output_path": str(tmp_path)},
                                                           **config(0)})
        return
    torch._dynamo.reset()
    engine, *_ = zerograph.initialize(model=make_net(), config={
        "tensorboard": {"enabled": True, "output_path": str(tmp_path), "job_name": "tb"}, **config(0)})
    x, y = global_batch(0, MICRO)
    for _ in range(GAS):
        engine.backward(engine(x, y))
        engine.step()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_initialize_arguments_are_checked():
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError) as info:
        zerograph.initialize(model=model, optimizer=opt, lr_scheduler=lambda o: None, config=config(0))
    assert "got an optimizer and 'optimizer' section" in str(info.value)
    assert "got an lr_scheduler and 'scheduler' section" in str(info.value)
    parser = zerograph.add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", "ds.json"])
    with pytest.raises(ConfigError, match="both from args.deepspeed_config"):
        zerograph.initialize(args=args, model=model, config={})
    with pytest.raises(ConfigError, match="config file not found: ds.json"):
        zerograph.initialize(args=args, model=model)
    with pytest.raises(ConfigError, match="mpu"):
        zerograph.initialize(model=model, mpu=object())


def test_a_misplaced_step_is_an_error():
    torch._dynamo.reset()
    engine, *_ = zerograph.initialize(model=make_net(), config=config(0))
    x, y = global_batch(0, MICRO)
    engine.backward(engine(x, y))
    engine.step()
    engine(x, y)  # a second forward with gradients, no backward/step for it
    engine.backward(engine(x, y))
    with pytest.raises(RuntimeError, match="once per micro-batch"):
        engine.step()
    assert math.isfinite(engine.get_lr()[0])


def test_the_loss_can_be_scaled_in_place():
    """The Hugging Face Trainer scales the loss in place (``loss *= num_processes``)."""
    torch._dynamo.reset()
    engine, *_ = zerograph.initialize(model=make_net(), config=config(0, gradient_accumulation_steps=1, gradient_clipping=0.0))
    x, y = global_batch(0, MICRO)
    loss = engine(x, y)
    loss *= 2.0
    engine.backward(loss)
    ref = make_net()
    (ref(x, y) * 2.0).backward()
    for (name, p), q in zip(engine.module.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


# -- pipelines ----------------------------------------------------------------------------


def run_pipeline(steps: int):
    """engine.train_batch on a 2-stage pipeline: micro-batches drawn from an iterator."""
    from tests import _models

    torch._dynamo.reset()
    rows = 4  # per micro-batch
    batches = [_models.global_batch(step, 2 * rows) for step in range(steps)]
    micro = iter([(idx[i * rows:(i + 1) * rows], t[i * rows:(i + 1) * rows]) for idx, t in batches for i in range(2)])
    cfg = {"pipeline": {"stages": 2, "micro_batches": 2}, "train_micro_batch_size_per_gpu": rows,
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "eps": EPS}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": LR / 4, "warmup_max_lr": LR,
                                                        "warmup_num_steps": 2, "warmup_type": "linear"}}}
    engine, opt, _, sched = zerograph.initialize(model=_models.make_gpt(), config=cfg, example_batch=batches[0])
    assert engine.is_pipeline and engine.micro_batches() == 2
    losses = [engine.train_batch(micro).item() for _ in range(steps)]
    return {"losses": losses, "global_steps": engine.global_steps,
            "params": {k: v.detach().clone() for k, v in zerograph.full_state_dict(engine.module).items()}}


@pytest.mark.timeout(TIMEOUT + 30)
def test_train_batch_trains_a_pipeline_like_eager():
    from tests import _models

    steps = 3
    results = spawn(run_pipeline, WORLD, steps, timeout=TIMEOUT)
    model = _models.make_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    # DeepSpeed's WarmupLR, linear from LR/4 to LR over 2 steps (its iteration is last_epoch - 1), written out
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.25 + 0.75 * min(1.0, max(0, e - 1) / 2))
    ref = []
    for step in range(steps):
        idx, targets = _models.global_batch(step, 8)
        loss = model(idx, targets).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        ref.append(loss.item())
    state = model.state_dict()
    for r in results:
        assert r["global_steps"] == steps
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref), rtol=1e-5, atol=1e-6)
        for key, value in r["params"].items():
            torch.testing.assert_close(value, state[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
