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
    "compare": "pipelines.experiments.compare_networks",
    "restore-augment": "pipelines.restoration.augment",
    "enhance-sweep": "pipelines.enhancement_sweep",
    "benchmark-quality": "pipelines.experiments.quality",
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
    from pipelines.tracking.progress import quiet_if

    try:
        with quiet_if(getattr(args, "quiet", False)):
            return int(args.func(args) or 0)
    except Exception as e:  # noqa: BLE001 - only the project's input errors are shortened, see pipelines.errors
        from pipelines.errors import EXIT_INPUT_ERROR, debug_enabled, find_input_error, one_line

        err = None if debug_enabled() else find_input_error(e)
        if err is None:
            raise
        print(one_line(err), file=sys.stderr)
        return EXIT_INPUT_ERROR


if __name__ == "__main__":
    sys.exit(main())
