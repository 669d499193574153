"""The data owner's step state of an encrypted input segment (real CKKS, in process): a
refused encrypted forward leaves nothing pending (no gradient can land on it), a discarded
step is never decrypted, an evaluation batch may run between a training forward and its
backward (as in plain split learning), and a gradient that cannot be applied after its
decryption halts the segment."""

from __future__ import annotations

import re
import warnings
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
    split_model,
)
from syft_split.errors import ApprovalError, HEError, NonFiniteError, ProtocolError
from syft_split.he import protect
from syft_split.topology import MODEL_OWNER

from .test_he_restart import B, X, Y

pytestmark = [pytest.mark.he]


def _setup(level: str = "A", x: torch.Tensor = X, test: torch.Tensor | None = None,
           model: nn.Module | None = None, cut: str = "1"
           ) -> tuple[DataOwnerHost, InProcessTransport, SplitSession, str]:
    """A data owner holding ``x`` (and ``test``), and a session whose encrypted input segment
    it approved."""
    host = DataOwnerHost("h")
    host.add_dataset("train", x, Y)
    host.add_dataset("test", x[:B] if test is None else test, Y[:B])
    t = InProcessTransport([host])
    torch.manual_seed(3)
    if model is None:
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(),
                              nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    plan = SplitPlan.vanilla(split_model(model, cut), "h")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # level B: SGD for the other layers too
        plan = protect(plan, level=level, lr=0.05 if level == "B" else None, batch_size=B)
    session = SplitSession(plan, t, optimizer=OptimizerSpec("sgd", lr=0.05))
    (pid,) = session.propose()["h"]
    host.approve(pid)
    return host, t, session, pid


class _Driver:
    """The model owner's encrypted layer, driven by hand (following the protocol unless a
    test deviates)."""

    def __init__(self, t: InProcessTransport, pid: str) -> None:
        from he_layers import HEServer, ServerContext

        self.t, self.pid = t, pid
        ctx = ServerContext.from_bytes(self.call("he_context")["context"])
        torch.manual_seed(1)
        self.server = HEServer(ctx, torch.randn(8, 16, dtype=torch.float64) * 0.3,
                               torch.zeros(8, dtype=torch.float64))

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        return self.t.call("h", op, segment=self.pid, **fields)

    def forward(self, idx: torch.Tensor, train: bool = True) -> bytes:
        """The data owner's encrypted input, run through the server: the masked output."""
        return self.server.forward(self.call("forward", indices=idx, train=train)["he_input"])

    def grad_message(self, idx: torch.Tensor, delta: float = 1.0) -> bytes:
        """A training forward and its output, then the gradient message for dL/dz = delta."""
        z = self.server.receive_output(self.call("he_output", msg=self.forward(idx))["msg"])
        return self.server.backward(torch.full_like(z, delta))


def _weights(host: DataOwnerHost, pid: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in host.owned_runtime(pid).module.parameters()]


def test_a_refused_encrypted_forward_leaves_nothing_pending() -> None:
    """A training forward whose encryption the data owner refuses (|x| > x_bound) leaves no
    forward pending and its dropout draws undone: after a discard, the gradient message of
    the discarded step cannot be applied to it (it was, to records never answered)."""
    x = X.clone()
    x[32:48] *= 1000.0  # their activation exceeds x_bound
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    host, t, _, pid = _setup(x=x, model=model, cut="2")
    rt = host.owned_runtime(pid)
    d = _Driver(t, pid)
    stale = d.grad_message(torch.arange(B))  # step 1, then discarded
    assert d.call("discard", step=1)["discarded"]
    before, rng = _weights(host, pid), rt.torch_rng.clone()
    with pytest.raises(HEError, match="x_bound") as err:
        d.call("forward", indices=torch.arange(32, 48), train=True)
    # the refusal names the agreed bound only: the activation's size is private (it said
    # "|x| reaches 812.3", and the model owner chooses x_bound and the records)
    assert set(re.findall(r"\d+(?:\.\d+)?", str(err.value))) <= {"64", "64.0"}, err.value
    assert not d.call("status")["pending"]
    assert rt.pending_output is None and rt.pending_source is None
    assert torch.equal(rt.torch_rng, rng)  # as if it never ran
    with pytest.raises(ProtocolError):
        d.call("he_grad", msg=stale, step=2)
    assert rt.steps == 0 and all(torch.equal(a, b) for a, b in zip(before, _weights(host, pid),
                                                                    strict=True))
    # the segment goes on with a step of its own
    d.server.receive_gradients(d.call("he_grad", msg=d.grad_message(torch.arange(B)),
                                      step=2)["msg"])
    assert rt.steps == 1


def test_a_discarded_step_is_never_decrypted() -> None:
    """After a discard, neither the discarded forward's output nor its gradient message is
    decrypted (the data owner's HE client forgets the step too)."""
    host, t, _, pid = _setup()
    d = _Driver(t, pid)
    masked = d.forward(torch.arange(B))
    d.call("discard", step=1)
    with pytest.raises(ProtocolError):
        d.call("he_output", msg=masked)
    grad = d.grad_message(torch.arange(B, 2 * B))
    d.call("discard", step=2)
    with pytest.raises(ProtocolError):
        d.call("he_grad", msg=grad, step=3)
    rt = host.owned_runtime(pid)
    assert rt.steps == 0 and rt.he.outputs == 0 and rt.he.grads == 0
    assert rt.he.costs.as_dict()["steps"] == 2  # both forwards were encrypted, nothing more


