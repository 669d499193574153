"""Execute the tutorials as a reader would, with small parameters; check that every cell
tagged ``plot`` shows an image; write the executed copies the documentation site shows.

    python docs/notebooks.py            # every tutorial -> runs/notebooks/*.ipynb
    python docs/notebooks.py --stale    # only those changed since their executed copy

The tests (``tests/test_tutorials.py``, ``tests/pysyft/test_two_roles.py``) use the same
functions. The two-role pair (07 data owner, 08 model owner) runs together against one HTTP
datasite on loopback: :func:`run_two_roles` interleaves the two notebooks at the cells tagged
``sync:*``, each in its own kernel, as two people would in two windows.

Parameters are injected papermill-style: a cell with the overrides right after the cell
tagged ``parameters``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
#: where executed copies go (the docs site renders them when present)
OUT = ROOT / "runs" / "notebooks"
#: the pair that needs a datasite and each other; every other tutorial runs alone
DATA_OWNER = "07_data_owner_on_a_datasite.ipynb"
MODEL_OWNER = "08_model_owner_on_a_datasite.ipynb"
#: per-notebook parameters for CI (small, fast); a reader runs the defaults. The data owner's
#: attack suite used its whole 30 s budget at each review and end of run (most of each
#: notebook's time); 3 s still gives every figure the notebooks print and plot (dCor, which
#: 05 asserts on, does not depend on it)
_QUICK_SUITE = {"SUITE_BUDGET_S": 3.0}
CI_PARAMETERS: dict[str, dict[str, Any]] = {
    name: dict(_QUICK_SUITE) for name in (
        "01_split_learning_basics.ipynb", "02_vertical_split_with_psi.ipynb",
        "03_multi_hop_and_multi_task.ipynb", "05_nopeek_and_leakage.ipynb",
        "06_add_he_protection.ipynb")}
CELL_TIMEOUT = 900


def solo_notebooks() -> list[Path]:
    """The tutorials that run alone (in process)."""
    return sorted(p for p in TUTORIALS.glob("*.ipynb") if p.name not in (DATA_OWNER, MODEL_OWNER))


def read(path: Path, parameters: Mapping[str, Any] | None = None) -> nbformat.NotebookNode:
    """The notebook at ``path`` with ``parameters`` injected after its ``parameters`` cell."""
    nb = nbformat.read(str(path), as_version=4)
    if parameters:
        index = next((i for i, c in enumerate(nb.cells) if "parameters" in tags(c)), None)
        if index is None:
            raise ValueError(f"{path.name} has no cell tagged 'parameters'")
        source = "# Parameters injected for this run\n" + "\n".join(
            f"{k} = {v!r}" for k, v in parameters.items())
        cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
        nb.cells.insert(index + 1, cell)
    for cell in nb.cells:  # nbformat 5: every cell has an id
        cell.setdefault("id", f"c{abs(hash(cell.source)) % 10**8}")
    return nb


def tags(cell: Any) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


class Kernel:
    """One notebook in its own kernel, executed cell by cell (nbclient)."""

    def __init__(self, nb: nbformat.NotebookNode, name: str) -> None:
        self.nb, self.name, self.next = nb, name, 0
        env_path = {"metadata": {"path": str(TUTORIALS)}}
        self.client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources=env_path, allow_errors=False)
        self.seconds: dict[int, float] = {}

    @contextmanager
    def running(self) -> Iterator[Kernel]:
        with self.client.setup_kernel():
            yield self

    def run_until(self, tag: str | None = None, *, through: bool = False) -> None:
        """Run cells up to the first (later) cell tagged ``tag`` (itself too if ``through``);
        all remaining cells when ``tag`` is None."""
        while self.next < len(self.nb.cells):
            cell = self.nb.cells[self.next]
            if tag is not None and tag in tags(cell) and not through:
                return
            t0 = time.perf_counter()
            self.client.execute_cell(cell, self.next)
            self.seconds[self.next] = time.perf_counter() - t0
            self.next += 1
            if tag is not None and tag in tags(cell):
                return
        if tag is not None:
            raise ValueError(f"{self.name}: no cell tagged {tag!r} after cell {self.next}")


def execute(path: Path, parameters: Mapping[str, Any] | None = None) -> nbformat.NotebookNode:
    """Run the whole notebook in a fresh kernel; raises on the first failing cell."""
    nb = read(path, parameters)
    kernel = Kernel(nb, path.name)
    with kernel.running():
        kernel.run_until(None)
    return nb


def run_two_roles(owner_parameters: Mapping[str, Any], model_parameters: Mapping[str, Any]
                  ) -> tuple[nbformat.NotebookNode, nbformat.NotebookNode]:
    """The data-owner and model-owner notebooks together, interleaved as two people would:

    data owner: launch, upload, install, register the model owner   (up to ``sync:proposals``)
    model owner: connect, check the contract, propose                (through ``sync:proposed``)
    data owner: wait for the proposal, review, approve               (up to ``sync:after-training``)
    model owner: wait for approval, train, evaluate, plot            (to the end)
    data owner: audit, leakage watch, plots, land the datasite       (to the end)
    """
    owner = Kernel(read(TUTORIALS / DATA_OWNER, owner_parameters), DATA_OWNER)
    model = Kernel(read(TUTORIALS / MODEL_OWNER, model_parameters), MODEL_OWNER)
    with owner.running(), model.running():
        try:
            owner.run_until("sync:proposals")
            model.run_until("sync:proposed", through=True)
            owner.run_until("sync:after-training")
            model.run_until(None)
            owner.run_until(None)
            timings = {f"07[{i}]": t for i, t in owner.seconds.items()}
            timings.update({f"08[{i}]": t for i, t in model.seconds.items()})
            slow = sorted(timings.items(), key=lambda kv: -kv[1])[:6]
            print("slowest cells:", ", ".join(f"{k} {v:.1f}s" for k, v in slow), flush=True)
        finally:
            if owner.next < len(owner.nb.cells):  # land the datasite even after a failure
                teardown = [i for i, c in enumerate(owner.nb.cells) if "teardown" in tags(c)]
                for i in teardown:
                    try:
                        owner.client.execute_cell(owner.nb.cells[i], i)
                    except Exception as exc:  # the first failure is the one to report
                        print(f"teardown failed: {exc}", file=sys.stderr)
    return owner.nb, model.nb


def plot_problems(nb: nbformat.NotebookNode, name: str = "") -> list[str]:
    """Cells tagged ``plot`` that produced no ``image/png`` output."""
    missing = []
    for i, cell in enumerate(nb.cells):
        if "plot" in tags(cell):
            images = [o for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
            if not images:
                missing.append(f"{name} cell {i}: tagged 'plot' but shows no image")
    return missing


def write(nb: nbformat.NotebookNode, name: str, out: Path = OUT) -> Path:
    """Save an executed notebook for the docs site."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
    nbformat.write(nb, str(tmp))
    tmp.replace(path)  # atomic: a docs build running meanwhile reads old or new, never half
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--only", nargs="*", help="notebook names (default: all)")
    parser.add_argument("--stale", action="store_true",
                        help="only notebooks whose executed copy is missing or older")
    args = parser.parse_args(argv)
    if args.stale:
        args.only = [p.name for p in sorted(TUTORIALS.glob("*.ipynb"))
                     if not (args.out / p.name).exists()
                     or (args.out / p.name).stat().st_mtime < p.stat().st_mtime]
        if not args.only:
            print("every executed tutorial is up to date")
            return 0
    os.environ.setdefault("TQDM_DISABLE", "1")
    problems: list[str] = []
    for path in solo_notebooks():
        if args.only and path.name not in args.only:
            continue
        t0 = time.perf_counter()
        nb = execute(path, CI_PARAMETERS.get(path.name))
        problems += plot_problems(nb, path.name)
        write(nb, path.name, args.out)
        print(f"{path.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.only or {DATA_OWNER, MODEL_OWNER} & set(args.only):
        from syft_split.transport.pysyft import free_port

        port = free_port()
        t0 = time.perf_counter()
        owner_nb, model_nb = run_two_roles(*two_role_parameters(port))
        for nb, name in ((owner_nb, DATA_OWNER), (model_nb, MODEL_OWNER)):
            problems += plot_problems(nb, name)
            write(nb, name, args.out)
        print(f"two roles: {time.perf_counter() - t0:.0f} s", flush=True)
    print(json.dumps(problems, indent=1) if problems else "every plot cell shows an image")
    return 1 if problems else 0


def two_role_parameters(port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Small parameters for the two-role pair on ``port`` (CI: one epoch, few records)."""
    password = "ci-" + os.urandom(6).hex()
    owner = {"PORT": port, "MODEL_OWNER_PASSWORD": password, "RECORDS": 640, "WAIT_S": 300,
             "NAME": f"hospital-{os.getpid()}-{port}"}
    model = {"DATASITE_URL": f"http://localhost:{port}", "PASSWORD": password, "EPOCHS": 1,
             "BATCH_SIZE": 16, "APPROVAL_WAIT_S": 300, "MIN_ACCURACY": 0.3}
    return owner, model


if __name__ == "__main__":
    raise SystemExit(main())
