"""Bad input at a party boundary raises the documented error and leaves state intact.

Each case runs the same short protocol twice -- once clean, once with the bad message slipped
in -- and requires identical final weights: the data owner's weights, optimizer state and
pending forward all survived the bad message, and training continued.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from syft_split import (
    DTypeError,
    EmptyBatchError,
    NonFiniteError,
    OptimizerSpec,
    PayloadTooLargeError,
    ProtocolError,
    ShapeError,
    SplitError,
    SplitPlan,
    SplitSession,
    ValidationError,
    WireError,
    split_model,
)
from syft_split.models import digits_cnn

from .conftest import DEPLOY_KINDS, deployed

PARTY = "clinic"
ACT = (8, 4, 4, 4)  # batch 8 of the first segment's (4, 4, 4) activation


def _grad(**kw: Any) -> torch.Tensor:
    return torch.full(ACT, 0.01, **kw)


def _call(op: str, **fields: Any) -> Callable[[Any, str], Any]:
    def send(transport: Any, seg: str) -> Any:
        return transport.call(PARTY, op, segment=seg, **fields)
    return send


def _nan() -> torch.Tensor:
    g = _grad()
    g[0, 0, 0, 0] = float("nan")
    return g


def _inf() -> torch.Tensor:
    g = _grad()
    g[1, 2, 3, 0] = float("inf")
    return g


BAD: dict[str, tuple[type[Exception], Callable[[Any, str], Any]]] = {
    "wrong_shape_grad": (ShapeError, _call("backward", grad=torch.zeros(8, 4, 4, 5))),
    "wrong_batch_grad": (ShapeError, _call("backward", grad=torch.zeros(7, 4, 4, 4))),
    "wrong_dtype_grad": (DTypeError, _call("backward", grad=_grad(dtype=torch.float64))),
    "nan_grad": (NonFiniteError, _call("backward", grad=_nan())),
    "inf_grad": (NonFiniteError, _call("backward", grad=_inf())),
    "empty_batch": (EmptyBatchError, _call("forward", indices=torch.zeros(0, dtype=torch.int64),
                                           grad=_grad())),
    "oversized_payload": (PayloadTooLargeError,
                          _call("backward", grad=torch.zeros(512, 1024))),
    "index_out_of_range": (ValidationError, _call("forward", grad=_grad(),
                                                  indices=torch.tensor([0, 10_000]))),
    "batch_over_max": (ValidationError, _call("forward", grad=_grad(),
                                              indices=torch.zeros(65, dtype=torch.int64))),
    "float_indices": (DTypeError, _call("forward", grad=_grad(), indices=torch.zeros(3))),
    "forward_while_pending": (ProtocolError, _call("forward", indices=torch.arange(4))),
    "unknown_op": (ProtocolError, _call("steal_weights")),
    "garbage_bytes": (WireError, lambda t, seg: _raise_from(t.request(PARTY, b"\x00" * 40))),
}


def _raise_from(raw: bytes) -> None:
    from syft_split import wire
    from syft_split.errors import error_from_wire

    response = wire.decode(raw)
    raise error_from_wire(response["error"], response["message"])


@pytest.fixture(scope="module", params=DEPLOY_KINDS)
def deployment(request: pytest.FixtureRequest) -> Iterator[Any]:
    """One deployment per kind for every case (each run proposes its own segment)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)
    with deployed(request.param, {PARTY: {"train": (x, y), "test": (x, y)}},
                  max_request_bytes=1_000_000) as dep:
        yield dep


def _run(dep: Any, bad: Callable[[Any, str], Any] | None,
         expected: type[Exception] | None) -> list[torch.Tensor]:
    torch.manual_seed(0)
    segments = split_model(digits_cnn(channels=4, hidden=8), "pool1")
    plan = SplitPlan.vanilla(segments, PARTY, max_batch=64)
    session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("adam", lr=0.05))
    (pid,) = session.propose()[PARTY]
    dep.approve_all({PARTY: [pid]})
    seg = session.remote[(PARTY, 0)]
    seg.forward(indices=torch.arange(8))
    seg.backward(_grad())          # held (fused), so the optimizer has state after the next call
    seg.forward(indices=torch.arange(8, 16))  # applies step 1, leaves forward 2 pending
    if bad is not None:
        assert expected is not None
        with pytest.raises(expected):
            bad(dep.transport, pid)
    seg.backward(_grad() * 2)      # training continues: the pending forward is still there
    seg.flush()
    return list(dep.owners[PARTY].export_weights(pid).values())


@pytest.fixture(scope="module")
def clean(deployment: Any) -> list[torch.Tensor]:
    """The final weights of the protocol without a bad message."""
    return _run(deployment, None, None)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_and_leaves_state_intact(deployment: Any, clean: list[torch.Tensor],
                                                  case: str) -> None:
    expected, bad = BAD[case]
    after_bad = _run(deployment, bad, expected)
    assert all(torch.equal(a, b) for a, b in zip(clean, after_bad))


def test_gradient_without_pending_forward(make_deployment) -> None:
    x = torch.randn(10, 1, 8, 8)
    dep = make_deployment({PARTY: {"train": (x, None), "test": (x, None)}})
    plan = SplitPlan.vanilla(split_model(digits_cnn(4, 8), "pool1"), PARTY)
    session = SplitSession(plan, dep.transport)
    (pid,) = session.propose()[PARTY]
    dep.approve_all({PARTY: [pid]})
    before = dep.owners[PARTY].export_weights(pid)
    with pytest.raises(ProtocolError, match="without a pending forward"):
        dep.transport.call(PARTY, "backward", segment=pid, grad=torch.zeros(2, 4, 4, 4))
    after = dep.owners[PARTY].export_weights(pid)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_middle_segment_rejects_wrong_activation_shape(make_deployment) -> None:
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 10, (10,))
    dep = make_deployment({PARTY: {"train": (x, y), "test": (x, y)}})
    plan = SplitPlan.u_shaped(split_model(digits_cnn(4, 8), ["pool1", "relu3"]), PARTY)
    session = SplitSession(plan, dep.transport)
    ids = session.propose()[PARTY]
    dep.approve_all({PARTY: ids})
    last = session.remote[(PARTY, 2)]
    with pytest.raises(ShapeError, match=r"expected shape \(\*, 8\), got \(4, 9\)"):
        dep.transport.call(PARTY, "loss_step", segment=last.segment_id, x=torch.zeros(4, 9),
                           indices=torch.arange(4))


def test_unknown_cut_name_lists_valid_names() -> None:
    with pytest.raises(SplitError, match="valid cut names: \\['conv1', 'relu1', 'pool1'"):
        split_model(digits_cnn(), "pool_1")
