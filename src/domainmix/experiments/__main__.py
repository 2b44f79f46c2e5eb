"""The ``domainmix`` command line: ``domainmix demo``, ``domainmix run ...``, ``domainmix data ...``."""

from __future__ import annotations

import sys
from collections.abc import Callable

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("domainmix.experiments.demo", "synthetic three-domain regression: weights moving, a table"),
    "run": (
        "domainmix.experiments.run",
        "reproduce an experiment: linear, logistic, mlp, or lm (the language-model pipeline)",
    ),
    "data": (
        "domainmix.data.cli",
        "the offline multi-domain text corpus: build-corpus, verify, audit, train-bpe",
    ),
}


def version() -> str:
    """The installed distribution's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("domainmix")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``domainmix <command> [args]`` to the command's ``main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: domainmix [--version] <command> [options]\n\ncommands:")
        for name, (_, summary) in COMMANDS.items():
            print(f"  {name:<10}{summary}")
        print("\n'domainmix <command> --help' (and 'domainmix run lm --help') for a command's options.")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"domainmix {version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"domainmix: unknown command {command!r}; choose one of {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    module = __import__(COMMANDS[command][0], fromlist=["main"])
    entry: Callable[[list[str]], int] = module.main
    return entry(rest)


if __name__ == "__main__":
    sys.exit(main())
