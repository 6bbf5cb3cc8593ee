"""MkDocs hooks for the BBDecoder site (see mkdocs.yml).

* ``api.md``: the reference is generated from ``bbdecoder.__all__`` at build time, one
  mkdocstrings entry per public name, grouped by the subpackage that defines it; a name added to
  ``__all__`` appears without editing any page, and one that is missing or has no docstring is a
  warning (an error under ``mkdocs build --strict``).
* pages of ``docs/`` that ``mkdocs.yml``'s nav does not list are added under "More", so a new
  page is never left out of the site.
* ``<!-- include README.md "## Section" -->``: a README section pasted into a page, its links to
  ``docs/`` rewritten for the site.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.bbdecoder")

ROOT = Path(__file__).resolve().parents[1]
API_MARKER = "<!-- api-reference -->"
INCLUDE = re.compile(r'<!-- include (?P<file>[\w./-]+) "(?P<heading>#+ [^"]+)" -->')

GROUPS = {
    "attribution": "Explainers",
    "metrics": "Evaluating maps",
    "bias": "Bias: Attention-IoU",
    "monitor": "Training monitor",
    "integrations": "Datasets and distributed training",
    "store": "Run store",
    "report": "HTML report",
    "viz": "Figures",
    "inspect": "Model inspection",
    "layers": "Layer IDs",
    "hooks": "Hooks",
    "targets": "Targets",
}


def _package() -> Any:
    source = str(ROOT / "src")
    if sys.path[:1] != [source]:
        sys.path.insert(0, source)
    return importlib.import_module("bbdecoder")


def _has_own_docstring(obj: Any) -> bool:
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return bool(doc and doc.strip())


def api_reference() -> str:
    """The markdown of the API reference: one mkdocstrings entry per name in ``bbdecoder.__all__``."""
    package = _package()
    seen: dict[int, str] = {}
    groups: dict[str, list[str]] = {}
    for name in package.__all__:
        if name.startswith("__"):
            continue
        if not hasattr(package, name):
            log.warning("bbdecoder.__all__ lists %r, which bbdecoder does not define", name)
            continue
        obj = getattr(package, name)
        module = getattr(obj, "__module__", "") or ""
        sub = module.split(".")[1] if module.startswith("bbdecoder.") else "other"
        group = GROUPS.get(sub, sub.capitalize())
        if id(obj) in seen and (inspect.isclass(obj) or inspect.isfunction(obj)):
            entry = (
                f"### `{name}`\n\nAn alias of [`{seen[id(obj)]}`][bbdecoder.{seen[id(obj)]}]"
                f" (the same object: `bbdecoder.{name} is bbdecoder.{seen[id(obj)]}`).\n"
            )
        else:
            if not _has_own_docstring(obj):
                log.warning("bbdecoder.%s has no docstring: document it (what it returns, with shapes)", name)
            seen.setdefault(id(obj), name)
            entry = f"::: bbdecoder.{name}\n"
        groups.setdefault(group, []).append(entry)
    order = [*GROUPS.values()]
    parts = []
    for group in sorted(groups, key=lambda g: (order.index(g) if g in order else len(order), g)):
        parts.append(f"## {group}\n\n" + "\n".join(groups[group]))
    return "\n".join(parts)


def _section(text: str, heading: str) -> str:
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    try:
        start = lines.index(heading)
    except ValueError:
        log.warning("include: no heading %r", heading)
        return ""
    end = len(lines)
    for number in range(start + 1, len(lines)):
        match = re.match(r"(#+) ", lines[number])
        if match and len(match.group(1)) <= level:
            end = number
            break
    body = "\n".join(lines[start + 1 : end])
    body = re.sub(r"\]\(docs/([^)]+)\)", r"](\1)", body)  # README's links into docs/ -> site pages
    # links to other files of the repository (BENCHMARKS.md, src/...) are not pages of the site
    return re.sub(
        r"\[([^\]]+)\]\((?!https?:|#)([^)]+\.(?:md|py|toml))\)", r"\1 (`\2` in the repository)", body
    )


def _include(match: re.Match[str]) -> str:
    return _section((ROOT / match.group("file")).read_text(), match.group("heading"))


def _nav_files(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in _nav_files(value)]
    if isinstance(nav, list):
        return [f for item in nav for f in _nav_files(item)]
    return []


def _title(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem.replace("_", " ").capitalize()


def on_config(config: Any) -> Any:
    nav = config.get("nav")
    if not nav:
        return config
    docs = Path(config["docs_dir"])
    listed = set(_nav_files(nav))
    extra = sorted(p.relative_to(docs).as_posix() for p in docs.rglob("*.md"))
    extra = [page for page in extra if page not in listed]
    if extra:
        nav.append({"More": [{_title(docs / page): page} for page in extra]})
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    markdown = INCLUDE.sub(_include, markdown)
    if API_MARKER in markdown:
        markdown = markdown.replace(API_MARKER, api_reference())
    return markdown
