"""Durable training, the model owner's side: its process dies (at random calls, around a
relay's sealed weights, or a fit raises in the same process) and a new one resumes from its
checkpoint, sending again what it cannot know was applied; the run ends with the very weights
and report of an uninterrupted run. A resume configured otherwise is refused. (The data
owners' side, and the helpers these tests share: ``test_durability.py``.)"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from syft_split import InProcessTransport, OptimizerSpec, RunReport, SplitSession, Trainer
from syft_split.errors import ConfigError

from .conftest import ChaosTransport, Crash
from .test_durability import _chaos, _host, _plan, _reference, _start, _trainer, _weights


def _fit_resuming(kind: str, t: ChaosTransport, ckpt: Path, fuse: bool = True
                  ) -> tuple[SplitSession, RunReport, int]:
    """Two epochs from a new session on ``t``'s data owners; each time the model owner's
    process dies, a new one resumes from ``ckpt``. Returns the last session, its report and
    how many processes died."""
    session = _start(kind, t, t.host, fuse=fuse)
    crashed = 0
    while True:
        try:
            report = _trainer(session, kind).fit(2, verbose=False, checkpoint_dir=ckpt,
                                                 resume=True)
            return session, report, crashed
        except Crash:
            crashed += 1  # a new process: new session, other initial weights, no segments
            torch.manual_seed(1000 + crashed)  # and another torch RNG state
            session = SplitSession(_plan(kind, seed=99), t,
                                   optimizer=OptimizerSpec("adam", lr=1e-2), fuse=fuse)


@pytest.mark.parametrize("kind, fuse", [("vanilla", True), ("u_shaped", True),
                                        ("vanilla", False), ("u_shaped", False),
                                        ("splitfed_v1", True), ("relay", True),
                                        ("dropout", True)])
def test_model_owner_resumes_from_its_checkpoint(tmp_path: Path, kind: str, fuse: bool) -> None:
    """The model owner's process dies right after a data owner applied a request (three times,
    at random calls); a new process with a freshly initialised model re-attaches by segment id
    (``fit(resume=True)``), sends again what it cannot know was applied, and the run ends with
    the uninterrupted run's weights -- with a dropout in the model owner's segment too: the
    cost ledger's first count in the new process draws nothing from the restored RNG.
    Unfused steps send two changing requests per segment and step: both are answered from the
    data owner's record."""
    want, want_report, calls = _reference(kind, 2, fuse)
    rng = random.Random(f"mo-{kind}-{fuse}")
    crashes = {n: "model_owner" for n in rng.sample(calls, 3)}
    t = _chaos(kind, tmp_path / "owners", crashes)
    session, report, crashed = _fit_resuming(kind, t, tmp_path / "model_owner", fuse)
    assert crashed == 3 and report.extra["resumed"] >= 1
    got = _weights(session, t.host)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), "weights differ after resume"
    # the report covers the crashed processes' work too (as of their last checkpoints)
    assert report.steps == want_report.steps
    assert report.flops_by_party == want_report.flops_by_party
    assert report.peak_memory_by_party == want_report.peak_memory_by_party
    assert report.transport_calls >= want_report.transport_calls  # + requests sent again
    for party, row in want_report.bytes_by_party.items():
        assert report.bytes_by_party[party]["sent"] >= row["sent"]
    assert report.wall_time_s >= sum(e.seconds for e in report.epochs)


