"""What one model owner can make a data owner keep, across restarts: the weights of its
proposals (pending: capped per user; rejected: dropped), aligned datasets (capped; never in
place of the data owner's own) and its rate windows (saved with the host)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from syft_split import DataOwnerHost, wire
from syft_split.errors import ApprovalError, ConfigError, WireError
from syft_split.host import HostLimits
from syft_split.host.records import spec_bytes
from syft_split.spec import module_to_spec, spec_state

N, D = 40, 8


def _host(state_dir: Path | None, limits: HostLimits | None = None) -> DataOwnerHost:
    """A data owner as it (re)starts: its dataset, then its state directory."""
    host = DataOwnerHost("a", state_dir=state_dir, limits=limits)
    g = torch.Generator().manual_seed(0)
    host.add_dataset("train", torch.randn(N, D, generator=g),
                     torch.randint(0, 3, (N,), generator=g), ids=[f"r{i}" for i in range(N)])
    host.restore_state()
    return host


def _propose(module: nn.Module) -> dict[str, Any]:
    req: dict[str, Any] = {"op": "propose", "role": "input", "datasets": ["train"],
                           "spec": module_to_spec(module),
                           "optimizer": {"name": "sgd", "lr": 0.1}}
    req.update({f"state/{k}": v for k, v in spec_state(module).items()})
    return req


def _digest(module: nn.Module) -> str:
    from syft_split.host.records import spec_digest

    return spec_digest(module_to_spec(module))


def _call(host: DataOwnerHost, user: str, req: dict[str, Any]) -> dict[str, Any]:
    return dict(wire.decode(host.handle(user, wire.encode(req))))


BIG = nn.Sequential(nn.Linear(D, 4096))  # 36,864 values: 147,456 bytes of weights
BIG_BYTES = 4 * (D * 4096 + 4096)
BIG_COST = BIG_BYTES + spec_bytes(module_to_spec(BIG))  # what max_pending_bytes counts


def test_a_rejected_proposal_keeps_no_weights_across_restarts(tmp_path: Path) -> None:
    host = _host(tmp_path)
    ids = [_call(host, "mo@x", _propose(BIG))["segment"] for _ in range(4)]
    keep, pending, *rejected = ids
    host.approve(keep)
    size_before = (tmp_path / "host.sspl").stat().st_size
    # every pending proposal's initial weights are in host.sspl (the approved one's segment
    # file holds its weights: host.sspl no longer keeps them, tests/test_persist_cost.py)
    assert 3 * BIG_BYTES < size_before < 4 * BIG_BYTES
    for pid in rejected:
        host.reject(pid)
    p = host.proposal(rejected[0])
    assert p.state == {} and p.module is None and p.spec == {}
    assert p.spec_digest == _digest(BIG)
    assert p.reason == "rejected by the data owner"
    size_after = (tmp_path / "host.sspl").stat().st_size
    assert size_after < size_before - 2 * BIG_BYTES + 10_000  # both rejected ones' bytes gone
    with pytest.raises(ApprovalError, match="no longer kept"):
        host.review(rejected[0])
    host.close()

    back = _host(tmp_path)
    assert {p.id: p.status for p in back.proposals()} == {
        keep: "approved", pending: "pending", rejected[0]: "rejected", rejected[1]: "rejected"}
    assert back.proposal(rejected[1]).spec_digest == _digest(BIG)
    assert back.proposal(rejected[1]).state == {}
    kept = back.proposal(pending)  # pending and approved ones keep theirs
    assert kept.module is not None and set(kept.state) == {"0.weight", "0.bias"}
    back.approve(pending)
    r = _call(back, "mo@x", {"op": "forward", "segment": pending, "indices": torch.arange(4),
                             "step": 1})
    assert tuple(r["activation"].shape) == (4, 4096)
    status = _call(back, "mo@x", {"op": "status", "segment": rejected[0]})
    assert status["status"] == "rejected"


def test_rejected_weights_an_older_state_file_kept_are_dropped_on_restore(tmp_path: Path) -> None:
    host = _host(tmp_path)
    pid = _call(host, "mo@x", _propose(BIG))["segment"]
    host.proposal(pid).status = "rejected"  # as an older version saved it: weights and all
    host.close()
    assert (tmp_path / "host.sspl").stat().st_size > BIG_BYTES

    back = _host(tmp_path)
    p = back.proposal(pid)
    assert p.status == "rejected" and p.state == {} and p.module is None
    assert p.spec_digest == _digest(BIG)
    back.close()
    assert (tmp_path / "host.sspl").stat().st_size < BIG_BYTES


def test_pending_weights_are_capped_per_user(tmp_path: Path) -> None:
    host = _host(tmp_path, HostLimits(max_pending_bytes=3 * BIG_COST))
    ids = [_call(host, "mo@x", _propose(BIG)).get("segment") for _ in range(3)]
    assert all(ids)
    refused = _call(host, "mo@x", _propose(BIG))
    assert refused["error"] == "ValidationError" and "pending proposals hold" in refused["message"]
    assert len(host.proposals("pending")) == 3
    assert _call(host, "other@x", _propose(BIG)).get("segment")  # another user: its own quota
    fl = {**_propose(BIG), "op": "fl_propose"}  # federated proposals count the same
    assert _call(host, "mo@x", fl)["error"] == "ValidationError"
    host.reject(ids[0])  # rejecting frees the bytes
    assert _call(host, "mo@x", _propose(BIG)).get("segment")
    host.approve(ids[1])  # and so does approving: the data owner decided
    assert _call(host, "mo@x", _propose(BIG)).get("segment")
    host.close()

    back = _host(tmp_path, HostLimits(max_pending_bytes=3 * BIG_COST))
    refused = _call(back, "mo@x", _propose(BIG))  # the cap holds after a restart
    assert refused["error"] == "ValidationError"


def _head_request(pid: str, head: nn.Module) -> dict[str, Any]:
    return {"op": "propose_local_loss", "segment": pid, "loss": "cross_entropy",
            "spec": module_to_spec(head), "optimizer": {"name": "sgd", "lr": 0.1},
            **{f"state/{k}": v for k, v in spec_state(head).items()}}


def test_auxiliary_heads_count_against_pending_bytes_and_go_with_a_reject(
        tmp_path: Path) -> None:
    host = _host(tmp_path, HostLimits(max_pending_bytes=BIG_BYTES))
    small = nn.Sequential(nn.Linear(D, 4))
    ids = [_call(host, "mo@x", _propose(small))["segment"] for _ in range(3)]
    head = nn.Sequential(nn.Linear(4, 4096))  # 81,920 bytes: room for one under the cap
    assert "error" not in _call(host, "mo@x", _head_request(ids[0], head))
    refused = _call(host, "mo@x", _head_request(ids[1], head))
    assert refused["error"] == "ValidationError" and "pending proposals hold" in refused["message"]
    assert "error" not in _call(host, "mo@x", _head_request(ids[0], head))  # a replacement
    refused = _call(host, "mo@x", _propose(BIG))  # nor room for other weights
    assert refused["error"] == "ValidationError"
    latency: Any = host.families["local_loss"]
    host.reject(ids[0])  # the head goes with its proposal
    assert ids[0] not in latency.heads
    assert "error" not in _call(host, "mo@x", _head_request(ids[1], head))


def test_max_pending_bytes_is_validated() -> None:
    with pytest.raises(ConfigError, match="max_pending_bytes"):
        HostLimits(max_pending_bytes=0)


def _align(host: DataOwnerHost, user: str, as_name: str) -> dict[str, Any]:
    from syft_split.psi import PsiServer

    req = _call(host, user, {"op": "psi_request", "dataset": "train"})["request"]
    setup, response = PsiServer([f"r{i}" for i in range(0, N, 2)]).handle(req)
    return _call(host, user, {"op": "psi_finish", "dataset": "train", "setup": setup,
                              "response": response, "as_name": as_name})


def test_aligned_datasets_are_capped_per_user(tmp_path: Path) -> None:
    from syft_split.alignment import MAX_ALIGNED_PER_USER

    host = _host(tmp_path)
    host.allow_alignment("train", "mo@x")
    host.allow_alignment("train", "other@x")
    for i in range(MAX_ALIGNED_PER_USER):
        assert _align(host, "mo@x", f"copy{i}") == {"records": N // 2}
    refused = _align(host, "mo@x", "one-more")
    assert refused["error"] == "ConfigError" and "at most" in refused["message"]
    assert "one-more" not in host.datasets
    assert _align(host, "other@x", "theirs") == {"records": N // 2}
    host.close()

    back = _host(tmp_path)  # the count survives a restart
    assert len(back.datasets) == 1 + MAX_ALIGNED_PER_USER + 1
    assert _align(back, "mo@x", "one-more")["error"] == "ConfigError"


def test_a_restart_keeps_the_data_owners_dataset_over_an_aligned_one(tmp_path: Path) -> None:
    host = _host(tmp_path)
    host.allow_alignment("train", "mo@x")
    assert _align(host, "mo@x", "test") == {"records": N // 2}  # a name the DO will use later
    pid = _call(host, "mo@x", {**_propose(nn.Linear(D, 3)), "datasets": ["test"]})["segment"]
    host.approve(pid)
    host.close()

    back = DataOwnerHost("a", state_dir=tmp_path)
    g = torch.Generator().manual_seed(0)
    back.add_dataset("train", torch.randn(N, D, generator=g),
                     torch.randint(0, 3, (N,), generator=g), ids=[f"r{i}" for i in range(N)])
    own = torch.full((5, D), 7.0)
    back.add_dataset("test", own, torch.zeros(5, dtype=torch.long))  # the DO's own, since
    assert back.restore_state()
    assert back.datasets["test"].features is own  # not replaced by the aligned rows
    assert back.proposal(pid).status == "halted"
    assert "aligned dataset 'test' was not restored" in back.proposal(pid).reason
    r = _call(back, "mo@x", {"op": "forward", "segment": pid, "indices": torch.arange(2)})
    assert r["error"] == "ApprovalError"
    assert any(e.op == "restore" and "'test'" in e.outcome for e in back.audit)
    back.close()

    again = _host(tmp_path)  # the aligned rows are forgotten: not skipped again and again
    assert "test" not in again.datasets
    assert "test" not in again.families["alignment"]._aligned  # type: ignore[attr-defined]


def test_the_records_per_minute_cap_holds_across_a_restart(tmp_path: Path) -> None:
    limits = HostLimits(max_records_per_minute=8)
    host = _host(tmp_path, limits)
    pid = _call(host, "mo@x", _propose(nn.Linear(D, 4)))["segment"]
    host.approve(pid)
    fwd = {"op": "forward", "segment": pid, "indices": torch.arange(8)}
    assert "activation" in _call(host, "mo@x", {**fwd, "step": 1})
    assert "activation" not in _call(host, "mo@x", {"op": "backward", "segment": pid,
                                                    "grad": torch.ones(8, 4), "step": 2})
    refused = _call(host, "mo@x", {**fwd, "step": 3})
    assert refused["error"] == "EgressError" and "16 records in a minute" in refused["message"]
    host.close()

    back = _host(tmp_path, limits)
    refused = _call(back, "mo@x", {**fwd, "step": 3})
    assert refused.get("error") == "EgressError" and "16 records in a minute" in refused["message"]
    assert back.runtimes[pid].steps == 1


def test_records_an_evaluation_released_count_after_a_crash(tmp_path: Path) -> None:
    """An evaluation call (train=False) is not saved: the records it released were forgotten
    by a crash, and 16 left in the minute under a cap of 10."""
    limits = HostLimits(max_records_per_minute=10)
    host = _host(tmp_path, limits)
    pid = _call(host, "mo@x", _propose(nn.Linear(D, 4)))["segment"]
    host.approve(pid)
    evaluate = {"op": "forward", "segment": pid, "indices": torch.arange(8), "train": False}
    assert "activation" in _call(host, "mo@x", evaluate)
    back = _host(tmp_path, limits)  # a crash: no clean shutdown saved anything more
    refused = _call(back, "mo@x", evaluate)
    assert refused.get("error") == "EgressError" and "16 records in a minute" in refused["message"]


def test_psi_work_counts_after_a_crash(tmp_path: Path) -> None:
    """The PSI budget's window is saved with each psi_serve and psi_request (before: at the
    next save, so a crash in the minute gave a user its budget again): 41 + 40 elements in the
    minute, and a request of 40 more is refused under a budget of 100."""
    from syft_split.psi import PsiClient

    limits = HostLimits(max_psi_elements_per_minute=100)
    host = _host(tmp_path, limits)
    host.allow_alignment("train", "mo@x")
    serve = {"op": "psi_serve", "dataset": "train", "request": PsiClient(["r1"]).request()}
    assert set(_call(host, "mo@x", serve)) == {"setup", "response"}  # 1 + 40 elements
    back = _host(tmp_path, limits)  # a crash: no clean shutdown saved anything more
    assert "request" in _call(back, "mo@x", {"op": "psi_request", "dataset": "train"})  # 40
    again = _host(tmp_path, limits)  # and another
    refused = _call(again, "mo@x", {"op": "psi_request", "dataset": "train"})
    assert refused.get("error") == "ValidationError", refused
    assert "had 81 PSI elements processed here in the last minute" in refused["message"]


def test_psi_calls_save_the_host_at_most_once_a_second_and_refused_ones_never(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saving the PSI window with every call rewrote host.sspl each time (70 ms with a large
    pending proposal in it), refused calls included, from any account: now only a call that
    charged the budget saves, at most once every WINDOW_SAVE_S."""
    from syft_split import alignment
    from syft_split.psi import PsiClient

    host = _host(tmp_path)
    host.allow_alignment("train", "mo@x")
    saves: list[float] = []
    assert host.store is not None
    real = host.store.save_host
    monkeypatch.setattr(host.store, "save_host", lambda h: (saves.append(1.0), real(h)))
    serve = {"op": "psi_serve", "dataset": "train", "request": PsiClient(["r1"]).request()}
    for _ in range(3):
        assert set(_call(host, "mo@x", serve)) == {"setup", "response"}
    assert len(saves) == 1  # within a second: one save
    for user in ("stranger@x", "mo@x"):  # not allowed / a malformed request: no save
        bad = {**serve, "request": b"junk"} if user == "mo@x" else serve
        assert "error" in _call(host, user, bad)
    assert len(saves) == 1
    monkeypatch.setattr(alignment, "WINDOW_SAVE_S", 0.0)
    assert set(_call(host, "mo@x", serve)) == {"setup", "response"}
    assert len(saves) == 2


