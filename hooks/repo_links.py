"""MkDocs hook: a link from a page to a repository file outside ``docs/`` becomes a link to that
file on the repository's site.

Pages link to repository files by their relative path (``../../benchmarks/results/distill/results.md``
from ``docs/methods/``), which works where the markdown is read as files (GitHub, an editor); the
site holds ``docs/`` only, so ``on_page_markdown`` rewrites each such link to
``{repo_url}/blob/main/<path>`` (``tree/`` for a folder), anchors kept. Links inside code (fenced
blocks, inline code) are left alone. It also drops the backslash of ``\\|`` in inline code of table
rows (:func:`table_pipes`) and the Sphinx roles of docstrings on the API pages.
``tests/test_docs.py`` checks with the same parser (:func:`relative_links`) that every relative
link of the README and the docs names a file or folder that exists. Registered under ``hooks:`` in
``mkdocs.yml``.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

BRANCH = "main"

# fenced code blocks (``` or ~~~, up to the closing fence of the same kind and at least the same length)
_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n]*\n.*?(?:^[ \t]*\1[`~]*[ \t]*$|\Z)", re.MULTILINE | re.DOTALL)
# inline code spans: a run of backticks up to the next run of the same length
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`).+?(?<!`)\1(?!`)", re.DOTALL)
# [text](target "title") and ![alt](target): the target's span is group 1
_INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# [id]: target (reference definitions)
_REFERENCE = re.compile(r"^[ ]{0,3}\[[^\]]+\]:[ \t]*<?([^\s>]+)>?", re.MULTILINE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _blank(match: re.Match) -> str:
    """The matched text with every character but newlines replaced by spaces (offsets kept)."""
    return re.sub(r"[^\n]", " ", match.group(0))


def _masked(markdown: str) -> str:
    """``markdown`` with its code blanked out, so links are looked for in prose only."""
    return _CODE_SPAN.sub(_blank, _FENCE.sub(_blank, markdown))


def is_relative(target: str) -> bool:
    """A link to a path of this repository (not a URL, an e-mail, an anchor of the page or an absolute path)."""
    return bool(target) and not target.startswith(("#", "/")) and not _SCHEME.match(target)


def relative_links(markdown: str) -> Iterator[tuple[int, int, str]]:
    """``(start, end, target)`` of every relative link target (markdown links, images, reference
    definitions) outside code, in the order they appear; ``markdown[start:end] == target``."""
    masked = _masked(markdown)
    found = [(m.start(1), m.end(1), m.group(1)) for pattern in (_INLINE, _REFERENCE) for m in pattern.finditer(masked)]
    for start, end, target in sorted(found):
        if is_relative(target):
            yield start, end, target


def split_target(target: str) -> tuple[str, str]:
    """``("path", "#anchor")`` (the query too, if any, goes with the anchor), the path URL-decoded."""
    cut = min((i for i in (target.find("#"), target.find("?")) if i >= 0), default=len(target))
    return unquote(target[:cut]), target[cut:]


def repo_path(page: str, target: str) -> str:
    """The link target's path from the repository root (POSIX, normalised): ``page`` is the linking
    file's path from the root (``docs/methods/hermes.md``). Starts with ``../`` when it leaves the repository."""
    path, _ = split_target(target)
    return posixpath.normpath(posixpath.join(posixpath.dirname(page), path))


def rewrite(markdown: str, page: str, root: Path, repo_url: str, docs: str = "docs") -> str:
    """``markdown`` of the page at ``page`` (path from ``root``) with each link to a repository file
    outside ``docs`` pointing at ``repo_url`` instead."""
    base = repo_url.rstrip("/")
    out = []
    last = 0
    for start, end, target in relative_links(markdown):
        path = repo_path(page, target)
        if path == docs or path.startswith(docs + "/") or path == ".." or path.startswith("../"):
            continue  # a page of the site, or outside the repository (tests/test_docs.py reports that)
        kind = "tree" if (root / path).is_dir() else "blob"
        out += [markdown[last:start], f"{base}/{kind}/{BRANCH}/{'' if path == '.' else path}{split_target(target)[1]}"]
        last = end
    return "".join(out) + markdown[last:]


def table_pipes(markdown: str) -> str:
    """GitHub needs ``\\|`` for a pipe inside inline code in a table row; Python-Markdown reads a plain
    ``|`` there and would show the backslash: table rows (outside fenced code) lose it inside code."""
    fenced = _FENCE.sub(_blank, markdown).split("\n")
    lines = markdown.split("\n")
    for i, line in enumerate(lines):
        if "\\|" in line and fenced[i].lstrip().startswith("|"):
            lines[i] = _CODE_SPAN.sub(lambda m: m.group(0).replace("\\|", "|"), line)
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs_dir = Path(config["docs_dir"]).resolve()
    root = Path(config["config_file_path"]).resolve().parent
    page_path = (docs_dir / page.file.src_uri).relative_to(root).as_posix()
    return table_pipes(rewrite(markdown, page_path, root, config["repo_url"], docs_dir.relative_to(root).as_posix()))


_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):<code>~?")


def on_page_content(html: str, page, config, files) -> str:
    """Docstrings here are plain prose with Sphinx roles (``:func:`~a.b` ``) and ``::`` before a
    literal block; the API pages show the code alone and one colon."""
    return _ROLE.sub("<code>", html).replace("::</p>", ":</p>")
