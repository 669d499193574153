"""A data owner whose answer the model owner refuses (syft_split.answers) is handled like an
unreachable one under ``Trainer(on_unreachable="skip")``: the refused step is dropped on both
sides (no model-owner step; the data owner's pending step discarded), the data owner sits out
the rest of the epoch, the report says it was refused and why, and it trains again the next
epoch. The run ends with the weights of a run in which that data owner's batches from the
refused one to the end of the epoch were never trained. Under ``"raise"`` the same error is
raised, and the data owner's segment still takes the next step."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from syft_split import OptimizerSpec, SplitPlan, SplitSession, Trainer, deploy, wire
from syft_split.deployment import Deployment
from syft_split.errors import NonFiniteError, ValidationError
from syft_split.session import StepMetrics
from syft_split.topology import RELEASED
from syft_split.transport.base import Transport, TransportWrapper

from .conftest import Crash

PARTIES = ["a", "b", "c"]
BAD = "b"  # the malicious data owner
K = 1  # its batch (0-based, of epoch 1) whose answer is bad: its 2nd of 4
B, N = 8, 32  # batch, records per data owner
#: (plan, op whose answer is bad): an activation; a U-shaped loss step's figures (or its
#: forward: the loss segment's loss weight of BAD's batch K-1 is still held back then); labels
#: released with a good activation, refused after the model owner's segment (with BatchNorm)
#: ran on it
CASES = [("vanilla", "forward"), ("u_shaped", "loss_step"), ("u_shaped", "forward"),
         ("released", "forward")]


def _data(p: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(PARTIES.index(p))
    x, y = torch.randn(N + 8, 16, generator=g), torch.randint(0, 4, (N + 8,), generator=g)
    return {"train": (x[:N], y[:N]), "test": (x[N:], y[N:])}


def _plan(kind: str, seed: int = 0) -> SplitPlan:
    torch.manual_seed(seed)
    first, mid, last = nn.Sequential(nn.Linear(16, 8), nn.ReLU()), nn.Linear(8, 8), nn.Linear(8, 4)
    if kind == "u_shaped":
        return SplitPlan.u_shaped([first, nn.Sequential(mid, nn.ReLU()), last], PARTIES)
    if kind == "released":
        return SplitPlan.vanilla([first, nn.Sequential(mid, nn.BatchNorm1d(8), nn.ReLU(), last)],
                                 PARTIES, labels=RELEASED)
    return SplitPlan.vanilla([first, nn.Sequential(mid, nn.ReLU(), last)], PARTIES)


def _bad(op: str, answer: dict[str, Any]) -> dict[str, Any]:
    if op == "loss_step":  # a count that is not the batch
        return {**answer, "count": answer["count"] + 1}
    if "labels" in answer:  # a class out of range
        return {**answer, "labels": torch.full_like(answer["labels"], 4)}
    return {**answer, "activation": torch.full_like(answer["activation"], float("nan"))}


class Malicious(TransportWrapper):
    """BAD answers its training request ``op`` under step id ``step`` badly (also when that
    request is sent again: it answers from its record, as badly); ``crash_at_discard``: the
    model owner's process dies right after BAD applied its n-th ``discard``. ``forwards``
    counts BAD's training forwards."""

    def __init__(self, inner: Transport, op: str, *, step: int | None,
                 crash_at_discard: int | None = None, discarded: Any = None) -> None:
        super().__init__(inner)
        self.op, self.step, self.crash_at = op, step, crash_at_discard
        self.discarded = discarded  # if set: what BAD answers to a discard
        self.hits = self.discards = self.forwards = 0

    def request(self, party: str, data: bytes) -> bytes:
        raw = self.inner.request(party, data)
        if party != BAD:
            return raw
        req = wire.decode(data)
        op = req.get("op")
        if op == "forward" and req.get("train", True):
            self.forwards += 1
        if op == "discard":
            self.discards += 1
            if self.discards == self.crash_at:
                self.crash_at = None
                raise Crash
            if self.discarded is not None:
                return wire.encode({"discarded": self.discarded})
        if op != self.op or req.get("step") != self.step:
            return raw
        answer = wire.decode(raw)
        if "error" in answer:
            return raw
        self.hits += 1
        return wire.encode(_bad(self.op, answer))