def test_the_proposal_rate_cap_holds_across_a_restart(tmp_path: Path) -> None:
    limits = HostLimits(max_proposals_per_minute=5)
    host = _host(tmp_path, limits)
    for _ in range(5):  # refused proposals count toward the rate too
        assert _call(host, "mo@x", {"op": "propose"})["error"] == "ConfigError"
    refused = _call(host, "mo@x", _propose(nn.Linear(D, 4)))
    assert refused["error"] == "ValidationError" and "in the last minute" in refused["message"]
    host.close()

    back = _host(tmp_path, limits)
    refused = _call(back, "mo@x", _propose(nn.Linear(D, 4)))
    assert refused.get("error") == "ValidationError" and "in the last minute" in refused["message"]
    assert back.proposals() == []
    assert _call(back, "other@x", _propose(nn.Linear(D, 4))).get("segment")  # per user


def test_a_federated_proposal_is_on_disk_when_answered(tmp_path: Path) -> None:
    """``fl_propose`` saves the host like ``propose`` (the proposal and the rate window)."""
    host = _host(tmp_path)
    pid = _call(host, "mo@x", {**_propose(nn.Linear(D, 3)), "op": "fl_propose"})["segment"]
    back = _host(tmp_path)  # the first process crashed: never closed
    assert back.proposal(pid).status == "pending"
    assert len(back.families["proposals"]._recent["mo@x"]) == 1  # type: ignore[attr-defined]


