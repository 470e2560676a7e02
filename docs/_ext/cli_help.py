"""MkDocs hook: fill docs/cli.md with the `pycosdist` parser's own help, so the page cannot drift.

A line ``<!-- pycosdist-help: data synth -->`` is replaced by the output of
``pycosdist data synth --help``; a marker naming no sub-command fails the build.
tests/test_docs.py checks that every sub-command of the parser has its marker.
"""

from __future__ import annotations

import argparse
import os
import re

MARKER = re.compile(r"^<!-- pycosdist-help:(?P<path>[\w\s-]*)-->$", re.MULTILINE)
HELP_WIDTH = "100"  # argparse wraps at $COLUMNS: fixed, so the page is the same on every machine


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The direct sub-commands of `parser`, by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_parser(root: argparse.ArgumentParser, path: list[str]) -> argparse.ArgumentParser:
    parser = root
    for i, name in enumerate(path):
        choices = subparsers(parser)
        if name not in choices:
            raise ValueError(f"docs/cli.md: 'pycosdist {' '.join(path[:i + 1])}' is not a sub-command; "
                             f"expected one of {sorted(choices)}")
        parser = choices[name]
    return parser


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if MARKER.search(markdown) is None:
        return markdown
    from pycosdist.denoise.cli import build_parser

    root = build_parser()

    def help_block(match: re.Match) -> str:
        text = command_parser(root, match["path"].split()).format_help().rstrip()
        return f"```text\n{text}\n```"

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        return MARKER.sub(help_block, markdown)
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
