"""Subcommands of the ``sinkfix`` CLI. Each module exposes ``add_parser(subparsers)`` and ``run(args) -> int``."""
