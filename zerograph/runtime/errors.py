"""Turn a failure deep inside Dynamo/AOTAutograd into an error that names the
op, the module path of the user's code that called it, and what to do; and a
failed collective into a :class:`RankFailureError` naming the dead rank(s)."""

from __future__ import annotations

import contextlib
import inspect
import os
import re

import torch
from torch import nn


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')
_OP = re.compile(r"call_(?:function|method|module) (?:<(?:built-in )?function (?P<fn>[\w.]+)[^>]*>|(?P<op>[^\s(]+))")
_DEVICES = re.compile(r"found two different devices (?P<a>[\w:]+), (?P<b>[\w:]+)")
_DTYPE = re.compile(r"scalar types?|expected (?:scalar type|dtype)|dtype .* but got|but got torch\.\w+ instead",
                    re.IGNORECASE)
_OWN_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(nn.__file__).rsplit(os.sep, 1)[0])


class TraceError(RuntimeError):
    """zerograph could not trace or compile part of a model."""


def _user_frames(message: str) -> list[tuple[str, int]]:
    frames = [(m["file"], int(m["line"])) for m in _FRAME.finditer(message)]
    return [(f, n) for f, n in frames if not f.startswith(_OWN_DIRS)]


def _module_at(model: nn.Module, file: str, line: int) -> str | None:
    """The deepest submodule whose ``forward`` source contains ``file:line``."""
    best = None
    for name, module in model.named_modules():
        fwd = getattr(type(module), "forward", None)
        code = getattr(fwd, "__code__", None)
        if code is None or os.path.abspath(code.co_filename) != os.path.abspath(file):
            continue
        try:
            lines, first = inspect.getsourcelines(fwd)
        except (OSError, TypeError):
            continue
        if first <= line < first + len(lines) and (best is None or name.count(".") >= best.count(".")):
            best = name
    return best


def explain_trace_failure(model: nn.Module, exc: BaseException) -> TraceError:
    """A :class:`TraceError` for ``exc`` raised while compiling ``model``."""
    message = str(exc)
    op = _OP.search(message)
    reason = next((line.strip() for line in message.splitlines() if line.strip()), type(exc).__name__)
    got = re.search(r"got (\w+(?:Error|Exception)\(.*\))\s*$", message, re.MULTILINE)
    if got:
        reason = got.group(1)
    frames = _user_frames(message)
    where, module_path = "", None
    if frames:
        file, line = frames[-1]
        module_path = _module_at(model, file, line)
        where = f" at {file}:{line}"
    root = type(model).__qualname__
    target = f"{root}.{module_path}" if module_path else root
    op_text = f"op {op['fn'] or op['op']}" if op else "an operation"
    if type(exc).__name__ == "BackendCompilerFailed":
        return TraceError(
            f"zerograph's backend failed to compile a graph of {target!r}{where}: {reason}\n"
            "What to do: retry with the config key zerograph.compiler set to \"eager\" (runs the same passes "
            "without Inductor), or zerograph.debug / zerograph.verify_graphs to find the pass at fault. "
            "The original error is attached as __cause__."
        )
    if _DTYPE.search(reason):
        return TraceError(
            f"zerograph could not trace {op_text} in module {target!r}{where}: {reason}\n"
            "An input of that op has the wrong dtype: an error in the inputs or the model code, which eager "
            "PyTorch raises too. Check the dtypes of the tensors you pass to the model (token ids and class "
            "indices must be torch.long or torch.int, e.g. input_ids.long()); zerograph casts only floating "
            "inputs to the compute dtype (bf16/fp16). The original error is attached as __cause__."
        )
    devices = _DEVICES.search(message)
    if devices:
        return TraceError(
            f"zerograph could not trace {op_text} in module {target!r}{where}: its inputs are on "
            f"{devices['a']} and {devices['b']}. zerograph keeps parameters on the process group's device "
            "(NCCL: CUDA, gloo: CPU) or where the model was; move the inputs to the parameters' device "
            "(next(model.parameters()).device), or choose it with the config key zerograph.device. "
            "The original error is attached as __cause__."
        )
    return TraceError(
        f"zerograph could not trace {op_text} in module {target!r}{where}: {reason}\n"
        "What to do: if it is a custom op, give it a fake implementation (torch.library.register_fake) "
        "so it can be traced; or keep that module out of the compiled graph by decorating its forward with "
        "@torch.compiler.disable (zerograph then gathers its parameters eagerly and training stays correct); "
        "with fullgraph=True, drop it to let Dynamo break the graph there. "
        "The original error is attached as __cause__."
    )


