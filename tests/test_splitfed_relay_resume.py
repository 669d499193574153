"""SplitFed with uneven datasets: a data owner without a batch in a round is relayed the round's
average, sealed by a member, after the step trained. The model owner dies around those relays
(after a recipient applied one, between the relays to two recipients, before an ``unseal``
leaves) and a new process resumes from its checkpoint: it runs the step again (answered from
the data owners' records), does not average again, sends every journaled ``unseal`` request
as it was and seals only the others; the run ends with the uninterrupted run's weights.
(Before, the new process sealed again and sent other bytes under a step id the recipient had
applied: ``ProtocolError``, the run could not go on.)"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from syft_split import (
    DataOwnerHost,
    InProcessTransport,
    OptimizerSpec,
    SplitPlan,
    SplitSession,
    Trainer,
    split_model,
)
from syft_split.models import digits_cnn

from .conftest import ChaosTransport, Crash

#: three rounds: a, b, c; a, b (c is relayed the average); a (b and c are relayed a's weights)
SIZES = {"a": 40, "b": 24, "c": 16}


def _datasets() -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(104, 1, 8, 8, generator=g), torch.randint(0, 10, (104,), generator=g)
    out, at = {}, 0
    for party, n in SIZES.items():
        out[party] = {"train": (x[at:at + n], y[at:at + n]),
                      "test": (x[at + n:at + n + 8], y[at + n:at + n + 8])}
        at += n + 8
    return out


DATA = _datasets()


def _host(name: str, state_dir: Path | None) -> DataOwnerHost:
    host = DataOwnerHost(name, state_dir=None if state_dir is None else state_dir / name)
    for ds, (x, y) in DATA[name].items():
        host.add_dataset(ds, x, y)
    host.restore_state()
    return host


def _session(transport: InProcessTransport, seed: int = 1) -> SplitSession:
    torch.manual_seed(seed)
    plan = SplitPlan.vanilla(split_model(digits_cnn(channels=4, hidden=16), ["pool1"]),
                             list(SIZES), share_weights="peer")
    return SplitSession(plan, transport, optimizer=OptimizerSpec("adam", lr=1e-2))


def _start(t: ChaosTransport) -> SplitSession:
    return approved_peers(_session(t), t)


def approved_peers(session: SplitSession, t: ChaosTransport) -> SplitSession:
    """``session`` proposed, every segment approved, every data owner a trusted peer of
    every other (what secure aggregation needs)."""
    for party, ids in session.propose().items():
        for pid in ids:
            t.host(party).approve(pid)
    for p in session.plan.sources:
        for q in session.plan.sources:
            if p != q:
                t.host(p).trust_peer(q, t.host(q).public_key())
    return session


def _trainer(session: SplitSession, schedule: str) -> Trainer:
    labels = {p: {ds: y for ds, (_x, y) in DATA[p].items()} for p in SIZES}
    return Trainer(session, batch_size=16, labels=labels, seed=0, progress=False,
                   measure_leakage=False, schedule=schedule)


def weights(session: SplitSession, t: ChaosTransport) -> list[torch.Tensor]:
    """Every weight of the run: the model owner's, then each data owner's segment."""
    session.flush()
    out = [v for m in session.local.values() for v in m.state_dict().values()]
    for (party, _i), seg in sorted(session.remote.items()):
        out.extend(t.host(party).export_weights(seg.segment_id).values())
    return out


@functools.cache
def _reference(schedule: str) -> tuple[list[torch.Tensor], dict[str, int]]:
    """The uninterrupted run (two epochs): its weights and its seal, unseal and aggregate
    calls."""
    t = ChaosTransport(lambda p: _host(p, None), list(SIZES), {})
    session = _start(t)
    t.per_op.clear()
    _trainer(session, schedule).fit(2, verbose=False)
    ops = ("seal", "unseal", "secagg_aggregate")
    return weights(session, t), {op: t.per_op[op] for op in ops}


#: crashes (per op; requests sent again count too), and how many more seals and unseals than
#: the uninterrupted run they cost. Epoch 1 relays: seal 1 / unseal 1 to c (round 2), then
#: seal 2 / unseal 2 to b and seal 3 / unseal 3 to c (round 3).
CRASHES = {
    # c applied the relayed average, then the model owner died: sent again, once
    "after_applied": ({("unseal", 1): "model_owner"}, 0, 1),
    # b applied its relay, c's was sealed but not sent: b's sent again, c sealed again (unseal
    # 4); c applied it and the model owner died again: both sent again (unseals 5, 6)
    "between_recipients": ({("seal", 3): "model_owner", ("unseal", 4): "model_owner"}, 1, 3),
    # journaled, then the model owner died before it left: sent (applied) by the new process
    "before_sent": ({("unseal", 2): "model_owner_before"}, 0, 1),
    # a and b loaded round 2's average (aggregates 4 and 5), then the model owner died before
    # journaling the relay to c: the new process does not average again (their round status
    # says they loaded it after the checkpoint) and relays the average once
    "loaded_before_journal": ({("secagg_aggregate", 5): "model_owner"}, 0, 0),
}


@pytest.mark.parametrize("schedule", ["splitfed_v1", "splitfed_v2"])
@pytest.mark.parametrize("case", sorted(CRASHES))
def test_a_resume_around_the_relayed_average_ends_as_an_uninterrupted_run(
        tmp_path: Path, schedule: str, case: str) -> None:
    crashes, more_seals, more_unseals = CRASHES[case]
    want, ops = _reference(schedule)
    t = ChaosTransport(lambda p: _host(p, tmp_path / "owners"), list(SIZES), dict(crashes))
    session = _start(t)
    t.per_op.clear()
    crashed = 0
    while True:
        try:
            _trainer(session, schedule).fit(2, verbose=False,
                                            checkpoint_dir=tmp_path / "mo", resume=True)
            break
        except Crash:  # a new process: new session, other initial weights, no segments
            crashed += 1
            session = _session(t, seed=99)
    assert crashed == len(crashes) and not t.crashes  # every crash happened
    got = weights(session, t)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), \
        "weights differ from the uninterrupted run"
    # the average is not computed again; a journaled relay is not sealed again
    assert t.per_op["secagg_aggregate"] == ops["secagg_aggregate"]
    assert t.per_op["seal"] == ops["seal"] + more_seals
    assert t.per_op["unseal"] == ops["unseal"] + more_unseals
    for (party, _i), seg in session.remote.items():  # no step applied twice, none lost
        info = t.call(party, "status", segment=seg.segment_id)
        assert info["last_step"] == seg.next_step - 1 and not info["pending"]