class SkipFrom(Trainer):
    """The reference: BAD's batches from its K-th of epoch 1 on are not trained (nothing is
    sent for them; its gradient of batch K-1 is delivered at the end of the epoch)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: Counter[tuple[int | None, str]] = Counter()

    def _train_step(self, party: str, idx: torch.Tensor, end_of_round: bool,
                    round_sizes: dict[str, float]) -> StepMetrics:
        key = (self._round_at[0], party)
        self.seen[key] += 1
        if key == (1, BAD) and self.seen[key] > K:
            return StepMetrics(0.0, 0, 0)
        return super()._train_step(party, idx, end_of_round, round_sizes)


def _labels(kind: str) -> dict[str, dict[str, torch.Tensor]] | None:
    if kind != "vanilla":
        return None  # at the data owners (released with the activations)
    return {p: {ds: y for ds, (_x, y) in _data(p).items()} for p in PARTIES}


def _setup(kind: str, op: str = "forward", **malice: Any
           ) -> tuple[Deployment, Malicious, SplitSession]:
    dep = deploy.inprocess({p: _data(p) for p in PARTIES})
    t = Malicious(dep.transport, op, **malice)
    s = SplitSession(_plan(kind), t, optimizer=OptimizerSpec("adam", lr=1e-2))
    dep.approve_all(s.propose())
    return dep, t, s


def _trainer(s: SplitSession, kind: str, cls: type[Trainer] = Trainer,
             on_unreachable: str = "skip") -> Trainer:
    return cls(s, batch_size=B, labels=_labels(kind), seed=0, progress=False,
               test_dataset=None, watch=False, measure_leakage=False,
               on_unreachable=on_unreachable)


def _weights(s: SplitSession, dep: Deployment) -> list[torch.Tensor]:
    s.flush()
    out = [t for m in s.local.values() for t in m.state_dict().values()]
    for (party, _i), seg in sorted(s.remote.items()):
        out.extend(dep.owners[party].export_weights(seg.segment_id).values())
    return out


def _reference(kind: str, epochs: int = 2) -> tuple[list[torch.Tensor], int]:
    dep, _t, s = _setup(kind, step=None)
    report = _trainer(s, kind, SkipFrom).fit(epochs, verbose=False)
    return _weights(s, dep), report.steps


def _nothing_pending(s: SplitSession, only: str | None = None) -> None:
    for (party, _i), seg in s.remote.items():
        if only not in (None, party):
            continue
        info = s.transport.call(party, "status", segment=seg.segment_id)
        assert not info["pending"] and info["last_step"] == seg.next_step - 1


def _check_refusal(report: Any, kind: str, op: str) -> None:
    [event] = report.extra["unreachable"]
    # round robin: a, b, c, a, b, c, ...: BAD's batch K is the run's batch 3K + 1
    assert {k: event[k] for k in ("party", "epoch", "batch", "reason")} == {
        "party": BAD, "epoch": 1, "batch": 3 * K + 1, "reason": "refused"}
    field = {"vanilla": "activation", "u_shaped": "activation", "released": "labels"}[kind]
    field = "count" if op == "loss_step" else field
    assert f"{BAD}'s answer to {op!r} has a bad field {field!r}" in event["error"]


@pytest.mark.parametrize("kind, op", CASES)
def test_a_refused_data_owner_is_skipped_for_the_rest_of_the_epoch(kind: str, op: str) -> None:
    want, want_steps = _reference(kind)
    dep, t, s = _setup(kind, op, step=K + 1)  # its K-th training request carries step K + 1
    report = _trainer(s, kind).fit(2, verbose=False)
    assert t.hits == 1
    _check_refusal(report, kind, op)
    assert report.steps == want_steps == 2 * 3 * (N // B) - (N // B - K)
    assert t.forwards == K + 1 + N // B  # it trains again in epoch 2
    got = _weights(s, dep)
    assert len(got) == len(want)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), "weights differ from the reference"
    _nothing_pending(s)


@pytest.mark.parametrize("kind, op", CASES)
def test_under_raise_the_refusal_is_raised_and_the_data_owner_takes_the_next_step(
        kind: str, op: str) -> None:
    _dep, t, s = _setup(kind, op, step=K + 1)
    trainer = _trainer(s, kind, on_unreachable="raise")
    cls = NonFiniteError if op == "forward" and kind != "released" else ValidationError
    with pytest.raises(cls) as caught:
        trainer.fit(2, verbose=False)
    assert t.hits == 1 and type(caught.value) is cls and caught.value.party == BAD
    assert f"{BAD}'s answer to {op!r}" in str(caught.value)
    assert not getattr(caught.value, "__notes__", None)  # the discard went through
    assert "unreachable" not in trainer.report.extra
    _nothing_pending(s, BAD)  # (the others' last forwards wait for their held gradients)
    # the user goes on: BAD's segments take the next step
    steps = {seg.segment_id: seg.next_step for (p, _i), seg in s.remote.items() if p == BAD}
    idx = torch.arange(B)
    labels = _labels(kind)
    s.zero_grad()
    loss, _ = s.loss(BAD, idx, None if labels is None else labels[BAD]["train"][idx],
                     dataset="train")
    loss.backward()
    s.step()
    s.flush()
    _nothing_pending(s)
    assert all(seg.next_step > steps[seg.segment_id]
               for (p, _i), seg in s.remote.items() if p == BAD)


def test_a_discard_answered_with_a_tensor_does_not_stop_the_run() -> None:
    """The model owner reads the discard's answer as "discarded" only if it is True: a
    malicious data owner answering a tensor there made ``bool()`` raise (RuntimeError) and
    stopped the run the skip was for."""
    want, _ = _reference("vanilla")
    dep, t, s = _setup("vanilla", "forward", step=K + 1, discarded=torch.ones(3))
    report = _trainer(s, "vanilla").fit(2, verbose=False)
    assert t.discards == 1
    _check_refusal(report, "vanilla", "forward")
    assert all(torch.equal(a, b) for a, b in zip(_weights(s, dep), want))


class EvaluationAnswers(TransportWrapper):
    """With ``bad``, BAD answers evaluation loss steps with a ``correct`` past the batch; with
    ``host_refuses``, c's host answers loss steps with its own ValidationError."""

    def __init__(self, inner: Transport) -> None:
        super().__init__(inner)
        self.bad = self.host_refuses = False

    def request(self, party: str, data: bytes) -> bytes:
        req = wire.decode(data)
        if self.host_refuses and party == "c" and req.get("op") == "loss_step":
            return wire.encode({"error": "ValidationError", "message": "c: bad request"})
        raw = self.inner.request(party, data)
        if self.bad and party == BAD and req.get("op") == "loss_step" and not req["train"]:
            return wire.encode({**wire.decode(raw), "correct": 10**6})
        return raw


