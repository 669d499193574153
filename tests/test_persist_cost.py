"""What a data owner writes to its state directory for a model owner's call: what the call
changed, nothing else. A call refused before its op ran, a refused step and a no-op write
nothing (each rewrote host.sspl or the segment's whole file, at any caller's will); a rate
window that changed alone is saved at most once a second; host.sspl no longer keeps an
approved segment's initial weights (its own file holds its weights); and a restart still
gives back every segment bit for bit, from files of the previous version too."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from syft_split import DataOwnerHost, persist, wire
from syft_split.errors import EgressError
from syft_split.host import HostLimits
from syft_split.host import guard as guard_module
from syft_split.spec import module_to_spec, spec_state

from .test_durability_quotas import D, N, _host

MO = "mo@x"


def _propose(module: nn.Module) -> dict[str, Any]:
    return {"op": "propose", "role": "input", "datasets": ["train"],
            "spec": module_to_spec(module), "optimizer": {"name": "adam", "lr": 0.01},
            **{f"state/{k}": v for k, v in spec_state(module).items()}}


def _call(host: DataOwnerHost, user: str, req: dict[str, Any]) -> dict[str, Any]:
    return dict(wire.decode(host.handle(user, wire.encode(req))))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 4), nn.BatchNorm1d(4))


def _approved(host: DataOwnerHost) -> str:
    pid = str(_call(host, MO, _propose(_model()))["segment"])
    host.approve(pid)
    return pid


def _step(host: DataOwnerHost, pid: str, first: int) -> None:
    """One training step with step ids ``first`` and ``first + 1``."""
    idx = torch.arange(8) + first % 4 * 8
    act = _call(host, MO, {"op": "forward", "segment": pid, "indices": idx, "step": first})
    assert "activation" in act, act
    grad = torch.ones_like(act["activation"]) * 0.1
    out = _call(host, MO, {"op": "backward", "segment": pid, "grad": grad, "step": first + 1})
    assert "error" not in out, out


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of every state file written (host.sspl, segments' files), in order."""
    real = persist.save
    seen: list[str] = []

    def save(path: str | Path, tree: Any) -> int:
        seen.append(Path(path).name)
        return real(path, tree)

    monkeypatch.setattr(persist, "save", save)
    return seen


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Wall-clock time as the test sets it (``clock[0]``): rate windows and their saves."""
    now = [time.time()]
    monkeypatch.setattr(time, "time", lambda: now[0])
    yield now


def test_a_call_refused_before_its_op_ran_writes_nothing(tmp_path: Path,
                                                         writes: list[str]) -> None:
    """Any datasite user could make the host rewrite host.sspl (every pending proposal's
    weights: 2.4 s for 229 MiB) with a 66-byte request naming no segment."""
    limits = HostLimits(max_pending=1)
    host = _host(tmp_path, limits)
    pid = _approved(host)
    assert _call(host, MO, _propose(_model()))["segment"]  # pending: MO is at max_pending
    del writes[:]
    refused = [
        ("stranger", {"op": "backward", "segment": "nope", "grad": torch.ones(1, 4)}),
        ("stranger", {"op": "forward", "segment": "nope", "indices": torch.arange(2)}),
        ("stranger", {"op": "discard", "segment": "nope"}),
        ("stranger", {"op": "discard", "segment": pid}),  # not its driver
        ("stranger", {"op": "psi_finish", "dataset": "train"}),  # not allowed to align
        (MO, _propose(_model())),  # over max_pending: refused before anything is counted
        (MO, {"op": "backward", "segment": pid, "grad": torch.ones(8, 4), "step": 5}),  # lost
        (MO, {"op": "nope"}),
    ]
    for user, req in refused:
        assert "error" in _call(host, user, req), req
    assert writes == []
    assert _call(host, MO, {"op": "status", "segment": pid})["steps"] == 0


def test_a_refused_or_no_op_step_writes_nothing_and_a_step_is_still_saved(
        tmp_path: Path, writes: list[str]) -> None:
    """A refused step of an approved segment, and a discard with nothing pending, each wrote
    the segment's whole file (1-2 s for a 115 MiB segment)."""
    host = _host(tmp_path)
    pid = _approved(host)
    assert host.store is not None
    seg = host.store.segment_path(pid).name
    _step(host, pid, 1)
    assert writes.count(seg) >= 2  # a forward and a backward: each saved
    del writes[:]
    for req in ({"op": "backward", "segment": pid, "grad": torch.ones(8, 4)},  # none pending
                {"op": "backward", "segment": pid, "grad": torch.ones(8, 4), "step": 1},
                {"op": "forward", "segment": pid, "indices": torch.tensor([N])},
                {"op": "forward", "segment": pid, "indices": torch.arange(2), "grad": 1.0}):
        assert "error" in _call(host, MO, req), req
    assert _call(host, MO, {"op": "discard", "segment": pid}) == {"discarded": False}
    assert writes == []
    # a discard that dropped something, or that carries a step id (its record), is saved
    _call(host, MO, {"op": "forward", "segment": pid, "indices": torch.arange(8), "step": 3})
    del writes[:]
    assert _call(host, MO, {"op": "discard", "segment": pid}) == {"discarded": True}
    assert writes == [seg]
    assert _call(host, MO, {"op": "discard", "segment": pid, "step": 4}) == {"discarded": False}
    assert writes == [seg, seg]
    assert _host(tmp_path).runtimes[pid].last_step == 4


