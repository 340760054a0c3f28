"""The ``lightning-scaling`` command. Each subcommand lives in its own module and imports heavy
dependencies (numpy, matplotlib) only when it runs, so ``lightning-scaling plan`` answers fast."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

# subcommand name -> module with ``add_arguments(parser)`` and ``run(args) -> int``
_COMMANDS = {
    "plan": ("lightning_scaling.commands.plan", "compute-optimal model size and tokens for a budget"),
    "fit": ("lightning_scaling.commands.fit", "fit a scaling law to a ladder of runs"),
}


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that prints one line naming the problem and exits with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = _ArgumentParser(prog="lightning-scaling", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    for name, (module, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _stdout_gone() -> int:
    """The reader of our output went away (``... | head``): stop quietly, as ``cat`` would.

    Python would otherwise print a BrokenPipeError traceback, and another one when it flushes stdout at exit;
    pointing stdout at /dev/null avoids the second. The status is 128 + SIGPIPE, what a shell reports for a
    tool that SIGPIPE ended (1 where there is no SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (an in-process caller's buffer)
        pass
    return 128 + signal.SIGPIPE if hasattr(signal, "SIGPIPE") else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-scaling``; returns the exit status (0 ok, 2 bad input, 141 when stdout was closed)."""
    import importlib

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        try:
            status = int(importlib.import_module(args._module).run(args) or 0)
        except ValueError as err:  # bad input: one line naming the argument, exit 2
            message = " ".join(str(err).split())
            print(f"lightning-scaling {args.command}: error: {message}", file=sys.stderr)
            return 2
        sys.stdout.flush()  # a closed pipe shows up here for output still buffered
        return status
    except BrokenPipeError:
        return _stdout_gone()


if __name__ == "__main__":
    sys.exit(main())
