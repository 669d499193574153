"""``--connect`` as documented: a data owner runs its own HTTP datasite in another process
(plain PySyft: ``sy.orchestra.launch``, ``sy.Dataset``/``sy.Asset``, ``register``, then
``install``) and approves from its own client; the model owner's demo connects by URL and
trains. Also: PySyft's and uvicorn's output stays out of the user's (``--verbose`` shows it).
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from syft_split import demo
from syft_split.transport.pysyft import free_port, launch_datasite

pytestmark = pytest.mark.pysyft

SCRIPT = Path(__file__).resolve().parents[2] / "tutorials" / "digits_datasite.py"


class _DataOwner:
    """The data-owner script in its own process; its output collected line by line."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "TQDM_DISABLE": "1"}
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"no {prefix!r} from the data owner:\n{''.join(self.lines)}")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM (or Ctrl-C): the script lands its datasite
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reader.join(10)
        return "".join(self.lines)


@pytest.mark.slow
def test_demo_connects_to_a_datasite_its_data_owner_runs(tmp_path, capfd) -> None:
    port, password = free_port(), secrets.token_hex(8)
    owner = _DataOwner("--party", "hospital_a", "--port", str(port), "--shares", "1",
                       "--records", "700", "--model-owner", "mo@example.org",
                       "--model-owner-password", password, "--approve", "auto",
                       "--serve-for", "600")
    try:
        ready = owner.wait_for("READY", timeout=180)
        assert f"http://localhost:{port}" in ready
        capfd.readouterr()
        accuracy = demo.main(["--connect", f"hospital_a=http://localhost:{port}",
                              "--email", "mo@example.org", "--password", password,
                              "--epochs", "2", "--leakage-budget", "2", "--approval-timeout",
                              "180", "--runs-dir", str(tmp_path)])
        out = capfd.readouterr()
    finally:
        log = owner.stop()
    assert accuracy > 0.5  # 2 epochs on 525 training records (chance: 0.1)
    assert f"test_accuracy={accuracy:.4f}" in out.out
    # the data owner reviewed and approved from its own client, then landed its datasite
    assert "Proposal hospital_a/seg1 from mo@example.org" in log
    assert "approved hospital_a/seg1" in log and "landed hospital_a" in log
    # nothing of PySyft's or uvicorn's chatter reached the model owner's output
    for noise in ("Logged into", "INFO:", "CRITICAL", "SyftWarning", "Uploading"):
        assert noise not in out.out + out.err


def test_launch_is_quiet_unless_verbose(capfd, monkeypatch) -> None:
    import torch

    from syft_split.datasite import publish_dataset

    level = logging.getLogger().level
    capfd.readouterr()
    with launch_datasite(f"t-quiet-{secrets.token_hex(3)}", http=True) as site:
        publish_dataset(site.root, "train", torch.rand(8, 3), torch.randint(0, 2, (8,)))
        site.register("quiet@example.org", "quiet-password")
        time.sleep(0.5)  # the server's own log lines, had they reached us
    out = capfd.readouterr()
    assert out.out + out.err == ""
    assert logging.getLogger().level == level  # PySyft sets the root logger to CRITICAL
    monkeypatch.setenv("SYFT_SPLIT_VERBOSE", "1")
    with launch_datasite(f"t-verbose-{secrets.token_hex(3)}") as site:
        site.register("loud@example.org", "loud-password")
    out = capfd.readouterr()
    assert "Logged into" in out.out
