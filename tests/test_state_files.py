"""The data owner's state directory as files: who may read them, what a failed write leaves,
and what a restart says about damaged or missing ones."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from syft_split import DataOwnerHost, persist, wire
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