def test_model_owner_resumes_in_the_middle_of_a_relay(tmp_path: Path) -> None:
    """Relay: the model owner dies around the sealed weights it relays -- after the source
    flushed its gradient, after a seal, after the recipient applied the unseal, after that
    unseal was answered again from the record, and before an unseal leaves. The sealed bytes
    are in the checkpoint before they are sent, so a new process sends those very bytes again
    under their step id (sealing again gives other bytes, which the data owner would refuse as
    a different request) and the run ends with the uninterrupted run's weights."""
    want, want_report, _ = _reference("relay", 2)
    # per op, requests sent again count too: unseal 2 is unseal 1 sent again after the crash
    crashes: dict[int | tuple[str, int], str] = {
        ("backward", 1): "model_owner", ("seal", 1): "model_owner",
        ("unseal", 1): "model_owner", ("unseal", 2): "model_owner",
        ("unseal", 4): "model_owner_before"}
    t = _chaos("relay", tmp_path / "owners", dict(crashes))
    session, report, crashed = _fit_resuming("relay", t, tmp_path / "model_owner")
    assert crashed == len(crashes) and not t.crashes  # every crash happened
    assert t.per_op["unseal"] == 6  # 3 relays; one sent twice, one three times
    got = _weights(session, t.host)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), "weights differ after resume"
    assert report.steps == want_report.steps
    assert [e.train_loss for e in report.epochs] == [e.train_loss for e in want_report.epochs]
    for (party, _i), seg in session.remote.items():  # no step applied twice, none lost
        info = t.call(party, "status", segment=seg.segment_id)
        assert info["last_step"] == seg.next_step - 1 and not info["pending"]


def test_a_resume_in_the_same_process_reports_like_an_uninterrupted_run(tmp_path: Path) -> None:
    """fit(resume=True) on the same Trainer after a fit that raised: the steps after the
    checkpoint run again, and the report counts them once (it added the checkpoint's totals
    to what the failed fit had counted: FLOPs 1.4x, bytes 1.3x)."""
    from syft_split.errors import TransportError

    def run(interrupt: bool) -> tuple[object, list[torch.Tensor]]:
        hosts = {p: _host(p, None) for p in ["a", "b"]}
        session = _start("vanilla", InProcessTransport(list(hosts.values())), hosts.__getitem__)
        trainer = _trainer(session, "vanilla")
        ck = tmp_path / f"ck-{interrupt}"
        if not interrupt:
            return trainer.fit(2, verbose=False, checkpoint_dir=ck), _weights(
                session, hosts.__getitem__)
        step, calls = trainer._train_step, [0]

        def flaky(*a: object, **k: object) -> object:
            calls[0] += 1
            if calls[0] == 5:
                raise TransportError("a: link down for a moment")
            return step(*a, **k)

        trainer._train_step = flaky  # type: ignore[method-assign]
        with pytest.raises(TransportError):
            trainer.fit(2, verbose=False, checkpoint_dir=ck)
        report = trainer.fit(2, verbose=False, checkpoint_dir=ck, resume=True)
        return report, _weights(session, hosts.__getitem__)

    (want, want_w), (got, got_w) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(want_w, got_w, strict=True))
    assert got.steps == want.steps  # type: ignore[attr-defined]
    for field in ("flops_by_party", "bytes_by_party", "transport_calls"):
        assert getattr(got, field) == getattr(want, field), field


def test_a_resume_configured_otherwise_is_refused(tmp_path: Path) -> None:
    """The checkpoint held no configuration: a new process resuming with another batch size
    or seed went on silently with other batches (no step id overlaps, nothing noticed it).
    It is refused, naming what differs; configured as before, the run ends as uninterrupted."""
    want, _, calls = _reference("vanilla", 2)
    t = _chaos("vanilla", tmp_path / "do", {calls[5]: "model_owner"})
    ckpt = tmp_path / "mo"
    session = _start("vanilla", t, t.host)
    with pytest.raises(Crash):
        _trainer(session, "vanilla").fit(2, verbose=False, checkpoint_dir=ckpt)
    session = SplitSession(_plan("vanilla", seed=99), t, optimizer=OptimizerSpec("adam", lr=1e-2))
    for other in ({"batch_size": 8}, {"seed": 5}):
        kwargs = {"batch_size": 16, "labels": None, "seed": 0, "progress": False,
                  "measure_leakage": False, **other}
        with pytest.raises(ConfigError, match=f"configured otherwise \\(\\['{next(iter(other))}'"):
            Trainer(session, **kwargs).fit(2, verbose=False, checkpoint_dir=ckpt, resume=True)
    _trainer(session, "vanilla").fit(2, verbose=False, checkpoint_dir=ckpt, resume=True)
    got = _weights(session, t.host)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