def test_a_refused_step_saves_what_it_changed_all_the_same(
        tmp_path: Path, writes: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal after the op changed the segment is saved (BatchNorm's statistics updated by
    a forward whose answer was refused; a fused step applied before a halt); one whose undo
    put everything back is not. A restart gives back what memory held, bit for bit."""
    host = _host(tmp_path)
    pid = _approved(host)
    assert host.store is not None
    seg = host.store.segment_path(pid).name
    _step(host, pid, 1)
    act = _call(host, MO, {"op": "forward", "segment": pid, "indices": torch.arange(8),
                           "step": 3})["activation"]
    real = host.guard.release

    def refuse(rules: Any, call: Any, response: dict[str, Any]) -> dict[str, Any]:
        if call.op in ("forward", "backward"):
            raise EgressError("refused by the test")
        return real(rules, call, response)

    monkeypatch.setattr(host.guard, "release", refuse)
    del writes[:]
    # a backward whose answer is refused: its step is undone, nothing to save
    out = _call(host, MO, {"op": "backward", "segment": pid, "grad": torch.ones_like(act)})
    assert out["error"] == "EgressError"
    assert host.runtimes[pid].steps == 1 and writes == []
    _call(host, MO, {"op": "discard", "segment": pid})
    del writes[:]
    # a forward whose answer is refused: nothing pending, but BatchNorm counted its batch
    out = _call(host, MO, {"op": "forward", "segment": pid, "indices": torch.arange(8)})
    assert out["error"] == "EgressError" and writes == [seg]
    monkeypatch.setattr(host.guard, "release", real)
    _call(host, MO, {"op": "forward", "segment": pid, "indices": torch.arange(8), "step": 4})

    def halted(rt: Any, grad: Any) -> None:  # as the leakage watch halts after a step
        host.halt(rt.id, "halted by the test", by="watch")

    monkeypatch.setattr(host, "stepped", halted)
    del writes[:]
    out = _call(host, MO, {"op": "forward", "segment": pid, "indices": torch.arange(8),
                           "grad": torch.ones_like(act)})
    assert out["error"] == "LeakageHaltError" and host.runtimes[pid].steps == 2
    assert seg in writes  # the step the halt kept, with the halt
    want = host.export_weights(pid)
    back = _host(tmp_path)
    assert back.proposal(pid).status == "halted" and back.runtimes[pid].steps == 2
    got = back.export_weights(pid)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_evaluations_save_the_records_window_at_most_once_a_second(
        tmp_path: Path, writes: list[str], clock: list[float]) -> None:
    """With ``max_records_per_minute`` set, every evaluation forward rewrote the segment's
    whole file to save the window (2.37 s instead of 0.013 s per 1-record call). A crash
    loses at most the last second's entries: after the last save the window is whole."""
    limits = HostLimits(max_records_per_minute=1000)
    host = _host(tmp_path, limits)
    pid = _approved(host)
    assert host.store is not None
    seg = host.store.segment_path(pid).name
    evaluate = {"op": "forward", "segment": pid, "train": False}
    del writes[:]
    for i in range(10):
        assert "activation" in _call(host, MO, {**evaluate, "indices": torch.tensor([i])})
    assert writes == [seg]  # the first one, then none within the second
    clock[0] += guard_module.WINDOW_SAVE_S / 2
    assert "activation" in _call(host, MO, {**evaluate, "indices": torch.arange(2)})
    assert writes == [seg]
    clock[0] += guard_module.WINDOW_SAVE_S / 2
    assert "activation" in _call(host, MO, {**evaluate, "indices": torch.arange(3)})
    assert writes == [seg, seg]
    back = _host(tmp_path, limits)  # a crash right after: the window holds all 15 records
    assert back.guard.window(pid) is not None
    assert sum(n for _, n in back.guard.window(pid) or []) == 15


def test_refused_proposals_save_their_rate_window_at_most_once_a_second(
        tmp_path: Path, writes: list[str], clock: list[float]) -> None:
    """A proposal refused after it was counted against the per-user rate saves host.sspl
    (the window) at most once a second; one refused by the rate cap itself, never."""
    limits = HostLimits(max_proposals_per_minute=4)
    host = _host(tmp_path, limits)
    bad = {**_propose(_model()), "role": "nope"}
    for _ in range(3):
        assert _call(host, MO, bad)["error"] == "ConfigError"
    assert writes == ["host.sspl"]
    clock[0] += guard_module.WINDOW_SAVE_S
    assert _call(host, MO, bad)["error"] == "ConfigError"
    assert writes == ["host.sspl", "host.sspl"]
    clock[0] += guard_module.WINDOW_SAVE_S
    assert _call(host, MO, bad)["error"] == "ValidationError"  # 4 in the minute: the cap
    assert writes == ["host.sspl", "host.sspl"]
    back = _host(tmp_path, limits)  # the cap holds across a crash
    assert _call(back, MO, _propose(_model()))["error"] == "ValidationError"


def _weights(host: DataOwnerHost, pid: str) -> dict[str, torch.Tensor]:
    return host.export_weights(pid)


def test_host_sspl_keeps_no_approved_or_halted_initial_weights(tmp_path: Path) -> None:
    """host.sspl kept every approved and halted segment's initial weights (38 MiB for a
    10M-parameter segment), rewritten whole at every save; the segment's own file holds its
    weights. A pending proposal keeps its own (its approval needs them)."""
    big = nn.Sequential(nn.Linear(D, 4096))
    big_bytes = 4 * (D * 4096 + 4096)
    host = _host(tmp_path)
    pids = [str(_call(host, MO, _propose(big))["segment"]) for _ in range(3)]
    assert (tmp_path / "host.sspl").stat().st_size > 3 * big_bytes
    host.approve(pids[0])
    host.approve(pids[1])
    _step(host, pids[0], 1)
    host.halt(pids[1], "halted by the data owner")
    assert big_bytes < (tmp_path / "host.sspl").stat().st_size < 2 * big_bytes
    want = {pid: _weights(host, pid) for pid in pids[:2]}

    back = _host(tmp_path)  # a crash: weights from the segments' files, bit for bit
    assert back.proposal(pids[0]).status == "approved"
    assert back.proposal(pids[1]).status == "halted"
    for pid, w in want.items():
        got = _weights(back, pid)
        assert w.keys() == got.keys() and all(torch.equal(w[k], got[k]) for k in w)
    assert set(back.proposal(pids[2]).state) == {"0.weight", "0.bias"}
    back.approve(pids[2])  # the pending one is approved from the weights host.sspl kept
    assert all(torch.equal(v, spec_state(big)[k]) for k, v in _weights(back, pids[2]).items())
    _step(back, pids[0], 3)  # and the restored one trains on
    assert back.runtimes[pids[0]].steps == 2


def test_a_state_directory_of_the_previous_version_restores_and_drops_them(
        tmp_path: Path) -> None:
    """host.sspl as the previous version wrote it (an approved segment's initial weights in
    it) restores bit for bit; the next save drops the weights."""
    host = _host(tmp_path)
    pid = _approved(host)
    _step(host, pid, 1)
    want = _weights(host, pid)
    tree = persist.load(tmp_path / "host.sspl")
    (entry,) = tree["proposals"]
    assert entry["state"] == {} and entry["saves"] > 0
    entry["state"] = spec_state(_model())  # what the previous version kept
    persist.save(tmp_path / "host.sspl", tree)
    old_size = (tmp_path / "host.sspl").stat().st_size

    back = _host(tmp_path)
    got = _weights(back, pid)
    assert all(torch.equal(want[k], got[k]) for k in want)
    _step(back, pid, 3)
    assert back.runtimes[pid].steps == 2
    back.close()
    assert (tmp_path / "host.sspl").stat().st_size < old_size
    assert persist.load(tmp_path / "host.sspl")["proposals"][0]["state"] == {}
    again = _host(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(_weights(again, pid).values(),
                                                 _weights(back, pid).values(), strict=True))
