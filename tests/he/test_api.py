"""The public surface is pinned, and syft_split never imports he_layers/tenseal on import."""

from __future__ import annotations

import subprocess
import sys

import pytest

import he_layers

pytestmark = pytest.mark.he


def test_all_is_the_public_surface() -> None:
    public = {n for n in dir(he_layers) if not n.startswith("_")}
    modules = {"client", "conv", "costs", "evaluator", "keys", "packing", "params", "server",
               "spec", "validate", "wire"}
    assert set(he_layers.__all__) == public - modules


def test_import_syft_split_does_not_load_tenseal_or_he_layers() -> None:
    code = (
        "import sys, syft_split, syft_split.errors; "
        "bad = [m for m in ('he_layers', 'tenseal') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
