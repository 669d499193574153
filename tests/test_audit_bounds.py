"""The data owner's audit log stays bounded whatever a caller sends: texts are clipped,
audit.jsonl is rotated, memory keeps a tail, and the log is read page by page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import syft_split.host.core as host_core
from syft_split import DataOwnerHost, wire
from syft_split.datasite import DatasiteConsole

STRANGER = "stranger@example.org"
#: the documented bounds (syft_split.host.records.AUDIT_TEXT, AUDIT_OUTCOME; core.AUDIT_PAGE)
AUDIT_TEXT, AUDIT_OUTCOME, PAGE = 200, 1000, 1000


def _host(state_dir: Path) -> DataOwnerHost:
    host = DataOwnerHost("a", state_dir=state_dir)
    host.add_dataset("train", torch.randn(8, 4), torch.randint(0, 2, (8,)))
    host.restore_state()
    return host


def _refused(host: DataOwnerHost, n: int, op: str = "nope") -> None:
    for _ in range(n):
        assert "error" in wire.decode(host.handle(STRANGER, wire.encode({"op": op})))


def test_a_huge_op_or_segment_name_costs_the_log_a_bounded_entry(tmp_path: Path) -> None:
    host = _host(tmp_path)
    _refused(host, 5, op="X" * 1_000_000)
    host.handle(STRANGER, wire.encode({"op": "status", "segment": "S" * 1_000_000,
                                       "t" * 1_000: torch.zeros(2)}))
    assert (tmp_path / "audit.jsonl").stat().st_size < 6 * 4_000
    for e in host.audit:
        assert len(e.op) <= AUDIT_TEXT + 30 and len(e.outcome) <= AUDIT_OUTCOME + 30
        assert e.segment is None or len(e.segment) <= AUDIT_TEXT + 30
        assert all(len(k) <= AUDIT_TEXT + 30 for k in e.shapes)
    assert host.audit[0].op.startswith("XXX") and "(1000000 chars)" in host.audit[0].op
    assert "(1000000 chars)" in host.audit[-1].segment
    # the refusal the caller gets does not echo the megabyte back either
    raw = host.handle(STRANGER, wire.encode({"op": "X" * 1_000_000}))
    assert len(raw) < 4_000
    host.close()


def test_audit_jsonl_is_rotated_and_old_files_dropped(tmp_path: Path) -> None:
    host = _host(tmp_path)
    assert host.store is not None
    host.store.audit_bytes, host.store.audit_keep = 5_000, 2
    _refused(host, 300)
    host.close()
    names = sorted(p.name for p in tmp_path.glob("audit*.jsonl"))
    assert names == ["audit.1.jsonl", "audit.2.jsonl", "audit.jsonl"]
    for name in names:
        assert (tmp_path / name).stat().st_size < 5_000 + 1_000
    # the newest entries are in audit.jsonl: a restart reads them back
    again = _host(tmp_path)
    assert again.audit and again.audit[-1].op == "nope"


def test_memory_keeps_a_tail_and_a_restart_reads_only_the_tail(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_core, "AUDIT_TAIL", 20, raising=False)
    host = _host(tmp_path)
    _refused(host, 100)
    assert 20 <= len(host.audit) <= 40
    assert host.audit_first + len(host.audit) == 100
    page = host.owner("audit", since=0)
    assert page["first"] == host.audit_first > 0
    assert page["total"] == 100 and page["next"] == 100
    assert len(page["entries"]) == 100 - host.audit_first
    host.close()
    again = _host(tmp_path)
    assert len(again.audit) == 20
    assert again.audit_first == 101 - 20  # 100 refusals and the owner's audit call


def test_the_audit_op_answers_in_pages_the_console_joins(tmp_path: Path) -> None:
    host = _host(tmp_path)
    _refused(host, PAGE + 200)
    page = host.owner("audit", since=0)
    assert len(page["entries"]) == PAGE
    assert page["next"] == PAGE
    assert len(host.owner("audit", since=10, limit=5)["entries"]) == 5

    class Console(DatasiteConsole):  # the datasite console, over the host directly
        def _call(self, op: str, **fields: Any) -> dict[str, Any]:
            return dict(wire.decode(wire.encode(host.owner_call("admin", op, fields))))

    entries = Console(None).audit()
    assert len(entries) >= PAGE + 200
    assert [e.op for e in entries[:PAGE + 200]] == ["nope"] * (
        PAGE + 200)
    host.close()


def test_audit_indices_go_on_across_restarts_after_rotations(tmp_path: Path) -> None:
    """A console polling ``audit(since=last total)`` misses nothing across a restart, also
    once the log rotated (and rotated files were dropped); an older directory without
    audit.index counts the rotated files' lines."""
    host = _host(tmp_path)
    assert host.store is not None
    host.store.audit_bytes, host.store.audit_keep = 3_000, 2
    _refused(host, 100)
    total = host.owner("audit", since=0)["total"]
    assert total == 100
    host.close()
    assert sorted(p.name for p in tmp_path.glob("audit*.jsonl")) == [
        "audit.1.jsonl", "audit.2.jsonl", "audit.jsonl"]  # older ones dropped
    again = _host(tmp_path)
    assert again.store is not None
    again.store.audit_bytes, again.store.audit_keep = 3_000, 2
    assert again.audit_first + len(again.audit) == 101  # and the owner's audit call
    _refused(again, 5, op="after")
    page = again.owner("audit", since=total)
    assert page["total"] == 106
    assert [e["op"] for e in page["entries"]] == ["owner.audit"] + ["after"] * 5
    again.close()
    (tmp_path / "audit.index").unlink()  # a directory of an older version
    old = _host(tmp_path)
    lines = sum(len((tmp_path / n).read_text().splitlines())
                for n in ("audit.jsonl", "audit.1.jsonl", "audit.2.jsonl"))
    assert old.audit_first + len(old.audit) == lines