def test_evaluation_skips_a_refused_answer_not_a_hosts_refusal() -> None:
    """U-shaped evaluation: BAD's loss figures are refused, it is left out of the figures and
    reported; an error a data owner's host answers (about the model owner's request, not an
    answer the model owner refused) still stops the evaluation."""
    dep = deploy.inprocess({p: _data(p) for p in PARTIES})
    t = EvaluationAnswers(dep.transport)
    s = SplitSession(_plan("u_shaped"), t, optimizer=OptimizerSpec("adam", lr=1e-2))
    dep.approve_all(s.propose())
    trainer = _trainer(s, "u_shaped")
    want = {p: s.evaluate_batch(p, torch.arange(8), dataset="test") for p in PARTIES}
    t.bad = True
    got = trainer.evaluate("test")
    kept = [want[p] for p in PARTIES if p != BAD]
    count = sum(m.count for m in kept)
    assert got["accuracy"] == sum(m.correct for m in kept) / count
    assert got["loss"] == pytest.approx(sum(m.loss * m.count for m in kept) / count, rel=1e-6)
    [event] = trainer.report.extra["unreachable"]
    assert {k: event[k] for k in ("party", "epoch", "batch", "reason")} == {
        "party": BAD, "epoch": -1, "batch": -1, "reason": "refused"}
    assert f"{BAD}'s answer to 'loss_step' has a bad field 'correct'" in event["error"]
    t.host_refuses = True
    with pytest.raises(ValidationError, match="c: bad request") as caught:
        trainer.evaluate("test")
    assert caught.value.party is None
    assert len(trainer.report.extra["unreachable"]) == 1  # not skipped: not an answer refused


def test_a_resume_after_a_refused_step_ends_like_the_reference(tmp_path: Path) -> None:
    """The model owner's process dies right after the refused step's discard was applied at
    BAD (before its checkpoint): a new process resumes from the checkpoint before that step,
    is refused the same answer again (BAD answers from its record), has the discard answered
    from the record, and the run ends with the reference's weights and one refusal."""
    want, want_steps = _reference("vanilla")
    dep, t, s = _setup("vanilla", "forward", step=K + 1, crash_at_discard=1)
    with pytest.raises(Crash):
        _trainer(s, "vanilla").fit(2, verbose=False, checkpoint_dir=tmp_path)
    torch.manual_seed(1234)  # a new process: other initial weights and RNG, no segments
    s = SplitSession(_plan("vanilla", seed=99), t, optimizer=OptimizerSpec("adam", lr=1e-2))
    report = _trainer(s, "vanilla").fit(2, verbose=False, checkpoint_dir=tmp_path, resume=True)
    assert t.hits == 2 and t.discards == 2 and report.extra["resumed"] == 1
    _check_refusal(report, "vanilla", "forward")
    assert report.steps == want_steps
    got = _weights(s, dep)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), "weights differ after resume"
    _nothing_pending(s)
