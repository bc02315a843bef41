"""zerograph's command line: ``python -m zerograph <command>`` (also installed as ``zerograph``).

Commands are registered in ``COMMANDS``; each names a module with
``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help). Only commands that exist are listed.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("zerograph.cli.demo", "train a small byte-level GPT with ZeRO on local processes and report memory, "
                               "communication, loss and the saved checkpoint"),
    "explain": ("zerograph.cli.explain", "trace a model without training it and print the passes, per-rank memory and "
                                     "communication per step next to DDP and FSDP2, optionally as a Chrome trace"),
    "bench": ("zerograph.cli.bench", "benchmark zerograph's ZeRO stages against DDP and FSDP2 on local processes "
                                     "(needs the source checkout's benchmarks/ directory)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m zerograph",
        description="zerograph: DeepSpeed ZeRO stages 0-3 as PyTorch FX compiler passes.",
    )
    from zerograph import __version__

    parser.add_argument("--version", action="version", version=f"zerograph {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        module.add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = args._module
    del args._module, args.command
    return module.main(args)


if __name__ == "__main__":
    sys.exit(main())