def test_an_error_quoting_a_huge_caller_string_is_still_answered_and_audited(
        tmp_path: Path) -> None:
    """Error messages quote what the caller sent (repr doubles a backslash): the answer is
    clipped, so it stays encodable (the wire refuses headers over 1 MiB) and is audited."""
    from torch import nn

    from syft_split.spec import module_to_spec, spec_state

    host = _host(tmp_path)
    m = nn.Sequential(nn.Linear(4, 3))
    pid = str(wire.decode(host.handle("mo", wire.encode({
        "op": "propose", "role": "input", "datasets": ["train"], "spec": module_to_spec(m),
        "optimizer": {"name": "sgd", "lr": 0.1},
        **{f"state/{k}": v for k, v in spec_state(m).items()}})))["segment"])
    host.approve(pid)
    n = len(host.audit)
    slashes = "\\" * 400_000
    for req in ({"op": "forward", "segment": slashes},
                {"op": "status", "segment": slashes},
                {"op": "forward", "segment": pid, "indices": torch.arange(2), "dataset": slashes}):
        answer = wire.decode(host.handle("mo", wire.encode(req)))
        assert answer["error"] and len(answer["message"]) < 20_000
    assert len(host.audit) == n + 3



def test_recording_from_many_threads_loses_nothing_and_never_raises(tmp_path: Path) -> None:
    """A non-admin's refused owner op is recorded outside the serving lock, a step under it:
    while audit.jsonl rotates, no entry is lost and nothing raises out of ``host.record``."""
    import threading

    from syft_split.host import AuditEntry
    from syft_split.host.channel import serving_lock

    host = _host(tmp_path)
    assert host.store is not None
    host.store.audit_bytes, host.store.audit_keep = 4_096, 200  # rotated often, all kept
    lock, n, errors = serving_lock(host), 2_000, []

    def worker(op: str, locked: bool) -> None:
        for _ in range(n):
            entry = AuditEntry(0.0, STRANGER, op, None, {}, 0, 0, 0.0, "AuthorizationError")
            try:
                if locked:
                    with lock:
                        host.record(entry)
                else:
                    host.record(entry)
            except Exception as exc:  # what the race raised: ValueError, AttributeError
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=a)
               for a in (("forward", True), ("owner.approve", False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    host.close()
    assert errors == []
    assert len(host.audit) == 2 * n
    lines = [line for f in tmp_path.glob("audit*.jsonl") for line in f.read_text().splitlines()]
    assert len(lines) == 2 * n and sum('"forward"' in line for line in lines) == n


def test_a_failure_to_record_never_runs_a_channel_frame_twice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``host.handle`` answers a call that ran even when recording it fails: on a channel an
    exception there killed the connection before the frame was marked answered, and the
    client's resend ran it again (a second release)."""
    from torch import nn

    from syft_split.channel import ChannelClient, ChannelTicket
    from syft_split.host.channel import close_channels
    from syft_split.spec import module_to_spec, spec_state

    host = DataOwnerHost("a")
    host.add_dataset("train", torch.randn(8, 4), torch.randint(0, 2, (8,)))
    m = nn.Sequential(nn.Linear(4, 3))
    pid = str(wire.decode(host.handle("mo", wire.encode({
        "op": "propose", "role": "input", "datasets": ["train"], "spec": module_to_spec(m),
        "optimizer": {"name": "sgd", "lr": 0.1},
        **{f"state/{k}": v for k, v in spec_state(m).items()}})))["segment"])
    host.approve(pid, channel=True)
    ticket = ChannelTicket.from_response(wire.decode(host.handle("mo", wire.encode(
        {"op": "open_channel", "segments": [pid]}))))
    client = ChannelClient(ticket, "mo")
    client.connect()
    record, ran = host.record, []

    def failing(entry: Any) -> None:
        record(entry)
        if entry.op == "forward":
            ran.append(entry)
            if len(ran) == 1:
                raise ValueError("I/O operation on closed file.")  # what the race raised

    monkeypatch.setattr(host, "record", failing)
    try:
        answer = wire.decode(client.request(wire.encode(
            {"op": "forward", "segment": pid, "indices": torch.arange(4), "train": False})))
    finally:
        close_channels(host)
    assert "activation" in answer
    assert len(ran) == 1
