"""State lasts for the latency-tolerant schedules: pipelined and local-loss steps a data owner
applied, and the auxiliary head it approved, survive a crash or a clean restart of the data
owner; the model owner cannot checkpoint these schedules (their requests carry no step ids),
so ``fit`` refuses to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from syft_split import DataOwnerHost, OptimizerSpec, SplitPlan, SplitSession, Trainer, persist
from syft_split.errors import ApprovalError, ConfigError, LeakageHaltError, ValidationError
from syft_split.local_loss import LocalLoss
from syft_split.topology import RELEASED
from syft_split.transport.inprocess import InProcessTransport

N = 64
OPT = OptimizerSpec("sgd", lr=0.1, momentum=0.9)  # momentum: the optimizer state matters


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 1, 4, 4, generator=g), torch.randint(0, 3, (N,), generator=g)


def _host(state_dir: Path | None) -> DataOwnerHost:
    """The data owner as it (re)starts: datasets, then whatever its state directory holds."""
    host = DataOwnerHost("h", state_dir=state_dir)
    x, y = _data()
    host.add_dataset("train", x, y)
    host.restore_state()
    return host


def _plan(local: bool) -> SplitPlan:
    torch.manual_seed(0)
    bottom = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh())
    top = nn.Linear(8, 3)
    loss = LocalLoss(nn.Linear(8, 3)) if local else None
    return SplitPlan.vanilla([bottom, top], "h", labels=RELEASED, local_loss=loss,
                             datasets=["train"])


def _start(host: DataOwnerHost, *, local: bool, approve: bool = True
            ) -> tuple[InProcessTransport, str, SplitSession]:
    """Propose the plan's input segment to ``host`` (and approve it): transport, segment id,
    session."""
    t = InProcessTransport([host])
    session = SplitSession(_plan(local), t, optimizer=OPT)
    [pid] = session.propose()["h"]
    if approve:
        host.approve(pid, **({"local_loss": True} if local else {}))
    return t, pid, session


def _state(host: DataOwnerHost, pid: str) -> dict[str, Any]:
    """Everything a step changes at the data owner: segment and head weights and optimizer
    states, the step count."""
    rt = host.runtimes[pid]
    out: dict[str, Any] = {"weights": host.export_weights(pid), "steps": rt.steps,
                           "optim": host.optimizer_state(pid)["state"]}
    head = host.families["local_loss"].heads.get(pid)  # type: ignore[attr-defined]
    if head is not None:
        out["head"] = dict(head.module.state_dict())
        out["head_optim"] = head.optim.state_dict()["state"]
    return out


def _pipelined_steps(t: InProcessTransport, pid: str) -> None:
    """Two pipelined forwards, a forward with the oldest one's gradient, then a gradient."""
    g = torch.Generator().manual_seed(1)
    t.call("h", "pipe_forward", segment=pid, seq=0, indices=torch.arange(8))
    t.call("h", "pipe_forward", segment=pid, seq=1, indices=torch.arange(8, 16))
    t.call("h", "pipe_forward", segment=pid, seq=2, indices=torch.arange(16, 24),
           grad=torch.randn(8, 8, generator=g))
    r = t.call("h", "pipe_backward", segment=pid, seq=3, grad=torch.randn(8, 8, generator=g))
    assert r["steps"] == 2


def _local(t: InProcessTransport, pid: str, start: int, sizes: list[int]) -> dict[str, Any]:
    idx = torch.arange(start, start + sum(sizes))
    return t.call("h", "local_forward", segment=pid, indices=idx, sizes=sizes)


def test_pipelined_steps_survive_a_crash_restart_of_the_data_owner(tmp_path: Path) -> None:
    host = _host(tmp_path)
    t, pid, _ = _start(host, local=False)
    before = _state(host, pid)
    _pipelined_steps(t, pid)
    applied = _state(host, pid)
    assert applied["steps"] == 2 and not torch.equal(applied["weights"]["1.weight"],
                                                      before["weights"]["1.weight"])
    restarted = _host(tmp_path)  # a crash: the first host never saved on shutdown
    t.add_host(restarted, replace=True)
    assert_close(_state(restarted, pid), applied, rtol=0, atol=0)
    assert t.call("h", "status", segment=pid)["steps"] == 2
    # the pending forwards died with the process: the refusal says how to go on
    with pytest.raises(ValidationError, match="start again with seq 0"):
        t.call("h", "pipe_forward", segment=pid, seq=4, indices=torch.arange(8),
               grad=torch.ones(8, 8))
    assert t.call("h", "pipe_forward", segment=pid, seq=0, indices=torch.arange(8))["pending"] == 1


