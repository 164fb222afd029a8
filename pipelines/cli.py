"""``python -m pipelines <command>``: the project's command line.

Each command lives in its own module, which exposes ``register(subparsers)`` adding an ``argparse``
sub-parser whose ``func`` runs it. Modules are imported only when listed here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "demo": "pipelines.demo",
    "manifest": "pipelines.manifests.cli",
    "compare": "pipelines.evaluation.compare",
    "restore-augment": "pipelines.restoration.augment",
    "enhance-sweep": "pipelines.enhancement_sweep",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                continue  # command not installed in this version
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
