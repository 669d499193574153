"""The data owner's leakage watch and its halts across restarts (in process): a halt made
during a step survives a crash, a fused step that halts the segment releases nothing, and the
watch goes on after a restart (or its segment stays halted)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from syft_split import (
    DataOwnerHost,
    HostLimits,
    InProcessTransport,
    OptimizerSpec,
    SplitSession,
    persist,
)
from syft_split.errors import LeakageHaltError

from .test_durability import DATA, _one


def _watched_host(state_dir: Path) -> Callable[[], DataOwnerHost]:
    """Data owner "a" as it (re)starts, its leakage watch measuring every 2 steps."""
    def start() -> DataOwnerHost:
        host = DataOwnerHost("a", state_dir=state_dir, limits=HostLimits(watch_every=2))
        for ds, (x, y) in DATA["a"].items():
            host.add_dataset(ds, x, y)
        host.restore_state()
        return host
    return start


def _watched_session(host: DataOwnerHost, t: InProcessTransport, bound: dict[str, float],
                     fuse: bool = False) -> tuple[SplitSession, str]:
    session = SplitSession(_one(), t, optimizer=OptimizerSpec("sgd", lr=0.1), fuse=fuse)
    (pid,) = session.propose()["a"]
    host.approve(pid, leakage_bound=bound)
    return session, pid


def _train_step(session: SplitSession, i: int) -> None:
    idx = torch.arange(8 * i, 8 * i + 8)
    session.zero_grad()
    loss, _m = session.loss("a", idx, DATA["a"]["train"][1][idx])
    loss.backward()
    session.step()


def _figures(watch: dict[str, Any]) -> list[dict[str, Any]]:
    """The watch's history without its timings."""
    return [{k: v for k, v in e.items() if k != "seconds"} for e in watch["history"]]


def test_a_halt_during_a_step_survives_a_crash(tmp_path: Path) -> None:
    """The leakage watch halts the segment inside a backward (a segment op, which saves only
    the segment's file): the halt is on disk at once, so after a crash the segment is still
    halted (by the watch), and the halt is in audit.jsonl."""
    start = _watched_host(tmp_path / "a")
    host = start()
    t = InProcessTransport([host])
    session, pid = _watched_session(host, t, {"inversion_ratio": 1e9})  # any figure is below
    _train_step(session, 0)
    _train_step(session, 1)  # step 2: the watch measures and halts (inside the backward)
    assert host.proposal(pid).status == "halted"

    back = start()  # a crash: no close, only the directory survives
    p = back.proposal(pid)
    assert (p.status, p.halted_by) == ("halted", "watch") and "inversion ratio" in p.reason
    lines = (tmp_path / "a" / "audit.jsonl").read_text().splitlines()
    halts = [e for e in map(json.loads, lines) if e["op"] == "halt"]
    assert [(e["caller"], e["segment"]) for e in halts] == [("watch", pid)]
    assert "inversion ratio" in halts[0]["outcome"]
    assert [e["op"] for e in back.audit_log()].count("halt") == 1
    t.add_host(back, replace=True)
    with pytest.raises(LeakageHaltError, match="inversion ratio"):
        _train_step(session, 2)


def test_a_fused_step_that_halts_the_segment_releases_nothing(tmp_path: Path) -> None:
    """Fused, the gradient of step 2 rides on the third forward: the watch halts the segment
    on that step, and the forward's activation does not leave (its step stays applied)."""
    host = _watched_host(tmp_path / "a")()
    t = InProcessTransport([host])
    session, pid = _watched_session(host, t, {"inversion_ratio": 1e9}, fuse=True)
    _train_step(session, 0)
    _train_step(session, 1)  # carries step 1 (the watch measures every 2 steps)
    with pytest.raises(LeakageHaltError, match="no output leaves"):
        _train_step(session, 2)
    assert host.runtimes[pid].steps == 2 and host.proposal(pid).status == "halted"
    last = [e for e in host.audit_log() if e["op"] == "forward"][-1]
    assert last["outcome"].startswith("LeakageHaltError") and last["bytes_out"] < 1024


@pytest.mark.parametrize("crash", [False, True])
def test_the_leakage_watch_goes_on_after_a_restart(tmp_path: Path, crash: bool) -> None:
    """The bound the data owner approved, the watch's history (its baseline first) and its
    schedule come back after a clean restart and after a crash: the restarted watch measures
    what an uninterrupted one measures, and halts where it halts."""
    ref_host = _watched_host(tmp_path / "ref")()
    ref_t = InProcessTransport([ref_host])
    ref, ref_pid = _watched_session(ref_host, ref_t, {"inversion_ratio": 1e9})
    for i in range(2):
        _train_step(ref, i)
    want = ref_host.owner("watch", segment=ref_pid)
    assert want["halted"] and [e["step"] for e in want["history"]] == [0, 2, 2]

    start = _watched_host(tmp_path / "a")
    host = start()
    t = InProcessTransport([host])
    session, pid = _watched_session(host, t, {"inversion_ratio": 1e9})
    _train_step(session, 0)
    if not crash:
        host.close()
    back = start()
    before = back.owner("watch", segment=pid)
    assert before["bound"]["inversion_ratio"] == 1e9 and not before["halted"]
    assert _figures(before) == _figures(want)[:1]  # the baseline measured at approval
    t.add_host(back, replace=True)
    _train_step(session, 1)  # step 2: measured by the restored watch, which halts
    got = back.owner("watch", segment=pid)
    assert _figures(got) == _figures(want) and got["reason"] == want["reason"]
    assert back.proposal(pid).status == "halted"
    with pytest.raises(LeakageHaltError):
        _train_step(session, 2)


def test_a_watch_that_cannot_be_rebuilt_halts_its_segment(tmp_path: Path) -> None:
    """A watched segment never runs unwatched: an invalid watch state in its file halts it."""
    start = _watched_host(tmp_path / "a")
    host = start()
    t = InProcessTransport([host])
    session, pid = _watched_session(host, t, {"relative": 0.5})
    _train_step(session, 0)
    assert host.store is not None
    path = host.store.segment_path(pid)
    tree = persist.load(path)
    tree["families"]["leakage"]["watch"]["bound"] = {"inversion_ratio": -1.0}
    persist.save(path, tree)
    back = start()
    p = back.proposal(pid)
    assert p.status == "halted" and "leakage watch could not be rebuilt" in p.reason
    assert back.store is not None and persist.load(back.store.path / "host.sspl")[
        "proposals"][0]["status"] == "halted"  # saved once restoring was done
    t.add_host(back, replace=True)
    with pytest.raises(LeakageHaltError, match="could not be rebuilt"):
        _train_step(session, 1)
