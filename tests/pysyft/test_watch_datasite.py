"""The data owner's live leakage watch on a real (embedded) PySyft datasite: a model owner that
sends feature-space-hijacking gradients is halted within the stated delay, and an honest model
owner driving the same segment for the same number of steps is never halted."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from syft_split import DATA_OWNER, OptimizerSpec, SplitPlan, SplitSession, split_model
from syft_split.datasets import digits_parties
from syft_split.deploy import Deployment, datasites
from syft_split.errors import LeakageHaltError
from syft_split.leakage.hijack import FeatureSpaceHijack, HonestModelOwner
from syft_split.models import digits_cnn

STEPS = 40
DELAY = 9  # the watch's stated delay (window 5 + detect_every 5 - 1)

pytestmark = pytest.mark.pysyft


@pytest.fixture(scope="module")
def site() -> Iterator[tuple[Deployment, torch.Tensor]]:
    d = digits_parties(2, seed=0, mock_records=200)[0]
    dep = datasites({"clinic": {"train": (d.x_train, d.y_train, None, d.mock)}})
    try:
        assert d.mock is not None
        yield dep, d.mock
    finally:
        dep.close()


def _drive(dep: Deployment, owner_kind: str, mock: torch.Tensor) -> tuple[int, str]:
    """Propose the demo's input segment (labels released), approve it with the default watch,
    drive it for STEPS steps with the model owner's gradients; return (steps done, halt)."""
    torch.manual_seed(0)
    segments = split_model(digits_cnn(), cuts=["pool1"])
    plan = SplitPlan.vanilla(segments, "clinic", labels=DATA_OWNER, datasets=["train"])
    session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("adam", lr=1e-2))
    dep.approve_all(session.propose())
    seg = session.remote[("clinic", 0)]
    if owner_kind == "fsha":
        owner: object = FeatureSpaceHijack(mock, (16, 4, 4), seed=0)
        owner.pretrain(100)  # type: ignore[attr-defined]
    else:
        owner = HonestModelOwner(segments[1])
    g = torch.Generator().manual_seed(0)
    for step in range(1, STEPS + 1):
        idx = torch.randint(0, 599, (32,), generator=g)
        try:
            z = seg.forward(indices=idx)  # carries the previous step's gradient (fused)
        except LeakageHaltError as exc:
            return step - 1, str(exc)
        seg.backward(owner.gradient(z, seg.last_labels))  # type: ignore[attr-defined]
    try:
        seg.flush()
    except LeakageHaltError as exc:
        return STEPS, str(exc)
    return STEPS, ""


def test_honest_model_owner_is_never_halted(site) -> None:  # type: ignore[no-untyped-def]
    dep, mock = site
    steps, halt = _drive(dep, "honest", mock)
    assert steps == STEPS and halt == ""


def test_hijacking_model_owner_is_halted_within_the_delay(site) -> None:  # type: ignore[no-untyped-def]
    dep, mock = site
    steps, halt = _drive(dep, "fsha", mock)
    assert steps <= DELAY + 1, f"halted only after {steps} steps"
    assert "training hijack suspected" in halt and "label alignment" in halt
    audit = dep.owners["clinic"].audit_log()
    assert any(e["op"] == "halt" and e["caller"] == "watch" for e in audit)
