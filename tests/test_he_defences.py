"""An encrypted segment gets every defence a plain one does (found in review): a malicious
model owner can decrypt what it releases (SECURITY.md), so the approved activation noise is
in what is encrypted, and the leakage watch measures and bounds it like a plain segment."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from syft_split import HostLimits, LeakageHaltError, OptimizerSpec, SplitPlan, SplitSession, Trainer
from syft_split.deploy import inprocess
from syft_split.he import protect
from syft_split.spec import module_to_spec, spec_state
from syft_split.topology import DATA_OWNER, MODEL_OWNER, Node, Task

pytestmark = [pytest.mark.he]

B = 8


def _recovered_activation_error(defences: dict[str, float]) -> float:
    """An honest level-A run with an invertible layer at the model owner (d_out = d_in): it
    solves z = x W^T + b for the activation x; the error against the noise-free activation."""
    from he_layers import HEServer, ServerContext

    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 1, 8, 8, generator=g)
    dep = inprocess({"h": {"train": (x, torch.randint(0, 10, (48,), generator=g))}})
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh())
    agreement = {"level": "A", "lr": 0.05, "batch_size": B, "d_in": 16, "d_out": 16,
                 "bias": True, "params": {}, "options": {}}
    pid = dep.transport.call("h", "propose", role="input", spec=module_to_spec(module),
                             datasets=["train"], max_batch=B,
                             optimizer=OptimizerSpec("adam", lr=0.05).to_json(), he=agreement,
                             defences=defences,
                             **{f"state/{k}": v for k, v in spec_state(module).items()})["segment"]
    dep.owners["h"].approve(pid)

    def call(op: str, **f: object) -> dict:
        return dep.transport.call("h", op, segment=pid, **f)

    torch.manual_seed(5)
    w = torch.randn(16, 16).double() * 0.2
    server = HEServer(ServerContext.from_bytes(call("he_context")["context"]), w,
                      torch.zeros(16).double())
    idx = torch.arange(B)
    masked = server.forward(call("forward", indices=idx, train=False)["he_input"])
    z = server.receive_output(call("he_output", msg=masked)["msg"]).double()
    x_hat = torch.linalg.solve(w, z.T).T
    with torch.no_grad():
        act = dep.owners["h"].runtimes[pid].module(x[idx]).double()
    return float((x_hat - act).abs().max())


def test_approved_activation_noise_is_in_what_is_encrypted() -> None:
    assert _recovered_activation_error({}) < 1e-4  # the model owner's solve is exact
    assert _recovered_activation_error({"noise_sigma": 1.0}) > 0.5  # sigma 1 reaches it


def test_the_leakage_watch_bounds_an_encrypted_segment() -> None:
    """Approved with a leakage bound the current weights are already past, an encrypted
    segment is halted by the watch at its first measured step, as a plain one is."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    dep = inprocess({"h": {"train": (x, y)}}, limits=HostLimits(watch_every=1))
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                      nn.Linear(16, 10))
    plan = SplitPlan([Node(m[:3], DATA_OWNER), Node(m[3], MODEL_OWNER, (0,)),
                      Node(m[4:], MODEL_OWNER, (1,))], [Task(2)], ["h"], max_batch=B,
                     datasets=["train"])
    session = SplitSession(protect(plan, level="A", batch_size=B), dep.transport,
                           optimizer=OptimizerSpec("adam", lr=1e-2))
    (pid,) = session.propose()["h"]
    host = dep.owners["h"]
    assert "leakage measured here" in host.review(pid)
    host.approve(pid, leakage_bound={"inversion_ratio": 1e9})
    assert "watch" in host.runtimes[pid].extra
    trainer = Trainer(session, batch_size=B, progress=False, measure_leakage=False,
                      test_dataset=None, labels={"h": {"train": y}})
    with pytest.raises(LeakageHaltError, match="inversion ratio"):
        trainer.fit(1, verbose=False)
    p = host.proposal(pid)
    assert (p.status, p.halted_by) == ("halted", "watch")
