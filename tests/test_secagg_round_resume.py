"""The model owner dies after every member of a SplitFed round loaded its secure average and
before the step's checkpoint is written. The new process runs that step again from the
checkpoint (the data owners answer it from their records) and must not average again: every
member holds the average, and a second average of identical weights is not exact in fixed
point (2^-32: on this model's ~13,000 weights it changes some by 2^-32 to 2^-31, and the run
ends elsewhere). The data owners' round status (the last round each loaded, persisted with
their state) and the round the checkpoint holds tell the new process which rounds were loaded
after it: those are not run again. A round that only some members loaded is finished under
its own number, as before."""

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
from .test_splitfed_relay_resume import approved_peers, weights

#: batch 16: round 1 averages with weights 16/16/16, round 2 with 16/16/8 (each epoch)
SIZES = {"a": 32, "b": 32, "c": 24}


def _datasets() -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(112, 1, 8, 8, generator=g), torch.randint(0, 10, (112,), generator=g)
    out, at = {}, 0
    for party, n in SIZES.items():
        out[party] = {"train": (x[at:at + n], y[at:at + n])}
        at += n
    return out


DATA = _datasets()


def _host(name: str, state_dir: Path | None) -> DataOwnerHost:
    host = DataOwnerHost(name, state_dir=None if state_dir is None else state_dir / name)
    for ds, (x, y) in DATA[name].items():
        host.add_dataset(ds, x, y)
    host.restore_state()
    return host


def _session(transport: InProcessTransport, kind: str, seed: int = 1) -> SplitSession:
    torch.manual_seed(seed)
    model = digits_cnn(channels=16, hidden=64)
    if kind == "u_shaped":  # two shared nodes per data owner: input and loss segments
        plan = SplitPlan.u_shaped(split_model(model, ["pool2", "relu3"]), list(SIZES),
                                  share_weights="peer", datasets=["train"])
    else:  # the data owners' input segment holds conv1, conv2 and fc1 (~13,000 weights)
        plan = SplitPlan.vanilla(split_model(model, ["relu3"]), list(SIZES),
                                 share_weights="peer", datasets=["train"])
    return SplitSession(plan, transport, optimizer=OptimizerSpec("adam", lr=1e-2))


def _start(t: ChaosTransport, kind: str) -> SplitSession:
    return approved_peers(_session(t, kind), t)


def _trainer(session: SplitSession, schedule: str) -> Trainer:
    labels = {p: {ds: y for ds, (_x, y) in DATA[p].items()} for p in SIZES}
    return Trainer(session, batch_size=16, labels=labels, seed=0, progress=False,
                   measure_leakage=False, schedule=schedule, test_dataset=None)


@functools.cache
def _reference(schedule: str, kind: str) -> tuple[list[torch.Tensor], int]:
    """The uninterrupted run (two epochs): its weights and its aggregate calls."""
    t = ChaosTransport(lambda p: _host(p, None), list(SIZES), {})
    session = _start(t, kind)
    t.per_op.clear()
    _trainer(session, schedule).fit(2, verbose=False)
    return weights(session, t), t.per_op["secagg_aggregate"]


#: (plan, the model owner's crash: right after this aggregate call was applied, how many more
#: aggregate calls than the uninterrupted run the resumed run makes). Vanilla: one shared node,
#: three aggregate calls a round; U-shaped: two (input and loss segments), six a round.
CRASHES = {
    # every member loaded round 1 (weights 16/16/16): not averaged again
    "all_loaded_first_round": ("vanilla", 3, 0),
    # every member loaded round 2 (weights 16/16/8): not averaged again
    "all_loaded_16_16_8": ("vanilla", 6, 0),
    # a and b loaded round 2, c did not: that round is finished (a and b answer their
    # aggregate calls, sent again, from their records)
    "some_loaded": ("vanilla", 5, 2),
    # every member loaded the input segment's average, none the loss segment's: only the
    # loss segment is averaged by the new process
    "first_node_loaded": ("u_shaped", 3, 0),
    # every member loaded both nodes' averages
    "all_nodes_loaded": ("u_shaped", 6, 0),
}


@pytest.mark.parametrize("schedule", ["splitfed_v1", "splitfed_v2"])
@pytest.mark.parametrize("case", sorted(CRASHES))
def test_a_round_every_member_loaded_is_not_averaged_again(tmp_path: Path, schedule: str,
                                                           case: str) -> None:
    kind, at, more = CRASHES[case]
    want, aggregates = _reference(schedule, kind)
    t = ChaosTransport(lambda p: _host(p, tmp_path / "owners"), list(SIZES),
                       {("secagg_aggregate", at): "model_owner"})
    session = _start(t, kind)
    t.per_op.clear()
    crashed = 0
    while True:
        try:
            report = _trainer(session, schedule).fit(2, verbose=False,
                                                     checkpoint_dir=tmp_path / "mo",
                                                     resume=True)
            break
        except Crash:  # a new process: new session, other initial weights, no segments
            crashed += 1
            session = _session(t, kind, seed=99)
    assert crashed == 1 and not t.crashes and report.extra["resumed"] == 1
    got = weights(session, t)
    differ = sum(int((a != b).sum()) for a, b in zip(got, want, strict=True))
    assert differ == 0, f"{differ} weights differ from the uninterrupted run"
    assert t.per_op["secagg_aggregate"] == aggregates + more  # loaded rounds: not run again
    for (party, _i), seg in session.remote.items():  # no step applied twice, none lost
        info = t.call(party, "status", segment=seg.segment_id)
        assert info["last_step"] == seg.next_step - 1 and not info["pending"]
