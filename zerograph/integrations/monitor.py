"""What the engine's monitoring sections do (DeepSpeed's names and file layouts):

* ``csv_monitor`` / ``tensorboard``: :class:`Monitors` writes each optimizer
  step's events (``Train/Samples/train_loss``, ``Train/Samples/lr``,
  ``Train/Samples/loss_scale`` with fp16, the ``elapsed_time_ms_*`` timers)
  from global rank 0, at the step's sample count, into
  ``<output_path>/<job_name>/`` (one ``<event>.csv`` per event with a
  ``step,<name>`` header, or TensorBoard event files);
* ``wall_clock_breakdown``: :class:`StepTimers` times forward, backward and
  step;
* ``flops_profiler``: :class:`FlopsProfile` counts one optimizer step's
  FLOPs (forward and backward, every micro-batch) with
  ``torch.utils.flop_counter.FlopCounterMode``;
* ``comms_logger``: :class:`CommsLog` keeps the bytes of each collective kind
  per step (``zerograph.inspect(model).comm_bytes_last_step``) and in total.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch

from zerograph.config import Config, ConfigError

log = logging.getLogger(__name__)

# DeepSpeed's comms logger names collectives by their torch.distributed function
_OP_KINDS = {"all_gather": "all_gather", "all_gather_into_tensor": "all_gather", "allgather": "all_gather",
             "reduce_scatter": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
             "all_reduce": "all_reduce", "allreduce": "all_reduce"}


def _log_dir(output_path: str, job_name: str, section: str) -> Path:
    """DeepSpeed's directory of a monitor's files: ``output_path/job_name``
    (an empty ``output_path`` is the working directory)."""
    base = Path(output_path) if output_path else Path.cwd()
    path = base / job_name
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{section}.output_path: cannot create {path}: {exc.strerror or exc}; "
                          "set output_path to a writable directory") from None
    return path


class CSVWriter:
    """``csv_monitor``: one ``<event name with / as _>.csv`` per event,
    header ``step,<last part of the name>``, a row per write."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._started: set[str] = set()

    def write(self, name: str, value: float, step: int) -> None:
        filename = name.replace("/", "_").replace(" ", "_")
        path = self.directory / f"{filename}.csv"
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if filename not in self._started:
                self._started.add(filename)
                if path.stat().st_size == 0:
                    writer.writerow(["step", name.split("/")[-1]])
            writer.writerow([step, value])

    def flush(self) -> None:
        pass


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or a ConfigError saying how
    to get it (the ``tensorboard`` package is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard.enabled is true, but the tensorboard package is not installed: "
                          "pip install tensorboard, or set tensorboard.enabled to false") from None
    return SummaryWriter


