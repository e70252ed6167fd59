"""The ``p2s-dask`` command (its parser and subcommands live in :mod:`.fronts.cli`)."""

from .fronts.cli import build_parser, main

__all__ = ["build_parser", "main"]