@pytest.mark.parametrize("clean", [False, True])
def test_local_loss_steps_and_the_approved_head_survive_a_restart(tmp_path: Path,
                                                                 clean: bool) -> None:
    host, reference = _host(tmp_path), _host(None)  # the reference never restarts
    (t, pid, _), (t_ref, pid_ref, _) = _start(host, local=True), _start(reference, local=True)
    assert pid == pid_ref
    for transport in (t, t_ref):
        _local(transport, pid, 0, [8, 8, 8, 8])
    trained = _state(host, pid)
    assert trained["steps"] == 4
    assert_close(trained, _state(reference, pid), rtol=0, atol=0)
    if clean:
        host.close()
    restarted = _host(tmp_path)
    t.add_host(restarted, replace=True)
    # the same weights, head, optimizer states and step count as before the restart
    assert_close(_state(restarted, pid), trained, rtol=0, atol=0)
    assert "LOCAL LOSS" in restarted.review(pid)
    # and local_forward goes on exactly as without the restart
    r, r_ref = _local(t, pid, 32, [8, 8]), _local(t_ref, pid, 32, [8, 8])
    assert_close(r, r_ref, rtol=0, atol=0)
    assert_close(_state(restarted, pid), _state(reference, pid), rtol=0, atol=0)
    assert _state(restarted, pid)["steps"] == 6


def test_a_head_proposed_before_a_restart_can_still_be_approved(tmp_path: Path) -> None:
    host = _host(tmp_path)
    t, pid, _ = _start(host, local=True, approve=False)
    proposed = dict(host.families["local_loss"].heads[pid].module.state_dict())  # type: ignore
    restarted = _host(tmp_path)  # crash before the data owner decided
    t.add_host(restarted, replace=True)
    assert "LOCAL LOSS" in restarted.review(pid)
    with pytest.raises(ConfigError, match="local_loss=True"):
        restarted.approve(pid)
    restarted.approve(pid, local_loss=True)
    head = restarted.families["local_loss"].heads[pid]  # type: ignore[attr-defined]
    assert_close(dict(head.module.state_dict()), proposed, rtol=0, atol=0)
    assert _local(t, pid, 0, [8])["aux_correct"] >= 0


def test_a_saved_head_that_cannot_be_rebuilt_halts_its_segment(tmp_path: Path) -> None:
    host = _host(tmp_path)
    t, pid, _ = _start(host, local=True)
    _local(t, pid, 0, [8])
    host.close()
    [path] = (tmp_path / "segments").iterdir()
    snap = persist.load(path)
    snap["families"]["local_loss"]["weights"]["0.weight"] = torch.zeros(2, 2)  # damaged
    persist.save(path, snap)
    restarted = _host(tmp_path)
    t.add_host(restarted, replace=True)
    assert restarted.proposal(pid).status == "halted"
    assert "auxiliary head" in restarted.proposal(pid).reason
    with pytest.raises((ApprovalError, LeakageHaltError), match="auxiliary head"):
        _local(t, pid, 8, [8])


@pytest.mark.parametrize("local", [False, True])
def test_fit_refuses_checkpoints_for_the_latency_tolerant_schedules(tmp_path: Path,
                                                                   local: bool) -> None:
    host = _host(None)
    t, pid, session = _start(host, local=local)
    trainer = Trainer(session, batch_size=8, progress=False, measure_leakage=False,
                      test_dataset=None, gradient_delay=0 if local else 1)
    before, calls = host.export_weights(pid), t.calls
    what = "a local_loss plan" if local else "gradient_delay=1"
    for kwargs in ({"checkpoint_dir": tmp_path}, {"checkpoint_dir": tmp_path, "resume": True},
                   {"resume": True}):
        with pytest.raises(ConfigError, match=f"cannot be used with {what}.*gradient_delay=0"):
            trainer.fit(1, verbose=False, **kwargs)
    assert t.calls == calls and not any(tmp_path.iterdir())  # nothing ran, nothing written
    assert_close(host.export_weights(pid), before, rtol=0, atol=0)
    assert trainer.fit(1, verbose=False).steps == N // 8  # without a checkpoint it trains
