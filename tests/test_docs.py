"""The README stays short and tells the truth about the commands; the CLI page cannot drift from the
parser; the README's example runs. (`make docs` builds the whole site with warnings as errors.)"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLI_PAGE = ROOT / "docs" / "cli.md"
MARKER = re.compile(r"^<!-- pycosdist-help:(?P<path>[\w\s-]*)-->$", re.MULTILINE)
# A repository path named in the prose (`bench/results/demo/`, examples/x.py, configs/*.toml); a
# placeholder such as csrc/<op>/ is not one.
REPO_PATH = re.compile(r"(?<![\w/.])((?:bench|examples|configs|scripts|tests|csrc|docs|pycosdist)/[\w./*-]*)(?![\w<])")
MARKDOWN_LINK = re.compile(r"\]\((?!https?://|#)(?P<target>[^)#\s]+)(?:#[^)]*)?\)")


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser, the root () included: (), ('data',), ('data', 'synth'), ..."""
    found = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, path + (name,))
    return found


def _fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def _make_targets_run(script: Path) -> list[str]:
    """The make targets a shell script runs, in order (`make build`, `make -C . test` ...)."""
    targets = []
    for line in script.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["make"]:
            targets += [w for w in words[1:] if not w.startswith("-") and "=" not in w]
    return targets


def test_readme_is_at_most_200_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the rest belongs in docs/"


def test_readme_test_command_is_what_ci_runs():
    commands = [line.split("#")[0].strip() for block in _fenced_blocks(README.read_text(), "bash")
                for line in block.splitlines()]
    assert "make test" in commands, "README.md no longer shows `make test` as a command"
    assert "make demo" in commands, "README.md no longer shows `make demo` as a command"
    ci_targets = _make_targets_run(ROOT / ".ci" / "run")
    assert "test" in ci_targets, f".ci/run runs make {ci_targets}, not the README's `make test`"
    assert "docs" in ci_targets, f".ci/run runs make {ci_targets}: the docs are not built in CI"


def test_paths_named_in_the_readme_and_the_docs_exist():
    """A figure's source folder, a script or a config that moved must not leave the docs pointing nowhere."""
    pages = [README, ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for page in pages:
        for path in {m.group(1).rstrip(".") for m in REPO_PATH.finditer(page.read_text())}:
            exists = any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()
            if not exists:
                missing.append(f"{page.relative_to(ROOT)}: {path}")
        if page.parent == ROOT:  # the docs pages' links are checked by mkdocs build --strict
            for link in MARKDOWN_LINK.finditer(page.read_text()):
                if not (ROOT / link["target"]).exists():
                    missing.append(f"{page.relative_to(ROOT)}: link {link['target']}")
    assert not missing, "named but not in the repository:\n" + "\n".join(sorted(missing))


def test_makefile_docs_target_builds_strictly_after_build():
    makefile = (ROOT / "Makefile").read_text()
    rule = re.search(r"^docs:(?P<deps>[^\n]*)\n(?P<recipe>(?:\t[^\n]*\n)+)", makefile, re.MULTILINE)
    assert rule, "the Makefile has no docs target"
    assert "build" in rule["deps"].split()
    assert re.search(r"mkdocs build .*--strict", rule["recipe"])


def test_every_subcommand_has_its_section_in_the_cli_page():
    from pycosdist.denoise.cli import build_parser

    # `experiment merge` has a parser of its own (cli.build_merge_parser): `experiment` takes an optional path.
    commands = {tuple(c) for c in _commands(build_parser())} | {("experiment", "merge")}
    documented = [tuple(m["path"].split()) for m in MARKER.finditer(CLI_PAGE.read_text())]
    missing = sorted(" ".join(c) for c in commands - set(documented))
    unknown = sorted(" ".join(c) for c in set(documented) - commands)
    assert not missing, f"docs/cli.md has no `<!-- pycosdist-help: CMD -->` section for: {missing}"
    assert not unknown, f"docs/cli.md documents commands the parser does not have: {unknown}"
    assert len(documented) == len(set(documented)), "a command's help is included twice"
    for command in commands - {()}:  # and a heading a reader can find
        assert f"`pycosdist {' '.join(command)}`" in CLI_PAGE.read_text()


def test_the_cli_hook_puts_each_commands_help_and_every_config_key_in_the_page():
    spec = importlib.util.spec_from_file_location("cli_help", ROOT / "docs" / "_ext" / "cli_help.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    page = hook.on_page_markdown(CLI_PAGE.read_text(), page=None)
    assert not MARKER.search(page)
    from pycosdist.denoise.cli import build_parser

    for command in _commands(build_parser()):
        assert f"usage: {' '.join(('pycosdist',) + command)} " in page
    from pycosdist.denoise.config import DEFAULTS
    from pycosdist.denoise.experiment import EXPERIMENT_DEFAULTS

    for defaults in (DEFAULTS, EXPERIMENT_DEFAULTS):  # the configuration tables list every key
        keys = [f"{section}.{key}" for section, table in defaults.items() for key in table]
        assert keys and all(f"| `{key}` | `" in page for key in keys), [k for k in keys if f"| `{k}` |" not in page]
    with pytest.raises(ValueError, match="'pycosdist data nonesuch' is not a sub-command"):
        hook.on_page_markdown("<!-- pycosdist-help: data nonesuch -->", page=None)


def test_readme_example_runs():
    (example,) = _fenced_blocks(README.read_text(), "python")
    namespace: dict = {}
    exec(compile(example, "README.md example", "exec"), namespace)
    student, lib = namespace["student_latent"], namespace["kd"].lib
    assert namespace["loss"].ndim == 0 and 0 <= namespace["loss"].item() <= 2  # a cosine distance
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lib.parameters())
