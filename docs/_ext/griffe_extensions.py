"""Griffe extensions for the API reference (mkdocs.yml loads both).

SphinxRoles: the docstrings are written for readers of the source (``:func:`lib_projection```); Markdown has no
such roles. Each ``:role:`target``` becomes an *optional* mkdocs-autorefs reference: a link when the
target is rendered somewhere in the site, plain code otherwise, and never a build warning (a
role may name something deliberately left out of the API reference, such as a private helper).

NamespaceSubpackages: loads pycosdist/denoise, which has no __init__.py (see its docstring).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import griffe

LITERAL_BLOCK = re.compile(r"::$", re.MULTILINE)  # reST "text::" before an indented block: Markdown wants "text:"
ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|obj|exc|const):`(~?)([\w.]+)(\(\))?`")


def _identifier(obj: griffe.Object, target: str) -> str:
    """The full dotted path of `target` as seen from `obj`, or `target` itself if it cannot be resolved."""
    if target.startswith("pycosdist"):
        return target
    head, _, rest = target.partition(".")
    try:
        resolved = obj.resolve(head)
    except (griffe.NameResolutionError, ValueError, KeyError, AttributeError):
        return target
    return f"{resolved}.{rest}" if rest else resolved


def _link(obj: griffe.Object, match: re.Match) -> str:
    short, target, call = match.groups()
    title = (target.rsplit(".", 1)[-1] if short else target) + (call or "")
    identifier = html.escape(_identifier(obj, target), quote=True)
    return f'<autoref identifier="{identifier}" optional><code>{html.escape(title)}</code></autoref>'


def _convert(obj: griffe.Object) -> None:
    if obj.docstring is not None and ":" in obj.docstring.value:
        text = LITERAL_BLOCK.sub(":", obj.docstring.value)
        obj.docstring.value = ROLE.sub(lambda m: _link(obj, m), text)


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        _convert(pkg)  # on_object below is called for the package's members only

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        _convert(obj)


class NamespaceSubpackages(griffe.Extension):
    """Load ``pycosdist/denoise`` although it has no ``__init__.py``.

    Griffe skips a folder without ``__init__.py`` inside a regular package (it takes it for scripts),
    so ``::: pycosdist.denoise.training`` would not be found. This creates the missing package and
    loads its modules. It does nothing once the folder has an ``__init__.py`` (then delete it).
    """

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        if pkg.filepath is None or isinstance(pkg.filepath, list):
            return
        for folder in sorted(Path(pkg.filepath).parent.iterdir()):
            if folder.name in pkg.members or not any(folder.glob("*.py")) or (folder / "__init__.py").exists():
                continue
            subpackage = griffe.Module(folder.name, filepath=[folder], parent=pkg)
            pkg.set_member(folder.name, subpackage)
            loader._load_submodules(subpackage)  # griffe has no public call for this
