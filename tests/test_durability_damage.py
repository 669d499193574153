"""One damaged item in a data owner's state directory costs that item only: a segment whose
file is damaged (bytes changed, truncated, a valid file that does not fit the segment) or whose
families' part cannot be rebuilt is halted with the reason, its file kept for inspection, and
every other segment is restored and trains on exactly as if nothing had happened; a damaged
aligned dataset is dropped alone; host.sspl (the index) stops the restore, by name."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from syft_split import (
    DataOwnerHost,
    InProcessTransport,
    OptimizerSpec,
    SplitPlan,
    SplitSession,
    persist,
    split_model,
)
from syft_split.errors import ApprovalError, WireError

from .test_durability import DATA, _host, _one, _people, _weights

Y = DATA["a"]["train"][1]


def _train(session: SplitSession, steps: int, start: int = 0) -> None:
    """``steps`` training steps of 8 records each (batches go round the 40 records)."""
    for i in range(start, start + steps):
        idx = torch.arange(8) + 8 * (i % 5)
        session.zero_grad()
        loss, _m = session.loss("a", idx, Y[idx])
        loss.backward()
        session.step()
    session.flush()


def _two(state_dir: Path | None) -> tuple[InProcessTransport, list[SplitSession], list[str]]:
    """Host "a" with two approved segments (two model owners' sessions), three steps each."""
    host = _host("a", state_dir)
    t = InProcessTransport([host])
    sessions = [SplitSession(_one(seed), t, optimizer=OptimizerSpec("adam", lr=1e-2))
                for seed in (1, 2)]
    pids = [s.propose()["a"][0] for s in sessions]
    for pid in pids:
        host.approve(pid)
    for s in sessions:
        _train(s, 3)
    return t, sessions, pids


def _edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """A valid state file (checksum and all) whose tree ``change`` edited."""
    tree = persist.load(path)
    change(tree)
    persist.save(path, tree)


def _damage(path: Path, how: str) -> str:
    """Damage a segment's file ``how``; the error class its halt reason names."""
    if how == "flipped":
        data = bytearray(path.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 4):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
        return "WireError"
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
        return "WireError"
    if how == "wrong_shapes":  # one weight of another shape: the others did load, before
        def grow(tree: dict[str, Any]) -> None:
            name = next(iter(tree["weights"]))
            tree["weights"][name] = torch.zeros(*(n + 1 for n in tree["weights"][name].shape))
        _edit(path, grow)
        return "size mismatch"
    if how == "optimizer_shapes":  # torch loads it; the next step would fail
        def shrink(tree: dict[str, Any]) -> None:
            tree["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
        _edit(path, shrink)
        return "ShapeError"
    assert how == "missing_field"
    _edit(path, lambda tree: tree.pop("steps"))
    return "KeyError"


def _restart(t: InProcessTransport, state_dir: Path) -> DataOwnerHost:
    back = _host("a", state_dir)
    t.add_host(back, replace=True)
    return back


def _aside(path: Path, n: int = 1) -> Path:
    return path.with_name(f"{path.name}.damaged-{n}")


@pytest.mark.parametrize("how", ["flipped", "truncated", "wrong_shapes", "optimizer_shapes",
                                 "missing_field"])
def test_a_damaged_segment_file_halts_that_segment_only(tmp_path: Path, how: str) -> None:
    ref_t, ref, _ = _two(None)  # the uninterrupted run
    _train(ref[0], 3, start=3)
    want = _weights(ref[0], ref_t._hosts.__getitem__)

    t, sessions, (good, bad) = _two(tmp_path)
    host = t._hosts["a"]
    assert host.store is not None
    path = host.store.segment_path(bad)
    host.close()
    error = _damage(path, how)
    damaged = path.read_bytes()

    back = _restart(t, tmp_path)
    p = back.proposals_by_id[bad]
    assert p.status == "halted", p
    assert f"state file {path} could not be restored" in p.reason and error in p.reason
    assert f"is kept as {_aside(path).name}" in p.reason
    halts = [e for e in back.audit if e.op == "halt" and e.segment == bad]
    assert len(halts) == 1 and str(path) in halts[0].outcome and error in halts[0].outcome
    assert _aside(path).read_bytes() == damaged  # kept for inspection
    # the halted segment holds no weights (zeros: host.sspl keeps no initial weights once a
    # segment has its own file), not a half-loaded mix, and runs nothing
    assert p.state == {}
    assert all(not v.any() for v in back.export_weights(bad).values())
    with pytest.raises(ApprovalError, match="halted"):
        _train(sessions[1], 1, start=3)

    assert back.proposals_by_id[good].status == "approved"
    _train(sessions[0], 3, start=3)
    got = _weights(sessions[0], t._hosts.__getitem__)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), "weights differ"

    back.close()  # the next save writes the halted segment a new file; the damaged one stays
    again = _host("a", tmp_path)
    assert again.proposals_by_id[bad].status == "halted"
    assert again.proposals_by_id[bad].reason == p.reason
    assert again.proposals_by_id[good].status == "approved"
    assert _aside(path).read_bytes() == damaged and not _aside(path, 2).exists()


def test_a_familys_damaged_part_halts_its_segment_and_keeps_a_copy(tmp_path: Path) -> None:
    """What a family keeps with a segment's steps (here the records-per-minute window) that
    cannot be put back halts that segment: the restore aborted with a bare ValueError."""
    t, sessions, (good, bad) = _two(tmp_path)
    host = t._hosts["a"]
    assert host.store is not None
    path = host.store.segment_path(bad)
    weights = host.export_weights(bad)
    host.close()
    _edit(path, lambda tree: tree["families"].update(proposals={"released": [["x", 1]]}))
    damaged = path.read_bytes()

    back = _restart(t, tmp_path)
    p = back.proposals_by_id[bad]
    assert p.status == "halted"
    assert f"what the 'proposals' family keeps in this segment's state file {path} could " \
           "not be restored (ValueError" in p.reason
    assert _aside(path).read_bytes() == damaged and path.exists()  # a copy: the file loaded
    assert all(torch.equal(v, weights[k]) for k, v in back.export_weights(bad).items())
    assert back.proposals_by_id[good].status == "approved"
    _train(sessions[0], 2, start=3)
    entries = len(back.audit)
    for _ in range(3):  # restarts without a clean close (crashes): no new copy, no new halt
        back = _restart(t, tmp_path)
    assert back.proposals_by_id[bad].reason == p.reason and not _aside(path, 2).exists()
    assert len([e for e in back.audit if e.segment == bad and "could not be restored" in
                str(e.outcome)]) == 1 and len(back.audit) >= entries


def test_a_damaged_encryption_state_halts_its_segment_only(tmp_path: Path) -> None:
    """An encrypted segment's saved HE state that is not a mapping (the restore aborted with a
    TypeError) halts that segment; the plain one is restored."""
    t, sessions, (good, bad) = _two(tmp_path)
    host = t._hosts["a"]
    assert host.store is not None
    host.proposal(bad).he = {"level": "B"}  # as if approved with encryption (no keys here)
    host.close()
    _edit(host.store.segment_path(bad), lambda tree: tree.update(he=5))

    back = _restart(t, tmp_path)
    p = back.proposals_by_id[bad]
    assert p.status == "halted" and "encryption state is not readable (a int)" in p.reason
    assert back.proposals_by_id[good].status == "approved"
    _train(sessions[0], 2, start=3)


def test_a_damaged_aligned_dataset_is_dropped_alone(tmp_path: Path) -> None:
    """One aligned dataset whose saved rows cannot be read is not restored (audited) and the
    segment approved on it halts; the other aligned dataset comes back (the restore aborted
    with an AttributeError)."""
    from syft_split.alignment import align_records

    start = _people(tmp_path)
    host = start()
    host.allow_alignment("people", "model-owner@example.org")
    t = InProcessTransport([host])
    align_records(t, ["a"], "people", ["p9", "p2", "p5"], as_name="one")
    align_records(t, ["a"], "people", ["p1", "p3"], as_name="two")
    torch.manual_seed(0)
    plan = SplitPlan.vanilla(split_model(nn.Sequential(nn.Linear(3, 4), nn.ReLU(),
                                                       nn.Linear(4, 2)), "1"), "a",
                             datasets=["one"])
    (pid,) = SplitSession(plan, t).propose()["a"]
    host.approve(pid)
    host.close()
    _edit(tmp_path / "a" / "host.sspl",
          lambda tree: tree["families"]["alignment"]["aligned"]["one"].update(rows="garbage"))

    back = start()
    assert "one" not in back.datasets
    assert back.datasets["two"].ids == ["p1", "p3"]
    p = back.proposals_by_id[pid]
    assert p.status == "halted" and "aligned dataset 'one' was not restored" in p.reason
    assert "saved record cannot be read" in p.reason
    assert any(e.op == "restore" and "'one'" in e.outcome for e in back.audit)


@pytest.mark.parametrize("part", ["proposal", "family"])
def test_a_damaged_index_stops_the_restore_by_name(tmp_path: Path, part: str) -> None:
    """host.sspl is the index: a proposal or a family's state in it that cannot be read stops
    the restore with an error naming the file and the part (a bare KeyError/AttributeError)."""
    _t, _s, (first, _second) = _two(tmp_path)
    _t._hosts["a"].close()
    index = tmp_path / "a" / "host.sspl"

    def change(tree: dict[str, Any]) -> None:
        if part == "proposal":
            del tree["proposals"][0]["optimizer"]
        else:
            tree["families"]["weights"]["peers"] = 5

    _edit(index, change)
    what = f"proposal 0 ('{first}')" if part == "proposal" else "the 'weights' family's state"
    with pytest.raises(WireError, match=re.escape(f"state file {index}: {what} cannot be "
                                                  "restored")):
        _host("a", tmp_path)


def test_without_hard_links_the_damaged_file_is_copied_aside(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system without hard links: the damaged file is copied aside (0600), and a file
    already set aside by an earlier restart is never overwritten."""
    t, _sessions, (_good, bad) = _two(tmp_path)
    host = t._hosts["a"]
    assert host.store is not None
    path = host.store.segment_path(bad)
    host.close()
    _aside(path).write_bytes(b"an earlier one")
    _damage(path, "truncated")
    damaged = path.read_bytes()

    def no_links(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    back = _restart(t, tmp_path)
    assert f"kept as {_aside(path, 2).name}" in back.proposals_by_id[bad].reason
    assert _aside(path).read_bytes() == b"an earlier one"
    assert _aside(path, 2).read_bytes() == damaged
    assert stat.S_IMODE(_aside(path, 2).stat().st_mode) == 0o600


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"),
                                   MemoryError("Input/output error")])
def test_a_segment_file_that_cannot_be_read_stops_the_restore(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """An I/O error is the disk's, not the file's, and a machine short of memory is not the
    file's either: the restore stops (the data owner fixes it and restarts) instead of halting
    the segment for good (a MemoryError did); nothing is set aside."""
    t, _sessions, (_good, bad) = _two(tmp_path)
    host = t._hosts["a"]
    assert host.store is not None
    path = host.store.segment_path(bad)
    host.close()
    load = persist.load

    def failing(p: Path) -> Any:
        if Path(p) == path:
            raise error
        return load(p)

    monkeypatch.setattr(persist, "load", failing)
    with pytest.raises(type(error), match="Input/output error"):
        _host("a", tmp_path)
    monkeypatch.undo()
    assert not _aside(path).exists()
    assert _host("a", tmp_path).proposals_by_id[bad].status == "approved"
