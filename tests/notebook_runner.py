"""Load ``docs/notebooks.py`` (the tutorial runner the docs build uses too) for the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PATH = Path(__file__).resolve().parents[1] / "docs" / "notebooks.py"


def runner() -> ModuleType:
    """The ``docs/notebooks.py`` module (loaded once)."""
    name = "syft_split_docs_notebooks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PATH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
