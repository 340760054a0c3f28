"""The ``lightning-scaling`` command. Each subcommand lives in its own module and imports heavy
dependencies (torch, lightning, scipy) only when it runs, so ``lightning-scaling plan`` answers fast."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

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


def main(argv: Sequence[str] | None = None) -> int:
    import importlib

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except ValueError as err:  # bad input: one line naming the argument, exit 2
        print(f"lightning-scaling {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