def _step(session: SplitSession, i: int, between: Any = None) -> Any:
    """Training step ``i``; ``between`` (if given) runs after its forward, before its
    backward, and what it returns is returned."""
    idx = torch.arange(B) + B * i
    session.zero_grad()
    loss, _ = session.loss("h", idx, Y[idx])
    seen = between() if between is not None else None
    loss.backward()
    session.step()
    return seen


def _evaluate(session: SplitSession) -> Any:
    return session.evaluate_batch("h", torch.arange(B), Y[:B], dataset="test")


def _layer(session: SplitSession, host: DataOwnerHost, pid: str) -> list[torch.Tensor]:
    """The encrypted layer's true weight W_s + A (level A: A = 0, W trained in its module)
    and the model owner's layers."""
    assert session.he is not None
    share = host.owned_runtime(pid).he.weight_share
    top = [p.detach().clone() for n in session.plan.nodes if n.owner == MODEL_OWNER
           for p in n.module.parameters()]
    return [session.he.weight + share.to(session.he.weight.dtype), *top]


@pytest.mark.parametrize("level", ["A", "B"])
def test_an_evaluation_batch_between_forward_and_backward(level: str) -> None:
    """Plain split learning allows it: the encrypted step goes on after the evaluation
    batch and ends where a run that evaluates before the forward ends (same weights at
    both points, so the same evaluation too)."""
    ref_host, _, ref, ref_pid = _setup(level)
    host, _, session, pid = _setup(level)
    for i in range(3):
        want = _evaluate(ref)
        _step(ref, i)
        got = _step(session, i, between=lambda: _evaluate(session))
        assert got.count == want.count and abs(got.loss - want.loss) < 1e-4
    assert host.owned_runtime(pid).steps == 3
    for a, b in zip([*_weights(host, pid), *_layer(session, host, pid)],
                    [*_weights(ref_host, ref_pid), *_layer(ref, ref_host, ref_pid)],
                    strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_a_refused_evaluation_between_forward_and_backward_keeps_the_training_step() -> None:
    """An evaluation batch the data owner refuses to encrypt (|x| > x_bound) between a
    training forward and its backward: the training step stays pending on both sides (the
    model owner does not discard it) and completes."""
    host, t, session, pid = _setup(test=X[:B] * 1000.0)

    def refused() -> None:
        with pytest.raises(HEError, match="x_bound"):
            session.evaluate_batch("h", torch.arange(B), Y[:B], dataset="test")
        assert t.call("h", "status", segment=pid)["pending"]

    for i in range(2):
        _step(session, i, between=refused)
    assert host.owned_runtime(pid).steps == 2


def test_a_gradient_that_cannot_be_applied_after_decryption_halts() -> None:
    """Level B: the data owner decrypted the gradient message (its share moved) but the
    step cannot be applied (non-finite weight gradients): the segment is halted with the
    reason, its weights untouched, like a refused dL/dx."""
    x = X.clone()
    x[:, 0] = 3e38  # finite, but times any gradient the weight gradient overflows
    host, t, _, pid = _setup("B", x=x)
    rt = host.owned_runtime(pid)
    with torch.no_grad():
        rt.module[0].weight[:, 0] = 0.0  # the activation stays small (within x_bound)
        rt.module[0].bias.fill_(1.0)
    d = _Driver(t, pid)
    before, share = _weights(host, pid), rt.he.weight_share.clone()
    msg = d.grad_message(torch.arange(B), delta=10.0)
    with pytest.raises(NonFiniteError):
        d.call("he_grad", msg=msg, step=1)
    assert not torch.equal(share, rt.he.weight_share)  # decrypted: the share moved
    p = host.proposal(pid)
    assert p.status == "halted" and "could not be applied" in p.reason
    assert rt.steps == 0 and all(torch.equal(a, b) for a, b in zip(before, _weights(host, pid),
                                                                    strict=True))
    with pytest.raises(ApprovalError, match="halted"):
        d.call("forward", indices=torch.arange(B), train=True)


def test_a_plain_gradient_never_reaches_an_encrypted_segment() -> None:
    """The gradient of an encrypted segment arrives only through he_grad, once per step: a
    plain one (``backward``, or ``grad`` carried by the next ``forward``) is refused, nothing
    applied, and the step then completes through he_grad."""
    host, t, _, pid = _setup()
    rt = host.owned_runtime(pid)
    d = _Driver(t, pid)
    z = d.server.receive_output(d.call("he_output", msg=d.forward(torch.arange(B)))["msg"])
    before = _weights(host, pid)
    plain = torch.ones(B, 16)
    with pytest.raises(ProtocolError, match="only through 'he_grad'"):
        d.call("backward", grad=plain, step=1)
    with pytest.raises(ProtocolError, match="only through 'he_grad'"):
        d.call("forward", indices=torch.arange(B, 2 * B), grad=plain, step=1)
    assert rt.steps == 0 and rt.pending_output is not None
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(host, pid), strict=True))
    d.server.receive_gradients(d.call("he_grad", msg=d.server.backward(torch.ones_like(z)),
                                      step=1)["msg"])
    assert rt.steps == 1
