"""MkDocs hooks: one source of truth for the text the repository already holds.

- ``on_pre_build``: every ``tutorials/*.ipynb`` is staged as ``docs/tutorials/`` (git-ignored)
  and becomes a page (mkdocs-jupyter renders it): the executed copy from ``runs/notebooks/``
  when the tests or ``make docs`` wrote one, else the committed notebook (outputs stripped).
- ``on_post_page``: links between notebooks point at their pages on the site.
- ``on_page_markdown``: a line ``<!-- include: PATH -->`` is replaced by that file of the
  repository, ``<!-- include-section: PATH | Heading -->`` by one ``## Heading`` section of
  it (a note pointing at the file when another branch has not written that section yet).
  Links in included text are rewritten to site pages, or to plain code when the target is a
  repository file that is not a page.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import Files

ROOT = Path(__file__).resolve().parents[1]
EXECUTED = ROOT / "runs" / "notebooks"
log = logging.getLogger("mkdocs.hooks.syft_split")

#: repository files that are pages of the site
PAGES = {"README.md": "index.md", "SECURITY.md": "security.md", "he_layers/README.md": "he.md"}
_INCLUDE = re.compile(r"^<!-- include: (?P<path>[^|>]+?) -->$", re.M)
_SECTION = re.compile(r"^<!-- include-section: (?P<path>[^|>]+?) \| (?P<title>[^>]+?) -->$", re.M)
_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<target>[^)#\s]+)(?P<anchor>#[^)]*)?\)")


def on_pre_build(config: Any) -> None:
    """Stage the tutorials as ``docs/tutorials/*.ipynb`` (git-ignored) before mkdocs collects
    files: the executed copy when there is one, else the committed notebook. Unchanged files
    are left alone (``mkdocs serve`` would rebuild forever)."""
    staged = Path(config["docs_dir"]) / "tutorials"
    staged.mkdir(exist_ok=True)
    for src in sorted((ROOT / "tutorials").glob("*.ipynb")):
        executed = EXECUTED / src.name
        data = (executed if executed.exists() else src).read_bytes()
        dest = staged / src.name
        if not dest.exists() or dest.read_bytes() != data:
            dest.write_bytes(data)
        log.info("tutorial %s: %s", src.name, "executed" if executed.exists() else "not executed")


#: README anchor -> the page that includes that README section (filled in on_config)
SECTION_PAGES: dict[str, str] = {}
_BARE_ANCHOR = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<anchor>#[^)\s]+)\)")


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).strip().replace(" ", "-")


def on_config(config: Any) -> Any:
    docs = Path(config["docs_dir"])
    for page in docs.rglob("*.md"):
        for m in _SECTION.finditer(page.read_text(encoding="utf-8")):
            if m["path"].strip() == "README.md":
                SECTION_PAGES[_slug(m["title"])] = page.relative_to(docs).as_posix()
    return config


def _rewrite_links(text: str, source: str, page: str) -> str:
    base = (ROOT / source).parent
    page_dir = Path(page).parent

    def up(dest: str | Path) -> str:
        return Path(*[".."] * len(page_dir.parts), dest).as_posix() if page_dir.parts else str(dest)

    def anchor(m: re.Match[str]) -> str:  # a README section that another page shows
        target = SECTION_PAGES.get(m["anchor"][1:])
        if source != "README.md" or target is None or target == page:
            return m[0]
        return f"[{m['text']}]({up(target)}{m['anchor']})"

    def fix(m: re.Match[str]) -> str:
        target, fragment, label = m["target"], m["anchor"] or "", m["text"]
        if "://" in target or target.startswith("mailto:"):
            return m[0]
        rel = (base / target).resolve()
        try:
            repo_path = rel.relative_to(ROOT).as_posix()
        except ValueError:
            return label
        if repo_path in PAGES:
            dest = Path(PAGES[repo_path])
        elif repo_path.startswith("tutorials/") and repo_path.endswith(".ipynb"):
            dest = Path(repo_path)
        else:
            return f"{label} (`{repo_path}`)" if label.strip("`") != repo_path else f"`{repo_path}`"
        return f"[{label}]({up(dest)}{fragment})"

    return _BARE_ANCHOR.sub(anchor, _LINK.sub(fix, text))


def _section(text: str, title: str) -> str | None:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == f"## {title}"), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    return "\n".join(lines[start:end])


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    def include(m: re.Match[str]) -> str:
        path = m["path"].strip()
        text = (ROOT / path).read_text(encoding="utf-8")
        return _rewrite_links(text, path, page.file.src_uri)

    def section(m: re.Match[str]) -> str:
        path, title = m["path"].strip(), m["title"].strip()
        found = _section((ROOT / path).read_text(encoding="utf-8"), title)
        if found is None:
            log.info("%s has no section %r yet", path, title)
            return f"*The section “{title}” of `{path}` is not written yet.*"
        if markdown.lstrip().startswith(f"# {title}\n"):  # the page's own title already
            found = found.split("\n", 1)[1] if "\n" in found else ""
        return _rewrite_links(found, path, page.file.src_uri)

    return _SECTION.sub(section, _INCLUDE.sub(include, markdown))


_NOTEBOOK_LINK = re.compile(r'href="(?P<name>\d\d_[A-Za-z0-9_]+)\.ipynb"')


#: a Sphinx role in a docstring as rendered: :class:<code>~a.b.C</code>
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):<code>(?P<tilde>~?)(?P<name>[^<]*)</code>")


def _role(m: re.Match[str]) -> str:
    name = m["name"].rsplit(".", 1)[-1] if m["tilde"] else m["name"]
    return f"<code>{name}</code>"


def on_post_page(output: str, page: Any, config: Any) -> str:
    """Links between notebooks (``07_x.ipynb`` works in Jupyter) point at their pages; the
    docstrings' Sphinx roles (``:class:`~x.Y```) and ``::`` read as plain code and ":"."""
    if page.file.src_uri.startswith("tutorials/"):
        return _NOTEBOOK_LINK.sub(lambda m: f'href="../{m["name"]}/"', output)
    if page.file.src_uri.startswith("reference/"):
        return _ROLE.sub(_role, output).replace("::</p>", ":</p>")
    return output