def test_the_data_owner_deletes_an_aligned_dataset_and_frees_its_slot(tmp_path: Path) -> None:
    from syft_split.alignment import MAX_ALIGNED_PER_USER

    host = _host(tmp_path)
    host.allow_alignment("train", "mo@x")
    for i in range(MAX_ALIGNED_PER_USER):
        assert _align(host, "mo@x", f"copy{i}") == {"records": N // 2}
    approved = _call(host, "mo@x", {**_propose(nn.Linear(D, 3)), "datasets": ["copy0"]})
    host.approve(approved["segment"])
    pending = _call(host, "mo@x", {**_propose(nn.Linear(D, 3)), "datasets": ["copy0"]})
    with pytest.raises(ConfigError, match="not an aligned dataset"):
        host.drop_aligned("train")  # the data owner's own: not this op's
    host.drop_aligned("copy0")
    assert "copy0" not in host.datasets
    for pid in (approved["segment"], pending["segment"]):
        assert host.proposal(pid).status == "halted"
        assert "deleted the aligned dataset 'copy0'" in host.proposal(pid).reason
    assert _align(host, "mo@x", "again") == {"records": N // 2}  # its slot is free
    host.close()
    back = _host(tmp_path)  # gone for good
    assert "copy0" not in back.datasets and "again" in back.datasets
    assert back.proposal(approved["segment"]).status == "halted"


def test_drop_aligned_whose_halt_cannot_be_saved_can_be_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from syft_split.errors import StateSaveError

    host = _host(tmp_path)
    host.allow_alignment("train", "mo@x")
    assert _align(host, "mo@x", "copy") == {"records": N // 2}
    pids = [_call(host, "mo@x", {**_propose(nn.Linear(D, 3)), "datasets": ["copy"]})["segment"]
            for _ in range(2)]
    for pid in pids:
        host.approve(pid)

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StateSaveError):
        host.drop_aligned("copy")
    monkeypatch.undo()
    assert "copy" in host.datasets  # kept until every segment on it is halted
    host.drop_aligned("copy")  # made again: the rest halt, the dataset goes
    assert "copy" not in host.datasets
    assert [host.proposal(p).status for p in pids] == ["halted", "halted"]


def test_a_segment_saved_with_its_own_label_key_keeps_it() -> None:
    """State from before the host kept one key: a segment restored with a key of its own keeps
    it (a new key gave each of its records a second noisy label)."""
    from syft_split.host.records import LABEL_KEY, Runtime

    host = _host(None)
    req = {**_propose(nn.Linear(D, 3)), "release_labels": True,
           "defences": {"label_epsilon": 1.0, "num_classes": 3}}
    pid = _call(host, "mo@x", req)["segment"]
    host.approve(pid)
    rt: Runtime = host.runtimes[pid]
    assert rt.extra[LABEL_KEY] == host.label_key
    rt.extra[LABEL_KEY] = "ab" * 32
    rt.fresh_secrets(host.label_key)
    assert rt.extra[LABEL_KEY] == "ab" * 32


@pytest.mark.he
def test_an_agreement_is_kept_as_validated_and_dropped_with_a_reject(tmp_path: Path) -> None:
    """An encryption agreement was stored as sent: 600 kB of junk under an unknown key took
    host.sspl past the 1 MiB header cap and no save (not even the data owner's halt) lasted.
    Unknown keys and oversized agreements are refused; a rejected proposal drops its
    agreement; a state file's own JSON may exceed the 1 MiB a peer's message may take."""
    from syft_split import persist

    host = _host(tmp_path)
    agreement = {"level": "A", "lr": None, "batch_size": 4, "d_in": 4096, "d_out": 4,
                 "bias": True, "params": {}, "options": {}}
    for bad, words in (({"note": "x" * 600_000}, "unknown: ['note']"),
                       ({"layer": "x" * 600_000}, "characters of JSON")):
        r = _call(host, "mo@x", {**_propose(BIG), "max_batch": 4, "he": {**agreement, **bad}})
        assert r["error"] == "ConfigError" and words in r["message"], r
    assert not host.proposals()
    pid = _call(host, "mo@x", {**_propose(BIG), "max_batch": 4, "he": agreement})["segment"]
    host.reject(pid)
    assert host.proposal(pid).he is None
    host.close()
    assert _host(tmp_path).proposal(pid).he is None

    big = {"text": "y" * (2 << 20)}  # a party's own file: 2 MiB of JSON saves and loads
    persist.save(tmp_path / "big.sspl", big)
    assert persist.load(tmp_path / "big.sspl") == big
    with pytest.raises(WireError, match="header length"):  # a peer's message: at most 1 MiB
        wire.decode(wire.encode(big, max_header=4 << 20))
