"""The public surface is pinned, heavy dependencies stay lazy, errors map across the wire."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import syft_split
from syft_split import errors

PUBLIC = {
    "ActivationPointer", "DATA_OWNER", "DataOwnerHost", "Dataset", "HostLimits", "InProcessTransport",
    "MODEL_OWNER", "OptimizerSpec", "PySyftTransport", "RemoteSegment", "RunReport", "SplitPlan",
    "SplitSession", "StepMetrics", "TrafficLog", "Trainer", "Transport", "compose", "cut_points",
    "split_model",
}


def test_all_is_pinned() -> None:
    assert set(syft_split.__all__) == PUBLIC | set(errors.__all__)
    assert len(syft_split.__all__) == len(set(syft_split.__all__))


def test_every_public_name_resolves_without_syft() -> None:
    for name in syft_split.__all__:
        if name != "PySyftTransport":
            assert getattr(syft_split, name) is not None


def test_import_does_not_load_syft_or_tenseal() -> None:
    code = (
        "import sys, syft_split, syft_split.session, syft_split.trainer, syft_split.demo\n"
        "bad = [m for m in ('syft', 'tenseal', 'he_layers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_error_derives_from_one_base() -> None:
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, errors.SyftSplitError)


@pytest.mark.parametrize("name", [n for n in errors.__all__ if n[0].isupper()])
def test_errors_round_trip_by_name(name: str) -> None:
    exc = errors.error_from_wire(name, "boom")
    assert type(exc).__name__ == name and str(exc) == "boom"


def test_unknown_remote_error_name_is_not_evaluated() -> None:
    exc = errors.error_from_wire("os.system", "x")
    assert isinstance(exc, errors.RemoteError)


def _imported_names(path: Path) -> list[tuple[str, str, int]]:
    """(module, name, line) of every ``from syft_split/he_layers... import name`` in a file,
    at any depth (benches import lazily inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(node.module, alias.name, node.lineno) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
            and node.module.split(".")[0] in ("syft_split", "he_layers")
            for alias in node.names]


def _exists(module: str, name: str) -> bool:
    if hasattr(importlib.import_module(module), name):
        return True
    try:  # a submodule
        importlib.import_module(f"{module}.{name}")
    except ImportError:
        return False
    return True


def test_the_benches_and_tutorial_scripts_import_names_that_exist() -> None:
    """A bench imports what it needs inside functions: a moved name breaks ``make bench``
    only when that function runs (bench/pysyft_step.py did, for a release)."""
    root = Path(__file__).resolve().parents[1]
    missing = []
    for path in sorted([*root.glob("bench/*.py"), *root.glob("tutorials/*.py")]):
        for module, name, line in _imported_names(path):
            if not _exists(module, name):
                missing.append(f"{path.name}:{line}: {module}.{name}")
    assert missing == []