# -- collective failures ------------------------------------------------------

_COLLECTIVE_FAILURE = re.compile(
    r"gloo|nccl|connection (?:reset|closed|refused)|broken pipe|timed out|timeout|pair\.cc|"
    r"socket|peer",
    re.IGNORECASE,
)


STEP_PHASES = ("forward", "backward", "optimizer step boundary")


class RankFailureError(RuntimeError):
    """A collective failed because a rank died or stopped responding.

    ``ranks``: the global ranks whose heartbeat stopped (empty when every
    rank is alive, i.e. one is only slow or stuck); ``step``: the optimizer
    step in progress (1-based); ``phase``: "forward", "backward" or
    "optimizer step boundary" (:data:`STEP_PHASES`), or the zerograph function
    that ran the collective outside a step (e.g. "zerograph.full_state_dict",
    "zerograph.save_checkpoint")."""

    def __init__(self, message: str, ranks: list[int], step: int, phase: str):
        super().__init__(message)
        self.ranks, self.step, self.phase = list(ranks), step, phase

    def __reduce__(self):
        return (type(self), (str(self), self.ranks, self.step, self.phase))


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a failed or timed-out collective (gloo and
    NCCL raise plain RuntimeErrors; torch's DistError subclasses count too)."""
    if isinstance(exc, (RankFailureError, RankMismatchError, CheckpointError)):
        return False
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and bool(_COLLECTIVE_FAILURE.search(str(exc)))


@contextlib.contextmanager
def naming_failed_ranks(ctx, phase: str):
    """Run the block; a collective failing in it raises a
    :class:`RankFailureError` naming the dead rank(s) instead of gloo's or
    NCCL's error (chained as ``__cause__``).

    The one place every collective of a zerograph model goes through: its
    compiled graphs, the eager marker ops (code Dynamo left outside a graph),
    the end-of-step reductions, ``full_state_dict``, ``train_step`` and the
    checkpoint functions. ``ctx``: the model's
    :class:`~zerograph.runtime.state.ModelState` (None: errors pass
    unchanged); its :class:`~zerograph.runtime.training.TrainingRuntime`
    registers the translation (heartbeat check) as
    ``ctx.collective_failure``. ``phase``: see :class:`RankFailureError`."""
    try:
        yield
    except RuntimeError as exc:
        translate = ctx.collective_failure if ctx is not None else None
        err = translate(exc, phase) if translate is not None else exc
        if err is exc:
            raise
        raise err from exc


def _where(phase: str, step: int) -> str:
    if phase in STEP_PHASES:
        return f"in the {phase} of optimizer step {step}"
    return f"in {phase} " + (f"after optimizer step {step - 1}" if step > 1 else "before the first optimizer step")


def _first_line(exc: BaseException) -> str:
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return text if len(text) <= 300 else text[:297] + "..."


def explain_collective_failure(exc: BaseException, monitor, *, step: int, phase: str, timeout_s: float,
                               rank: int) -> RankFailureError:
    """A :class:`RankFailureError` for the collective failure ``exc``,
    naming the dead rank(s) found by ``monitor`` (a
    :class:`zerograph.runtime.dist.RankMonitor`, or None)."""
    from zerograph.runtime.dist import StoreUnreachable, store_host_description

    cause = _first_line(exc)
    where = _where(phase, step)
    fix_timeout = f"raise zerograph.collective_timeout_s (now {timeout_s:g} s)"
    saved = ("Checkpoints written by zerograph.save_checkpoint before the failure are complete: restart all "
             "ranks and load the latest one.")
    if monitor is None:
        return RankFailureError(
            f"zerograph: rank {rank}: a collective failed {where}: {cause}\n"
            f"Another rank probably died or is stuck: check the other ranks' logs; if one is only slow, "
            f"{fix_timeout}. {saved}", [], step, phase)
    try:
        gone = monitor.unresponsive()
    except StoreUnreachable as store_exc:
        host_rank = [] if "torchrun's agent" in store_host_description() else [0]
        who = "rank 0 (it hosts the process group's store) probably died or froze" if host_rank else \
            "the process group's store is unreachable"
        return RankFailureError(
            f"zerograph: rank {rank}: a collective failed {where} and {who}: {store_exc}\n"
            f"Collective error: {cause}\nCheck rank 0's log for the cause (out of memory, a crash, a kill "
            f"by the scheduler, a stopped process); if it is only slow, {fix_timeout}. {saved}",
            host_rank, step, phase)
    if gone:
        dead = sorted(gone)
        names = ", ".join(map(str, dead))
        noun = "rank" if len(dead) == 1 else "ranks"
        never = [r for r in dead if gone[r] == "never started"]
        how = "heartbeat stopped: the process died or froze"
        if never and len(never) == len(dead):
            how = ("no heartbeat at all: the process never reached zerograph.compile/shard for this model, "
                   "or died before it; every rank must call them")
        return RankFailureError(
            f"zerograph: rank {rank}: {noun} {names} stopped responding {where} ({how}). Collective error: "
            f"{cause}\nCheck the log of {noun} {names} for the cause (out of memory, a crash, a kill by the "
            f"scheduler, a stopped process); if it is only slow, {fix_timeout}. {saved}", dead, step, phase)
    return RankFailureError(
        f"zerograph: rank {rank}: a collective failed {where}, but every rank is alive (all heartbeats "
        f"moving): a rank is slow or stuck in different code (e.g. a different number of steps or "
        f"micro-batches). Collective error: {cause}\nIf the ranks are only slow, {fix_timeout}. {saved}",
        [], step, phase)


# -- ranks that disagree --------------------------------------------------------

class RankMismatchError(RuntimeError):
    """The ranks disagree on something that must be the same on every rank:
    the config, the model, the mesh or the versions when a model is compiled
    (``key`` names it, e.g. ``"config.zero_optimization.stage"``), or where
    they are in training (``key == "position"``: a rank skipped a batch, a
    backward or a collective call such as ``full_state_dict``).

    Raised on every rank instead of handing the collectives mismatched
    tensors. ``ranks``: the ranks that differ from the lowest rank;
    ``values``: ``{rank: value}`` of ``key`` on each rank; ``differences``:
    every differing key with its values."""

    def __init__(self, message: str, ranks: list[int], key: str, values: dict[int, str],
                 differences: dict[str, dict[int, str]] | None = None):
        super().__init__(message)
        self.ranks, self.key, self.values = list(ranks), key, dict(values)
        self.differences = dict(differences) if differences is not None else {key: dict(values)}

    def __reduce__(self):
        return (type(self), (str(self), self.ranks, self.key, self.values, self.differences))


# -- checkpoints ----------------------------------------------------------------

class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded: a corrupt, truncated or
    missing file, a failed write (no space left, a path below a file), an
    interrupted save. ``path``: the checkpoint; ``file``: the file at fault
    (None when not one file); ``ranks``: the ranks that saw the problem.
    The message says what to do (e.g. the previous complete checkpoint)."""

    def __init__(self, message: str, path: str = "", file: str | None = None, ranks: list[int] | None = None):
        super().__init__(message)
        self.path, self.file, self.ranks = str(path), file, list(ranks or [])

    def __reduce__(self):
        return (type(self), (str(self), self.path, self.file, self.ranks))
