"""One prepared GPU check: every GPU-only measurement of zerograph in one command.

    python benchmarks/gpu_check.py                       # on the GPU machine; report in $OUT (or --out DIR)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc   # the same code paths on CPU, tiny shapes
    python benchmarks/gpu_check.py --parts attention,planner # a subset (--list names them)

Each part (table :data:`PARTS`, in order of value) runs in its own
process with its own time cap, so a hang or a CUDA crash in one part cannot
take the others down: a part past its cap is killed with its whole process
group and reported as ``failed: timed out`` with whatever it had recorded so
far. The parts are forked from the runner after it imported torch and
zerograph once (it runs no torch op and never initializes CUDA itself),
which saves each part seconds of imports. A part that raises reports ``failed: <error>``; the command
itself still exits 0 and writes the whole report. The caps sum to less than
9 minutes (:data:`TOTAL_CAP_S`).

Output (``--out DIR``, default ``$OUT``, else a new temporary folder):
``gpu_check.md`` (the report: device, torch/triton versions, a summary,
then every part's figures, each with its anchor and ratio, and its tables),
``gpu_check.json`` (the same, machine-readable) and ``gpu_check.log`` (every
part's output). The report is rewritten after each part, so a run killed
from outside still leaves the parts done so far.

``--dry-run`` hides any GPU (``CUDA_VISIBLE_DEVICES=``), sets
``TRITON_INTERPRET=1`` and runs every part on CPU with tiny shapes: the
kernels under Triton's interpreter, the multi-rank part with gloo at world
2, the largest-model search against a simulated capacity
(``zerograph.memory_limit_bytes``). CI runs it (tests/test_gpu_check.py) so
the script is known to work before a GPU ever sees it. Dry-run numbers mean
nothing.

The parts themselves are in ``benchmarks/gpu_check_parts.py``; they call the
other benchmarks' functions (bench_attention, bench_fusion, bench_gpu_memory,
kernels, bench_activations, bench_zero).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    title: str
    cap_s: float  # on the GPU machine
    dry_cap_s: float = 120.0  # with --dry-run: a few CPU seconds each, many more on a busy machine


# In order of value: the first parts run first, so a run cut short still has them.
PARTS = [
    Part("environment", "Device and software", 15),
    Part("attention", "Fused attention forward+backward vs SDPA's flash kernel, 2k-8k tokens", 60),
    Part("gpt_fusion", "12-layer GPT, fused vs unfused graph, end to end", 100),
    Part("planner", "Planner's predicted peak vs torch.cuda.max_memory_allocated", 40),
    Part("zero3_memory", "ZeRO-3 peak per rank vs FSDP2 (fully_shard per block)", 45),
    Part("linear_ce", "Linear + cross-entropy (H/8 row chunks) vs eager", 25),
    Part("offload_param", "offload_param on CUDA: pinned host shards, asynchronous copies", 40),
    Part("activation_offload", "Activation offload to host memory", 30),
    Part("largest_gpt", "Largest GPT that trains on one device, no offload", 45),
    Part("largest_gpt_offload", "Largest GPT that trains on one device, optimizer offload", 65),
    Part("nccl", "Multi-rank features on NCCL (every GPU of the machine)", 55, dry_cap_s=180),
]
TOTAL_CAP_S = 9 * 60
assert sum(p.cap_s for p in PARTS) < TOTAL_CAP_S, "the parts' caps must sum to less than 9 minutes"

REPORT, REPORT_JSON, LOG = "gpu_check.md", "gpu_check.json", "gpu_check.log"


# --------------------------------------------------------------------------- one part's record (child side)

class Skip(Exception):
    """Raised by a part that does not apply here (its message says why, e.g. '1 GPU')."""


class PartReport:
    """What one part measured, saved as JSON after every addition (so a part
    killed at its cap still hands back what it had)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.status = "running"
        self.headline = ""
        self.figures: list[dict] = []
        self.blocks: list[str] = []  # markdown: tables and notes, in order
        self.info: dict = {}  # the environment part's facts (for the report header)

    def figure(self, figure: str, value: str, anchor: str, anchor_value: str, ratio: float | None,
               ratio_of: str, target: str = "", met: bool | None = None) -> None:
        """One measured figure next to its anchor (what it is compared with) and the ratio."""
        self.figures.append(dict(figure=figure, value=value, anchor=anchor, anchor_value=anchor_value,
                                 ratio=ratio, ratio_of=ratio_of, target=target, met=met))
        self.save()

    def table(self, header: list[str], rows: list[list]) -> None:
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        self.blocks.append("\n".join(lines))
        self.save()

    def note(self, text: str) -> None:
        self.blocks.append(text)
        self.save()

    def to_dict(self) -> dict:
        return dict(status=self.status, headline=self.headline, figures=self.figures, blocks=self.blocks,
                    info=self.info)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), default=str))
        os.replace(tmp, self.path)


