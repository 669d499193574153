"""Real datasites: one restarted with its database and state (no new approval, no lost step),
one stalled with SIGSTOP (a timeout naming it, training goes on with the other)."""

from __future__ import annotations

import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch

from syft_split import OptimizerSpec, SplitPlan, SplitSession, Trainer, split_model
from syft_split.deploy import inprocess
from syft_split.errors import CallTimeoutError
from syft_split.models import digits_cnn
from syft_split.transport.base import CallPolicy
from syft_split.transport.pysyft import PySyftTransport, deployment, restart

pytestmark = pytest.mark.pysyft


def _data(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(48, 1, 8, 8, generator=g), torch.randint(0, 10, (48,), generator=g)
    return {"train": (x[:40], y[:40]), "test": (x[40:], y[40:])}


def _session(parties: list[str], transport, **kwargs) -> SplitSession:
    torch.manual_seed(1)
    plan = SplitPlan.vanilla(split_model(digits_cnn(channels=4, hidden=16), ["pool1"]), parties)
    return SplitSession(plan, transport, optimizer=OptimizerSpec("adam", lr=1e-2), **kwargs)


def _steps(session: SplitSession, y: torch.Tensor, batches: list[torch.Tensor]) -> None:
    for idx in batches:
        session.zero_grad()
        loss, _ = session.loss("a", idx, y[idx])
        loss.backward()  # fused: the gradient stays held until the next forward
        session.step()


def test_embedded_datasite_restarts_with_its_state(tmp_path: Path) -> None:
    """A datasite crashes with a forward pending and a gradient held at the model owner; it
    comes back from its database and state directory: the segment is still approved, the
    gradient lands on the replayed forward, and the weights equal an uninterrupted run's."""
    data = {"a": _data(0)}
    y = data["a"]["train"][1]
    g = torch.Generator().manual_seed(5)
    batches = [torch.randperm(40, generator=g)[:16] for _ in range(4)]

    ref = inprocess(data)
    ref_session = _session(["a"], ref.transport)
    ref.approve_all(ref_session.propose())
    _steps(ref_session, y, batches)
    ref_session.flush()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dep = deployment(data, state_dir=tmp_path, name_prefix="t-restart")
    try:
        session = _session(["a"], dep.transport)
        dep.approve_all(session.propose())
        _steps(session, y, batches[:2])
        (sid,) = session.status()
        before = dep.owners["a"].audit()
        assert dep.transport.call("a", "status", segment=sid)["pending"] is True
        seconds = restart(dep, "a", crash=True)
        assert dep.transport.call("a", "status", segment=sid)["status"] == "approved"
        _steps(session, y, batches[2:])
        session.flush()
        got = dep.owners["a"].export_weights(sid)
        want = ref.owners["a"].export_weights(ref_session.remote[("a", 0)].segment_id)
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert all(torch.equal(p, q) for p, q in zip(session.local[1].parameters(),
                                                      ref_session.local[1].parameters()))
        after = dep.owners["a"].audit()
        assert [e.op for e in after[: len(before)]] == [e.op for e in before]  # audit kept
        assert seconds < 60
    finally:
        dep.close()
    assert (tmp_path / "a" / "host" / "host.sspl").exists()  # close() keeps a persistent site
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_stalled_http_datasite_times_out_and_training_goes_on() -> None:
    """b's HTTP server is SIGSTOPped (a 150 s stall, cut short here): its call fails with
    CallTimeoutError naming b within the timeout + 1 s; a trains on; after SIGCONT, b's
    timed-out request is settled (applied once) and b trains again."""
    timeout = 4.0  # short, but not so short that a loaded machine's ordinary call trips it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dep_a = deployment({"a": _data(0)}, name_prefix="t-stall")
        dep_b = deployment({"b": _data(1)}, http=True, name_prefix="t-stall")
    try:
        t = PySyftTransport({"a": dep_a.transport._clients["a"],  # type: ignore[attr-defined]
                             "b": dep_b.transport._clients["b"]},  # type: ignore[attr-defined]
                            policy=CallPolicy(timeout=60.0, retries=0))
        owners = {"a": dep_a.owners["a"], "b": dep_b.owners["b"]}
        session = _session(["a", "b"], t)
        for party, ids in session.propose().items():  # (b builds its host on its first call)
            owners[party].approve(ids[0])
        t.policy = CallPolicy(timeout=timeout, retries=0)
        labels = {p: {"train": _data(s)["train"][1], "test": _data(s)["test"][1]}
                  for p, s in (("a", 0), ("b", 1))}
        trainer = Trainer(session, batch_size=16, labels=labels, progress=False,
                          measure_leakage=False, on_unreachable="skip")
        pid = dep_b.transport.datasites["b"].pid  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.perf_counter()
            with pytest.raises(CallTimeoutError, match="b did not answer") as err:
                t.call("b", "describe")
            assert time.perf_counter() - t0 <= timeout + 1.0
            assert err.value.party == "b"
            report = trainer.fit(1, verbose=False)
        finally:
            os.kill(pid, signal.SIGCONT)
        [event] = report.extra["unreachable"]
        assert event["party"] == "b" and "CallTimeoutError" in event["error"]
        assert report.steps == 3  # a's batches; b's are reported, not silently lost
        seg_b = session.remote[("b", 0)]
        assert seg_b.unsettled is not None and seg_b.unsettled["op"] == "forward"
        report = trainer.fit(1, verbose=False)  # b is back
        assert report.extra["unreachable"] == [event] and report.steps == 3 + 6
        info = t.call("b", "status", segment=seg_b.segment_id)
        assert info["steps"] == 3 and info["last_step"] == seg_b.next_step - 1
    finally:
        dep_a.close()
        dep_b.close()