class TensorBoardWriter:
    """``tensorboard``: scalars through ``SummaryWriter.add_scalar``."""

    def __init__(self, directory: Path):
        self.writer = summary_writer_class()(log_dir=str(directory))

    def write(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        self.writer.flush()


class Monitors:
    """The enabled file monitors of a config, on global rank 0 only (as in
    DeepSpeed). ``wandb`` and ``comet`` stay "no effect yet"."""

    def __init__(self, config: Config, rank: int):
        self.writers: list[Any] = []
        if config.tensorboard.enabled:
            summary_writer_class()  # every rank fails alike when the package is missing
            if rank == 0:
                tb = config.tensorboard
                self.writers.append(TensorBoardWriter(_log_dir(tb.output_path, tb.job_name, "tensorboard")))
        if config.csv_monitor.enabled and rank == 0:
            cm = config.csv_monitor
            self.writers.append(CSVWriter(_log_dir(cm.output_path, cm.job_name, "csv_monitor")))

    @property
    def enabled(self) -> bool:
        return bool(self.writers)

    def write_events(self, events: list[tuple[str, float, int]]) -> None:
        """``events``: ``(name, value, step)`` tuples, DeepSpeed's monitor events."""
        for writer in self.writers:
            for name, value, step in events:
                writer.write(name, float(value), int(step))
            writer.flush()


class StepTimers:
    """``wall_clock_breakdown``: wall-clock milliseconds of forward, backward
    and step, summed per optimizer step and over the reporting interval
    (CUDA is synchronized around each timed region)."""

    NAMES = ("forward", "backward", "step")

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.sync = enabled and device.type == "cuda"
        self.this_step: Counter = Counter()
        self.interval: Counter = Counter()
        self.interval_steps = 0

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.this_step[name] += (time.perf_counter() - t0) * 1e3

    def end_step(self) -> dict[str, float]:
        """This optimizer step's milliseconds by name; starts the next step."""
        done = {name: float(self.this_step.get(name, 0.0)) for name in self.NAMES}
        self.interval.update(done)
        self.interval_steps += 1
        self.this_step = Counter()
        return done

    def report(self) -> str:
        """The mean milliseconds per optimizer step since the last report."""
        n = max(1, self.interval_steps)
        text = " | ".join(f"{name}: {self.interval.get(name, 0.0) / n:.2f}" for name in self.NAMES)
        self.interval, self.interval_steps = Counter(), 0
        return f"time (ms) per optimizer step, mean of {n}: {text}"


class FlopsProfile:
    """``flops_profiler``: counts the FLOPs of the optimizer step that starts
    after ``profile_step`` completed ones (DeepSpeed's ``global_steps ==
    profile_step``, so the default 1 skips the first, compiling step),
    forward and backward of every micro-batch, with
    ``torch.utils.flop_counter.FlopCounterMode`` (on every rank, so that
    all run alike); then global rank 0 logs the report (and writes it to
    ``output_file`` when set) and holds the numbers in ``result``."""

    def __init__(self, config: Config, rank: int, params: int):
        self.section = config.flops_profiler
        # every rank counts (a dispatch mode on one rank only could change how its graphs run and so
        # its collectives); rank 0 reports
        self.enabled = self.section.enabled
        self.reports = rank == 0
        self.params = params
        self.mode: Optional[Any] = None
        self.phase_flops: Counter = Counter()
        self.t0 = 0.0
        self.result: dict[str, Any] | None = None

    def wants(self, step: int) -> bool:
        return self.enabled and self.result is None and step == self.section.profile_step

    @contextlib.contextmanager
    def counting(self, step: int, phase: str):
        """Count the FLOPs of ``phase`` (forward, backward) while profiling ``step``."""
        if not self.wants(step):
            yield
            return
        from torch.utils.flop_counter import FlopCounterMode

        if self.mode is None:
            self.t0 = time.perf_counter()
        mode = FlopCounterMode(display=False)
        with mode:
            yield
        self.mode = mode
        self.phase_flops[phase] += mode.get_total_flops()

    def finish(self, step: int, micro_batches: int) -> None:
        """At the end of optimizer step ``step``: the report, once."""
        if self.mode is None or not self.wants(step):
            return
        seconds = time.perf_counter() - self.t0
        total = sum(self.phase_flops.values())
        self.result = {"step": step + 1, "micro_batches": micro_batches, "params": self.params,
                       "forward_flops": int(self.phase_flops.get("forward", 0)),
                       "backward_flops": int(self.phase_flops.get("backward", 0)),
                       "total_flops": int(total), "seconds": seconds,
                       "flops_per_second": total / seconds if seconds > 0 else 0.0}
        self.mode = None
        if not self.reports:
            self.result = None
            self.enabled = False
            return
        r = self.result
        text = (f"flops profiler, optimizer step {step + 1} (rank 0, {micro_batches} micro-batch(es)): "
                f"params {r['params']:,}, forward FLOPs {r['forward_flops']:,}, backward FLOPs "
                f"{r['backward_flops']:,}, total {r['total_flops']:,}, {seconds * 1e3:.2f} ms, "
                f"{r['flops_per_second'] / 1e9:.3f} GFLOPS")
        log.info("zerograph: %s", text)
        if self.section.output_file:
            path = Path(self.section.output_file)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text + "\n")
            except OSError as exc:
                raise ConfigError(f"flops_profiler.output_file: cannot write {path}: {exc.strerror or exc}") from None


class CommsLog:
    """``comms_logger``: bytes per collective kind of each optimizer step
    (the full-buffer sizes ``zerograph.inspect(model).comm_bytes_last_step``
    reports) and their totals; ``prof_ops`` (DeepSpeed's op names, e.g.
    ``all_gather_into_tensor``) picks kinds when ``prof_all`` is false;
    ``verbose`` logs every step, else the totals are logged at each report."""

    def __init__(self, config: Config):
        section = config.comms_logger
        self.enabled = section.enabled
        self.verbose = section.verbose
        if section.prof_all or not section.prof_ops:
            self.kinds: Optional[set[str]] = None
        else:
            unknown = [op for op in section.prof_ops if op not in _OP_KINDS]
            if unknown:
                raise ConfigError(f"comms_logger.prof_ops: unknown collective(s) {unknown}; zerograph's are "
                                  f"{sorted(_OP_KINDS)}")
            self.kinds = {_OP_KINDS[op] for op in section.prof_ops}
        self.last_step: dict[str, int] = {}
        self.total: Counter = Counter()
        self.steps = 0

    def record(self, step: int, by_kind: dict[str, int]) -> None:
        if not self.enabled:
            return
        self.last_step = {k: int(v) for k, v in by_kind.items() if self.kinds is None or k in self.kinds}
        self.total.update(self.last_step)
        self.steps += 1
        if self.verbose:
            log.info("zerograph: comms, optimizer step %d: %s", step, _bytes(self.last_step))

    def report(self) -> str:
        return f"comms over {self.steps} optimizer step(s), bytes per collective: {_bytes(dict(self.total))}"


def _bytes(by_kind: dict[str, int]) -> str:
    return ", ".join(f"{k}={v:,}" for k, v in sorted(by_kind.items())) or "none"
