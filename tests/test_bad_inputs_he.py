"""The bad-input matrix for the HE ops of an encrypted input segment (real CKKS, level A): one
output and one gradient decryption per step, in order, of the current step; a refused message
changes nothing; an invalid plaintext dL/dx after decryption halts the segment. The harness
(deployment, state snapshots, intruder calls) is the one of ``test_bad_inputs.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from syft_split import (
    ApprovalError,
    AuthorizationError,
    NonFiniteError,
    OptimizerSpec,
    ProtocolError,
    ValidationError,
    WireError,
)
from syft_split.spec import module_to_spec, spec_state

from .test_bad_inputs import (
    HUGE,
    PARTY,
    B,
    _as_intruder,
    _other_segment,
    _same,
    _snapshot,
    _t,
    deployment,
)


@pytest.fixture(scope="module")
def dep() -> Any:
    return deployment()


class _HEDriver:
    """The model owner's side of an encrypted input segment (level A), following the protocol
    unless a test deviates."""

    def __init__(self, dep: Any, pid: str) -> None:
        from he_layers import HEServer, ServerContext

        self.dep, self.pid = dep, pid
        ctx = ServerContext.from_bytes(self.call("he_context")["context"])
        torch.manual_seed(1)
        self.server = HEServer(ctx, torch.randn(8, 16).double() * 0.1, torch.zeros(8).double())
        self.delta = _t((B, 8), 0.1, 21).double()

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        return self.dep.transport.call(PARTY, op, segment=self.pid, **fields)

    def forward(self, idx: torch.Tensor, train: bool = True) -> bytes:
        return self.server.forward(self.call("forward", indices=idx, train=train)["he_input"])

    def output(self, masked: bytes) -> None:
        self.server.receive_output(self.call("he_output", msg=masked)["msg"])

    def finish(self, grad_msg: bytes) -> None:
        self.server.receive_gradients(self.call("he_grad", msg=grad_msg)["msg"])
        self.server.apply_sgd()


def _he_segment(dep: Any) -> tuple[str, _HEDriver]:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh())
    agreement = {"level": "A", "lr": 0.05, "batch_size": B, "d_in": 16, "d_out": 8,
                 "bias": True, "params": {}, "options": {}}
    response = dep.transport.call(
        PARTY, "propose", role="input", spec=module_to_spec(module), datasets=["train"],
        max_batch=B, optimizer=OptimizerSpec("adam", lr=0.05).to_json(), he=agreement,
        **{f"state/{k}": v for k, v in spec_state(module).items()})
    pid = str(response["segment"])
    dep.owners[PARTY].approve(pid)
    return pid, _HEDriver(dep, pid)


def _dx(grad_msg: bytes, value: float) -> bytes:
    """The masked-gradient message with its plaintext dL/dx (level A) replaced."""
    import numpy as np

    from he_layers.wire import array_to_bytes, decode_frame, encode_frame

    head, blobs = decode_frame(grad_msg, "masked_grad")
    head = {k: v for k, v in head.items() if k not in ("kind", "blob_sizes")}
    return encode_frame("masked_grad", head, [*blobs[:-1], array_to_bytes(np.full((B, 16), value))])


def _nan_scale(d: _HEDriver, masked: bytes) -> bytes:
    """The masked-output message with its first ciphertext's scale set to NaN (SEAL loads it;
    a NaN passed the scale check, which compared with ``>``)."""
    from he_layers._seal_io import load_ciphertext, to_bytes
    from he_layers.wire import decode_frame, encode_frame

    head, blobs = decode_frame(masked, "masked_output")
    head = {k: v for k, v in head.items() if k not in ("kind", "blob_sizes")}
    ct = load_ciphertext(d.server.context.seal_context, blobs[0])
    ct.scale = float("nan")
    return encode_frame("masked_output", head, [to_bytes(ct), *blobs[1:]])


# (point where the bad message arrives, the message, expected error, whether it halts)
HE_CASES: dict[str, tuple[str, Callable[..., Any], type[Exception], bool]] = {
    "he_grad_before_output": ("forward", lambda d, m1, g1, m2, g2: d.call("he_grad", msg=g1),
                              ProtocolError, False),
    "he_output_stale_step": ("forward", lambda d, m1, g1, m2, g2: d.call("he_output", msg=m1),
                             ProtocolError, False),
    "he_output_garbage": ("forward", lambda d, m1, g1, m2, g2: d.call("he_output", msg=b"x" * 99),
                          ValidationError, False),
    "he_output_not_bytes": ("forward", lambda d, m1, g1, m2, g2: d.call(
        "he_output", msg=torch.zeros(3)), WireError, False),
    "he_output_by_intruder": ("forward", lambda d, m1, g1, m2, g2: _as_intruder(
        "he_output", msg=m2)(d.dep, d.pid), AuthorizationError, False),
    "he_output_unknown_segment": ("forward", lambda d, m1, g1, m2, g2: _other_segment(
        "he_output", msg=m2)(d.dep, d.pid), ApprovalError, False),
    "he_output_nan_scale": ("forward", lambda d, m1, g1, m2, g2: d.call(
        "he_output", msg=_nan_scale(d, m2)), ValidationError, False),
    "he_output_twice": ("output", lambda d, m1, g1, m2, g2: d.call("he_output", msg=m2),
                        ProtocolError, False),
    "he_grad_stale_step": ("output", lambda d, m1, g1, m2, g2: d.call("he_grad", msg=g1),
                           ProtocolError, False),
    "he_grad_garbage": ("output", lambda d, m1, g1, m2, g2: d.call("he_grad", msg=g2[:-5]),
                        ValidationError, False),
    "he_grad_dx_nan": ("output", lambda d, m1, g1, m2, g2: d.call(
        "he_grad", msg=_dx(g2, float("nan"))), NonFiniteError, False),
    "he_grad_dx_huge": ("output", lambda d, m1, g1, m2, g2: d.call(
        "he_grad", msg=_dx(g2, HUGE)), ValidationError, True),
}


@pytest.mark.he
@pytest.mark.parametrize("name", sorted(HE_CASES))
def test_he_bad_inputs(dep, name: str) -> None:
    """HE ops: one output and one gradient decryption per step, in order, of the current
    step; a refused message changes nothing; an invalid plaintext dL/dx after decryption
    halts the segment (weights and optimizer untouched)."""
    point, bad, expected, halts = HE_CASES[name]
    pid, d = _he_segment(dep)
    host = dep.owners[PARTY]
    m1 = d.forward(torch.arange(B))
    d.output(m1)
    g1 = d.server.backward(d.delta)
    d.finish(g1)
    m2 = d.forward(torch.arange(B, 2 * B))
    g2 = b""
    if point == "output":
        d.output(m2)
        g2 = d.server.backward(d.delta)
    rt = host.runtimes[pid]
    before = _snapshot(rt)
    gate = (rt.he.step, rt.he.outputs, rt.he.grads)
    with pytest.raises(expected) as info:
        bad(d, m1, g1, m2, g2)
    assert isinstance(info.value, expected)
    after = _snapshot(rt)
    for key in ("weights", "optimizer", "grads", "steps"):
        assert _same(before[key], after[key]), f"{name} changed {key}"
    if name == "he_grad_dx_nan" and rt.proposal.status == "halted":
        halts = True  # refused after decryption (by the guard) rather than before (he_layers)
    if halts:
        assert rt.proposal.status == "halted" and "dL/dx" in rt.proposal.reason
        with pytest.raises(ApprovalError, match="halted"):
            d.forward(torch.arange(B))
        return
    for key in ("pending", "pending_values", "status"):
        assert _same(before[key], after[key]), f"{name} changed {key}"
    assert (rt.he.step, rt.he.outputs, rt.he.grads) == gate
    if point == "forward":  # the step goes on as the protocol says
        d.output(m2)
        g2 = d.server.backward(d.delta)
    d.finish(g2)
    assert rt.steps == 2
    with pytest.raises(ProtocolError):  # and the decryption budget of step 2 is spent
        d.call("he_output", msg=m2)