@dataclasses.dataclass
class Context:
    """What a part needs to know: dry run or not, where it computes, its deadline."""

    dry_run: bool
    deadline: float  # time.monotonic() by which the part must be done
    device: str = dataclasses.field(init=False)  # "cuda", or "cpu" in a dry run

    def __post_init__(self):
        import torch

        self.device = "cuda" if torch.cuda.is_available() and not self.dry_run else "cpu"

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def pick(self, gpu, dry):
        """``gpu`` on the GPU machine, ``dry`` in a dry run."""
        return dry if self.dry_run else gpu


def _child(name: str, result: str, cap: float, dry_run: bool) -> int:
    from benchmarks import gpu_check_parts
    from benchmarks.gpu_check import Skip as PartSkipped  # the class the parts raise (this file may be __main__)

    rep = PartReport(result)
    rep.save()
    ctx = Context(dry_run=dry_run, deadline=time.monotonic() + cap)
    try:
        if not dry_run and not ctx.cuda and name != "environment":
            raise PartSkipped("no CUDA device here (--dry-run runs every part on CPU with tiny shapes)")
        getattr(gpu_check_parts, f"part_{name}")(ctx, rep)
        rep.status = "ok"
    except PartSkipped as exc:
        rep.status = f"skipped: {exc}"
    except BaseException as exc:  # report it: the parent prints the reason, the log has the traceback
        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        rep.status = f"failed: {type(exc).__name__}: {first[:300]}"
    rep.save()
    return 1 if rep.status.startswith("failed") else 0


# --------------------------------------------------------------------------- the runner (parent side)

def _prepare_process(dry_run: bool) -> None:
    """Environment for every part, set before torch is imported; then import
    what every part needs once, here, so that each forked part starts warm.
    CUDA is never initialized in this process (each part initializes it after
    the fork; ``PYTORCH_NVML_BASED_CUDA_CHECK`` keeps even a device count fork-safe)."""
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    if dry_run:  # no GPU, Triton's interpreter, one thread (CI machines are busy)
        os.environ.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    # Imports only: running torch ops here would start OpenMP's thread pool, and
    # a forked part that then runs a parallel CPU op hangs (GNU OpenMP is not fork-safe).
    try:
        import torch  # noqa: F401

        from benchmarks import gpu_check_parts  # noqa: F401  (imports zerograph and the benchmarks)
    except Exception:  # a part will import it again and report the error in its own section
        traceback.print_exc()


def _fork_part(name: str, result: Path, cap: float, dry_run: bool, log) -> int:
    """Start part ``name`` in a forked process that leads its own process group."""
    import torch

    if torch.cuda.is_initialized():
        raise RuntimeError("gpu_check's runner initialized CUDA: its parts could not use it after fork")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    rc = 1
    try:  # the part's process: its output goes to the log
        os.setsid()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        # Python's streams onto the new fds 1 and 2 (the runner's may be something else, e.g. pytest's capture)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        rc = _child(name, str(result), cap, dry_run)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def _run_part(part: Part, cap: float, dry_run: bool, work: Path, log) -> dict:
    """Run one part in its own process (group) with a time cap; never raises."""
    result = work / f"{part.name}.json"
    log.write(f"\n===== {part.name} (cap {cap:.0f} s) =====\n")
    log.flush()
    t0 = time.monotonic()
    pid = _fork_part(part.name, result, cap, dry_run, log)
    timed_out = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - t0 > cap:
            timed_out = True
            os.killpg(pid, signal.SIGKILL)  # the part and everything it started (ranks, compile workers)
            _, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.05)
    rc = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - t0
    try:
        rec = json.loads(result.read_text())
    except (OSError, ValueError):
        rec = dict(status="running", headline="", figures=[], blocks=[], info={})
    if timed_out:
        rec["status"] = f"failed: timed out after its cap of {cap:.0f} s (what it recorded before is below)"
    elif rec["status"] == "running":  # died without saying why: a crash (segfault, CUDA abort, OOM kill)
        how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        rec["status"] = f"failed: the part's process ended ({how}) before reporting; see {LOG}"
    if rec["status"].startswith("failed"):
        log.flush()
        rec["log_tail"] = _tail(Path(log.name), part.name)
    rec.update(name=part.name, title=part.title, seconds=seconds, cap=cap,
               cpu_seconds=usage.ru_utime + usage.ru_stime)  # the part and the processes it waited for
    return rec


def _tail(log_path: Path, name: str, lines: int = 25) -> str:
    text = log_path.read_text(errors="replace")
    own = text.rsplit(f"===== {name} ", 1)[-1]
    return "\n".join(own.splitlines()[1:][-lines:])


