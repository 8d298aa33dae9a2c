"""Command line: ``python -m stabkernels info | demo | bench`` (``demo --help``, ``bench --help``)."""
from __future__ import annotations

import sys


def _info(argv) -> int:
    import stabkernels

    stabkernels.info()
    return 0


def _demo(argv) -> int:
    from .demo.cli import main

    return main(argv)


def _bench(argv) -> int:
    from .benchmarks.run import main

    return main(argv)


COMMANDS = {
    "info": (_info, "versions, the compiled extension's state and which backends serve each op"),
    "demo": (_demo, "the demonstration run (demo --help)"),
    "bench": (_bench, "kernel benchmarks against their torch baselines (bench --help)"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m stabkernels {" + "|".join(COMMANDS) + "} [options]\n")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<6} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
