"""A model owner that dies during secure aggregation resumes exactly (SplitFed v1, per-step
checkpoints): also between two data owners' ``secagg_aggregate`` calls, when one has loaded the
round's average and the other has not. The new process finishes that round under its own
number (the member that loaded it serves the same contribution again) before training on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from syft_split import OptimizerSpec, SplitSession

from .conftest import Crash
from .test_durability import _chaos, _plan, _reference, _start, _trainer, _weights

KIND = "splitfed_v1"


@pytest.mark.parametrize("crash", [("secagg_contribute", 1), ("secagg_aggregate", 1),
                                   ("secagg_aggregate", 2), ("secagg_aggregate", 3)])
def test_model_owner_dies_during_secure_aggregation(tmp_path: Path,
                                                    crash: tuple[str, int]) -> None:
    want, _, _ = _reference(KIND, 1)
    t = _chaos(KIND, tmp_path / "owners", {crash: "model_owner"})
    session = _start(KIND, t, t.host)
    crashed = 0
    while True:
        try:
            report = _trainer(session, KIND).fit(1, verbose=False,
                                                 checkpoint_dir=tmp_path / "mo", resume=True)
            break
        except Crash:
            crashed += 1  # a new process: new session, other initial weights
            session = SplitSession(_plan(KIND, seed=99), t,
                                   optimizer=OptimizerSpec("adam", lr=1e-2))
    assert crashed == 1 and report.extra["resumed"] >= 1
    got = _weights(session, t.host)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), \
        "weights differ from the uninterrupted run"
