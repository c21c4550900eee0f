"""The ``lpm-node`` command line: every command handler lives in this package."""

from lpm_node.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
