"""``report.html``: the report's markdown as one self-contained page (tables styled, every image
embedded as a ``data:`` URI, nothing fetched from the network), so it can be mailed or archived."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_IMG = re.compile(r'<img alt="([^"]*)" src="([^"]+)"\s*/?>')
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; margin: 0.5em 0; border: 1px solid #eee; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _embed(match: re.Match, root: Path) -> str:
    alt, src = match.group(1), match.group(2)
    path = root / src
    if src.startswith(("data:", "http:", "https:")) or not path.is_file():
        return f"<p><em>[{html.escape(alt)}: image not found]</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{alt}" src="data:image/png;base64,{data}"/>'


def markdown_to_html(text: str, root: Path, title: str) -> str:
    """``text`` (markdown whose images are paths relative to ``root``) as one self-contained HTML page."""
    import markdown

    body = markdown.markdown(text, extensions=["tables"], output_format="html")
    body = _IMG.sub(lambda m: _embed(m, root), body)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
