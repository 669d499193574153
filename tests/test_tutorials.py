"""Every tutorial runs as a reader would (small parameters), and shows its plots.

A cell tagged ``plot`` must produce an ``image/png`` output. Executed copies go to
``runs/notebooks/`` for the docs site; the committed notebooks carry no outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from .notebook_runner import runner

TUTORIALS = sorted(Path(__file__).resolve().parents[1].glob("tutorials/*.ipynb"))


@pytest.mark.parametrize("path", runner().solo_notebooks(), ids=lambda p: p.name)
def test_tutorial_runs_and_shows_its_plots(path: Path) -> None:
    nbr = runner()
    nb = nbr.execute(path, nbr.CI_PARAMETERS.get(path.name))
    nbr.write(nb, path.name)
    assert nbr.plot_problems(nb, path.name) == []


def test_every_tutorial_plots_and_is_tagged() -> None:
    """Every tutorial has at least one plot cell and one parameters cell."""
    for path in TUTORIALS:
        nb = nbformat.read(str(path), as_version=4)
        tags = [t for c in nb.cells for t in c.get("metadata", {}).get("tags", [])]
        assert "plot" in tags, f"{path.name} has no cell tagged 'plot'"
        assert "parameters" in tags, f"{path.name} has no cell tagged 'parameters'"
        sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert 'matplotlib.use("Agg")' not in sources, f"{path.name} hides its plots"


def test_committed_notebooks_have_no_outputs() -> None:
    for path in TUTORIALS:
        raw = json.loads(path.read_text())
        for i, cell in enumerate(raw["cells"]):
            if cell["cell_type"] == "code":
                assert cell.get("outputs") == [], f"{path.name} cell {i} has outputs"
                assert cell.get("execution_count") is None, f"{path.name} cell {i} was run"


def test_runner_checks_plots() -> None:
    """The plot check is not vacuous: a plot cell without an image is reported."""
    nbr = runner()
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(1)", metadata={"tags": ["plot"]})
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    nb.cells = [cell]
    assert nbr.plot_problems(nb, "x") == ["x cell 0: tagged 'plot' but shows no image"]


def test_docs_site_builds_with_warnings_as_errors(tmp_path: Path) -> None:
    """``mkdocs build --strict`` into a temp dir (the executed tutorials of this test run when
    present in ``runs/notebooks/``, else the committed ones); a warning fails the build."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2.0
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=root, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    site = tmp_path / "site"
    for page in ("index.html", "two-roles/index.html", "data-contract/index.html",
                 "security/index.html", "reference/data-owner/index.html",
                 "tutorials/08_model_owner_on_a_datasite/index.html"):
        assert (site / page).exists(), page
    api = (site / "reference/data-owner/index.html").read_text()
    assert "check_datasite" in api and "publish_dataset" in api  # from the docstrings


def test_no_build_artefacts_are_committed() -> None:
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    artefacts = [p for p in tracked if ".egg-info/" in p or p.startswith(("site/", "build/",
                                                                          "dist/", "runs/",
                                                                          "docs/tutorials/"))]
    assert artefacts == []


def test_saving_a_report_keeps_the_notebook_backend(tmp_path: Path) -> None:
    """``report.save`` (report.png) must not switch matplotlib's backend: in a notebook that
    would silently stop every later inline plot."""
    import matplotlib

    from syft_split.report import EpochRecord, RunReport

    before = matplotlib.get_backend()
    try:
        matplotlib.use("pdf")
        report = RunReport(config={}, epochs=[EpochRecord(1, 0.5, 0.8, 0.6, 0.7, 3, 1.0, {})],
                           bytes_by_party={"h": {"sent": 10, "received": 20}})
        report.save(tmp_path)
        assert (tmp_path / "report.png").stat().st_size > 1000
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
