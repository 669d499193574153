"""The data owner's state directory as files: who may read them, what a failed write leaves,
and what a restart says about damaged or missing ones."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from syft_split import DataOwnerHost, persist, wire
from syft_split.errors import WireError
from syft_split.spec import module_to_spec, spec_state

USER = "model-owner@example.org"


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _host(state_dir: Path) -> DataOwnerHost:
    host = DataOwnerHost("a", state_dir=state_dir)
    host.add_dataset("train", torch.randn(8, 4), torch.randint(0, 2, (8,)))
    host.restore_state()
    return host


def _propose(host: DataOwnerHost, module: nn.Module) -> str:
    req = {"op": "propose", "role": "input", "datasets": ["train"],
           "spec": module_to_spec(module), "optimizer": {"name": "sgd", "lr": 0.1},
           **{f"state/{k}": v for k, v in spec_state(module).items()}}
    response = wire.decode(host.handle(USER, wire.encode(req)))
    assert "segment" in response, response
    return str(response["segment"])


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_files_are_the_data_owners_only(tmp_path: Path, umask_022: None) -> None:
    root = tmp_path / "state"
    host = _host(root)
    host.public_key()  # the peer-sealing key pair, saved in host.sspl
    host.approve(_propose(host, nn.Sequential(nn.Linear(4, 2))))
    host.close()
    assert persist.load(root / "host.sspl")["families"]["weights"]["secret_key"]
    assert _mode(root) == 0o700 and _mode(root / "segments") == 0o700
    files = [root / "host.sspl", root / "audit.jsonl", *(root / "segments").iterdir()]
    assert len(files) == 3
    assert all(_mode(f) == 0o600 for f in files), [oct(_mode(f)) for f in files]


def test_a_state_directory_left_readable_is_closed(tmp_path: Path, umask_022: None) -> None:
    root = tmp_path / "state"
    (root / "segments").mkdir(parents=True, mode=0o755)
    (root / "audit.jsonl").write_text("")
    root.chmod(0o755)
    (root / "audit.jsonl").chmod(0o644)
    host = _host(root)
    host.owner("audit")
    host.close()
    assert _mode(root) == 0o700 and _mode(root / "segments") == 0o700
    assert _mode(root / "audit.jsonl") == 0o600


def test_write_atomic_makes_private_files(tmp_path: Path, umask_022: None) -> None:
    persist.write_atomic(tmp_path / "new" / "f.bin", b"x")
    assert _mode(tmp_path / "new") == 0o700 and _mode(tmp_path / "new" / "f.bin") == 0o600


def _no_space(fd: int) -> None:
    raise OSError(28, "No space left on device")


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.bin"
    persist.write_atomic(target, b"old")
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(OSError):
        persist.write_atomic(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_two_threads_saving_one_file_do_not_collide(tmp_path: Path) -> None:
    """The temp file was named by the process id: two threads saving the same file (a save
    outside the host's lock, an atexit save) shared it, and one raised FileNotFoundError."""
    import threading

    target, errors = tmp_path / "f.bin", []
    start = threading.Barrier(2)

    def save(payload: bytes) -> None:
        start.wait()
        try:
            for _ in range(50):
                persist.write_atomic(target, payload)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(b * 100_000,)) for b in (b"a", b"b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert target.read_bytes() in (b"a" * 100_000, b"b" * 100_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # no temp left


def _middle(host: DataOwnerHost) -> str:
    module = nn.Sequential(nn.Linear(4, 4))
    req = {"op": "propose", "role": "middle", "datasets": [], "input_shape": [4],
           "spec": module_to_spec(module), "optimizer": {"name": "sgd", "lr": 0.1},
           **{f"state/{k}": v for k, v in spec_state(module).items()}}
    pid = str(wire.decode(host.handle(USER, wire.encode(req)))["segment"])
    host.approve(pid)
    return pid


def _stepper(host: DataOwnerHost, pid: str) -> Callable[..., dict[str, object]]:
    """``step(op=..., **fields)``: one call on segment ``pid``, decoded."""
    def step(**fields: object) -> dict[str, object]:
        return dict(wire.decode(host.handle(USER, wire.encode({"segment": pid, **fields}))))
    return step


def test_a_step_that_cannot_be_saved_is_answered_audited_and_saved_on_retry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "state"
    host = _host(root)
    pid = _middle(host)
    step = _stepper(host, pid)

    step(op="forward", x=torch.randn(4, 4), step=1)
    backward = {"op": "backward", "grad": torch.ones(4, 4), "step": 2}
    monkeypatch.setattr(os, "fsync", _no_space)  # the disk fills up
    failed = step(**backward)
    monkeypatch.undo()
    assert failed["error"] == "StateSaveError"
    assert "ran on a" in str(failed["message"]) and "not durable" in str(failed["message"])
    assert host.audit[-1].op == "backward"
    assert host.audit[-1].outcome.startswith("StateSaveError")
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert host.runtimes[pid].steps == 1  # it ran (in memory): never applied twice
    assert step(**backward)["steps"] == 1  # the retry: answered from the record, saved now
    again = _host(root)  # a crash, then a restart
    assert again.runtimes[pid].steps == 1 and again.runtimes[pid].last_step == 2


def test_a_step_whose_after_step_hook_fails_is_undone(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A family's hook after the optimizer step (the watch's measure) raised: the step stayed
    applied and saved, but no step record was kept and the model owner was told it failed;
    its gradient sent again found no pending forward. The step is undone now."""
    from syft_split.host.watch import LeakageOps

    root = tmp_path / "state"
    host = _host(root)
    pid = _middle(host)
    step = _stepper(host, pid)

    step(op="forward", x=torch.randn(4, 4), step=1)
    before = {k: v.clone() for k, v in host.export_weights(pid).items()}
    backward = {"op": "backward", "grad": torch.ones(4, 4), "step": 2}

    def broken(self: object, rt: object, grad: object) -> None:
        raise RuntimeError("the measure failed")

    monkeypatch.setattr(LeakageOps, "after_step", broken)
    assert step(**backward)["error"] == "RemoteError"
    monkeypatch.undo()
    rt = host.runtimes[pid]
    assert rt.steps == 0 and rt.pending_output is not None
    assert all(torch.equal(before[k], v) for k, v in host.export_weights(pid).items())
    assert _host(root).runtimes[pid].steps == 0  # and so on disk
    assert step(**backward)["steps"] == 1  # the same gradient, sent again, lands


def _trained(root: Path) -> tuple[DataOwnerHost, str, bytes]:
    """A host whose middle segment took three steps, shut down cleanly, and its segment
    file as it was after the first step."""
    host = _host(root)
    pid = _middle(host)
    assert host.store is not None
    first = b""
    for s in (1, 3, 5):
        for op, field in (("forward", "x"), ("backward", "grad")):
            value = torch.randn(4, 4) if field == "x" else torch.ones(4, 4)
            msg = {"op": op, "segment": pid, field: value, "step": s + (op == "backward")}
            assert "error" not in wire.decode(host.handle(USER, wire.encode(msg)))
        first = first or host.store.segment_path(pid).read_bytes()
    host.close()
    return host, pid, first


@pytest.mark.parametrize("how", ["truncated", "one bit"])
@pytest.mark.parametrize("damaged", ["host.sspl", "segment"])
def test_a_damaged_state_file_is_named(tmp_path: Path, damaged: str, how: str) -> None:
    """A truncated file, and one whose bytes changed on disk (one bit of its last weight: it
    restored silently, ~1e38 off, before files carried a checksum), are refused by name:
    host.sspl (the index) stops the restore, a segment's file halts that segment (more:
    tests/test_durability_damage.py)."""
    host, pid, _ = _trained(tmp_path)
    assert host.store is not None
    path = tmp_path / "host.sspl" if damaged == "host.sspl" else host.store.segment_path(pid)
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(100)
    else:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x40
        path.write_bytes(bytes(data))
    if damaged == "host.sspl":
        with pytest.raises(WireError, match=re.escape(f"state file {path} is damaged")):
            _host(tmp_path)
        return
    p = _host(tmp_path).proposals_by_id[pid]
    assert p.status == "halted" and f"state file {path} could not be restored" in p.reason


def test_a_state_file_from_before_the_checksum_still_loads(tmp_path: Path) -> None:
    tree = {"steps": 3, "w": torch.arange(4.0)}
    (tmp_path / "old.sspl").write_bytes(wire.encode(persist.pack(tree)))
    back = persist.load(tmp_path / "old.sspl")
    assert back["steps"] == 3 and torch.equal(back["w"], tree["w"])


@pytest.mark.parametrize("loss", ["deleted", "older"])
def test_a_lost_segment_file_halts_the_segment(tmp_path: Path, loss: str) -> None:
    host, pid, first = _trained(tmp_path)
    assert host.store is not None
    path = host.store.segment_path(pid)
    if loss == "older":  # a copy from after the first step put back (a backup, a bad disk)
        path.write_bytes(first)
    else:
        path.unlink()
    again = _host(tmp_path)
    p = again.proposals_by_id[pid]
    assert p.status == "halted" and str(path) in p.reason
    assert again.audit[-1].op == "halt" and again.audit[-1].segment == pid
    refused = wire.decode(again.handle(USER, wire.encode(
        {"op": "forward", "segment": pid, "x": torch.randn(4, 4), "step": 7})))
    assert refused["error"] == "ApprovalError"
    again.close()
    assert _host(tmp_path).proposals_by_id[pid].status == "halted"  # and it stays halted


@pytest.mark.parametrize("loss", ["gone", "shorter"])
def test_a_segment_restored_without_its_data_is_halted(tmp_path: Path, loss: str) -> None:
    """A data owner restarted without a dataset a segment reads (or with fewer records under
    its name): the restore failed with a bare KeyError/IndexError (the datasite could not
    start), or the segment stayed approved and its next step failed opaquely. It is halted,
    audited, with the reason; the restore goes on."""
    root = tmp_path / "state"
    host = DataOwnerHost("a", state_dir=root)
    host.add_dataset("train", torch.randn(8, 4), torch.randint(0, 2, (8,)))
    host.add_dataset("extra", torch.randn(8, 4), torch.randint(0, 2, (8,)))
    host.restore_state()
    module = nn.Sequential(nn.Linear(4, 3))
    req = {"op": "propose", "role": "input", "datasets": ["extra"], "spec": module_to_spec(module),
           "optimizer": {"name": "sgd", "lr": 0.1},
           **{f"state/{k}": v for k, v in spec_state(module).items()}}
    pid = str(wire.decode(host.handle(USER, wire.encode(req)))["segment"])
    host.approve(pid)
    r = wire.decode(host.handle(USER, wire.encode({"op": "forward", "segment": pid, "step": 1,
                                                   "dataset": "extra",
                                                   "indices": torch.arange(6, 8)})))
    assert "error" not in r, r
    host.close()

    back = DataOwnerHost("a", state_dir=root)
    back.add_dataset("train", torch.randn(8, 4), torch.randint(0, 2, (8,)))
    if loss == "shorter":
        back.add_dataset("extra", torch.randn(4, 4), torch.randint(0, 2, (4,)))
    back.restore_state()
    p = back.proposals_by_id[pid]
    assert p.status == "halted", p
    assert ("without the dataset(s) ['extra']" if loss == "gone" else "could not be run again") \
        in p.reason
    assert back.audit[-1].op == "halt" and back.audit[-1].segment == pid


def test_a_torn_last_audit_line_does_not_swallow_the_next_entry(tmp_path: Path) -> None:
    """A crash or a full disk can leave audit.jsonl's last line torn: the next entry was glued
    onto it, and the reader skipped both (a restore's own halt was lost)."""
    root = tmp_path / "state"
    host = _host(root)
    pid = _middle(host)
    host.close()
    with open(root / "audit.jsonl", "a") as f:
        f.write('{"time":1.0,"caller":"x","op":"forw')  # torn: no newline
    again = _host(root)
    again.halt(pid, "stopped by the data owner")
    again.close()
    last = _host(root).audit[-1]
    assert last.op == "halt" and last.segment == pid
