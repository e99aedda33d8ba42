"""Every relative link of the README and the docs names a file or folder of the repository, and the
site's hook (``hooks/repo_links.py``) turns the ones outside ``docs/`` into links to the repository.
``make docs`` (``mkdocs build --strict``) checks the links between pages and the navigation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("repo_links", ROOT / "hooks" / "repo_links.py")
repo_links = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(repo_links)


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_every_relative_link_resolves():
    broken = []
    for file in _markdown_files():
        text = file.read_text(encoding="utf-8")
        page = file.relative_to(ROOT).as_posix()
        for start, _, target in repo_links.relative_links(text):
            path = repo_links.repo_path(page, target)
            if path == ".." or path.startswith("../") or not (ROOT / path).exists():
                broken.append(f"{page}:{text.count(chr(10), 0, start) + 1} -> {target}")
    assert not broken, "links to no file of the repository:\n" + "\n".join(broken)


def test_links_are_found_in_prose_only():
    text = (
        'See [the design](design.md), ![a figure](img/a.png "title") and [results](../benchmarks/x.md#top)\n'
        "across [two\nlines](../README.md). Not `[code](nowhere.md)`, [a site](https://example.org), "
        "[mail](mailto:a@b.c) or [an anchor](#here).\n"
        "```python\nx = [a](b)\n```\n"
        "[ref]: ../examples/demo.yaml\n"
    )
    found = [(text[s:e], t) for s, e, t in repo_links.relative_links(text)]
    assert [t for _, t in found] == ["design.md", "img/a.png", "../benchmarks/x.md#top", "../README.md", "../examples/demo.yaml"]
    assert all(span == t for span, t in found)


def test_hook_points_links_outside_docs_at_the_repository():
    url = "https://github.com/o/r"
    text = (
        "[p](../pipelines.md) [r](../../benchmarks/results/distill/results.md#targets) "
        "[folder](../../benchmarks/results/) [demo](../../examples/demo.yaml) `[c](../../README.md)` [w](https://x.org/a.md)"
    )
    out = repo_links.rewrite(text, "docs/methods/distillation.md", ROOT, url)
    assert out == (
        "[p](../pipelines.md) [r](https://github.com/o/r/blob/main/benchmarks/results/distill/results.md#targets) "
        "[folder](https://github.com/o/r/tree/main/benchmarks/results) [demo](https://github.com/o/r/blob/main/examples/demo.yaml) "
        "`[c](../../README.md)` [w](https://x.org/a.md)"
    )


def test_sphinx_roles_of_docstrings_are_dropped_on_api_pages():
    html = "<p>see :class:<code>Recipe</code> and :func:<code>~medalloy.x.run</code>, not <code>~/data</code>::</p>"
    assert repo_links.on_page_content(html, None, None, None) == "<p>see <code>Recipe</code> and <code>medalloy.x.run</code>, not <code>~/data</code>:</p>"


def test_escaped_pipes_in_table_code_lose_their_backslash():
    text = "| a | `x\\|y` and a\\|b |\n\n`p\\|q` outside a table\n```\n| `in\\|fence` |\n```\n"
    assert repo_links.table_pipes(text) == "| a | `x|y` and a\\|b |\n\n`p\\|q` outside a table\n```\n| `in\\|fence` |\n```\n"
