"""Turn a failure deep inside Dynamo/AOTAutograd into an error that names the
op, the module path of the user's code that called it, and what to do."""

from __future__ import annotations

import inspect
import os
import re

from torch import nn

import zerograph

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')
_OP = re.compile(r"call_(?:function|method|module) (?:<(?:built-in )?function (?P<fn>[\w.]+)[^>]*>|(?P<op>[^\s(]+))")
_DEVICES = re.compile(r"found two different devices (?P<a>[\w:]+), (?P<b>[\w:]+)")
_OWN_DIRS = (os.path.dirname(zerograph.__file__), os.path.dirname(nn.__file__).rsplit(os.sep, 1)[0])


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