def _fmt_ratio(r) -> str:
    return "-" if r is None else f"{r:.3g}x"


def _fmt_met(m) -> str:
    return {True: "yes", False: "**no**", None: "-"}[m]


def render(records: list[dict], meta: dict) -> str:
    info = next((r.get("info") for r in records if r["name"] == "environment" and r.get("info")), {}) or {}
    lines = [f"# zerograph GPU check{' (dry run: CPU, tiny shapes; the numbers mean nothing)' if meta['dry_run'] else ''}",
             "",
             f"- date: {meta['date']}",
             f"- device: {info.get('device', 'unknown (the environment part did not report)')}",
             f"- software: {info.get('software', 'unknown')}",
             f"- command: `{meta['command']}`",
             f"- parts run: {len(records)} of {meta['n_parts']}; {meta['elapsed']:.0f} s in all "
             f"(caps sum to {meta['caps']:.0f} s)",
             "",
             "## Summary",
             "",
             "| # | part | result | headline | seconds (cap), CPU seconds |",
             "| --- | --- | --- | --- | --- |"]
    for i, r in enumerate(records, 1):
        status = r["status"] if len(r["status"]) < 90 else r["status"][:87] + "..."
        lines.append(f"| {i} | [{r['name']}](#{i}-{r['name']}) | {status} | {r.get('headline', '')} "
                     f"| {r['seconds']:.0f} ({r['cap']:.0f}), {r.get('cpu_seconds', 0):.0f} |")
    for i, r in enumerate(records, 1):
        lines += ["", f"## {i}. {r['name']}", "", f"{r['title']}.", "", f"**Result: {r['status']}**", ""]
        if r["figures"]:
            lines += ["| figure | value | anchor | anchor value | ratio | ratio of | target | met |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for f in r["figures"]:
                lines.append(f"| {f['figure']} | {f['value']} | {f['anchor']} | {f['anchor_value']} | "
                             f"{_fmt_ratio(f['ratio'])} | {f['ratio_of']} | {f['target'] or '-'} | {_fmt_met(f['met'])} |")
            lines.append("")
        for block in r["blocks"]:
            lines += [block, ""]
        if r.get("log_tail"):
            lines += ["Last lines of its output:", "", "```", r["log_tail"], "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT"),
                    help="folder for gpu_check.md/.json/.log (default: $OUT, else a new temporary folder)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter (CI)")
    ap.add_argument("--parts", default=None, help="comma-separated subset of the parts, in the table's order")
    ap.add_argument("--list", action="store_true", help="list the parts and their caps, then exit")
    args = ap.parse_args(argv)
    if args.list:
        for p in PARTS:
            print(f"{p.name:22s} {p.cap_s:4.0f} s  {p.title}")
        print(f"{'total':22s} {sum(p.cap_s for p in PARTS):4.0f} s  (limit {TOTAL_CAP_S} s)")
        return 0
    parts = PARTS
    if args.parts:
        names = [n.strip() for n in args.parts.split(",") if n.strip()]
        unknown = [n for n in names if n not in {p.name for p in PARTS}]
        if unknown or not names:
            ap.error(f"--parts: unknown {unknown or names}; choose from {', '.join(p.name for p in PARTS)}")
        parts = [p for p in PARTS if p.name in names]
        if "environment" not in names:  # the report header needs it; it takes seconds
            parts = [PARTS[0]] + parts
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    caps = {p.name: (p.dry_cap_s if args.dry_run else p.cap_s) for p in parts}
    meta = dict(dry_run=args.dry_run, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
                n_parts=len(parts), caps=sum(caps.values()), host=platform.node())
    print(f"gpu_check: {len(parts)} parts, caps {meta['caps']:.0f} s, report in {out / REPORT}", flush=True)
    _prepare_process(args.dry_run)
    records: list[dict] = []
    t0 = time.monotonic()
    (out / LOG).write_text("")
    # append mode: the parts write to the same file through their own descriptors
    with tempfile.TemporaryDirectory(prefix="gpu_check_work_") as work, open(out / LOG, "a") as log:
        for part in parts:
            rec = _run_part(part, caps[part.name], args.dry_run, Path(work), log)
            records.append(rec)
            print(f"  {part.name:22s} {rec['seconds']:5.0f} s ({rec['cpu_seconds']:4.0f} s CPU)  {rec['status'][:90]}",
                  flush=True)
            meta["elapsed"] = time.monotonic() - t0
            (out / REPORT).write_text(render(records, meta))
            (out / REPORT_JSON).write_text(json.dumps(dict(meta=meta, parts=records), indent=1, default=str))
    report = (out / REPORT).read_text()
    print()
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
