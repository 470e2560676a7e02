"""MkDocs hook: fill docs/cli.md from the code itself, so the page cannot drift.

- A line ``<!-- pycosdist-help: data synth -->`` is replaced by the output of
  ``pycosdist data synth --help``; a marker naming no sub-command fails the build.
  tests/test_docs.py checks that every sub-command of the parser has its marker.
- ``<!-- pycosdist-config: training -->`` (or ``experiment``) becomes the table of every
  configuration key with its default and, for training keys, the range it is checked against.
"""

from __future__ import annotations

import argparse
import json
import os
import re

MARKER = re.compile(r"^<!-- pycosdist-help:(?P<path>[\w\s-]*)-->$", re.MULTILINE)
CONFIG_MARKER = re.compile(r"^<!-- pycosdist-config: (?P<which>training|experiment) -->$", re.MULTILINE)
HELP_WIDTH = "100"  # argparse wraps at $COLUMNS: fixed, so the page is the same on every machine


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The direct sub-commands of `parser`, by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_parser(root: argparse.ArgumentParser, path: list[str]) -> argparse.ArgumentParser:
    if path == ["experiment", "merge"]:  # its own parser: `experiment` takes an optional config path
        from pycosdist.denoise.cli import build_merge_parser

        return build_merge_parser()
    parser = root
    for i, name in enumerate(path):
        choices = subparsers(parser)
        if name not in choices:
            raise ValueError(f"docs/cli.md: 'pycosdist {' '.join(path[:i + 1])}' is not a sub-command; "
                             f"expected one of {sorted(choices)}")
        parser = choices[name]
    return parser


def _toml_value(value) -> str:
    return json.dumps(value) if isinstance(value, (bool, str, list)) else repr(value)


def config_table(which: str) -> str:
    """Markdown table of the training or experiment configuration: key | default | type or checked range."""
    if which == "training":
        from pycosdist.denoise.config import CHECKS, DEFAULTS as defaults
    else:
        from pycosdist.denoise.experiment import EXPERIMENT_DEFAULTS as defaults
        CHECKS = {}
    rows = ["| key | default | type, or the range checked when loaded |", "|---|---|---|"]
    for section, keys in defaults.items():
        if not keys:  # the experiment's [teacher] / [student] sections take training keys
            rows.append(f"| `{section}.*` | | training keys (table above) for the {section} runs |")
        for key, default in keys.items():
            name = f"{section}.{key}"
            valid = CHECKS[name][1] if name in CHECKS else type(default).__name__
            rows.append(f"| `{name}` | `{_toml_value(default)}` | {valid.replace('|', '&#124;')} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    markdown = CONFIG_MARKER.sub(lambda m: config_table(m["which"]), markdown)
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
