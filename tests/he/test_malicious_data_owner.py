"""The model owner's side of an encrypted layer against a data owner that does not follow the
agreement: keys built from another spec, inputs encrypted past ``x_bound``, garbage answers."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import syft_split.he_host as he_host
from he_layers import HEClient, HEServer, KeyOwner, LayerSpec, ServerContext
from he_layers.wire import array_from_bytes, array_to_bytes, decode_frame, encode_frame
from syft_split import OptimizerSpec, SplitPlan, SplitSession
from syft_split.deploy import inprocess
from syft_split.errors import HEError
from syft_split.he import protect
from syft_split.topology import DATA_OWNER, MODEL_OWNER, Node, Task

pytestmark = pytest.mark.he


def _session(monkeypatch: pytest.MonkeyPatch, options: dict[str, object] | None,
             level: str = "A") -> tuple[SplitSession, torch.Tensor, torch.Tensor]:
    """A protected plan whose data owner builds its keys from the agreement changed by
    ``options`` (None: the agreement as proposed)."""
    if options is not None:
        honest = he_host.build_client

        def tampered(agreement: dict[str, object]) -> object:
            a = copy.deepcopy(agreement)
            a.setdefault("options", {}).update(options)  # type: ignore[union-attr]
            return honest(a)

        monkeypatch.setattr(he_host, "build_client", tampered)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)
    dep = inprocess({"m": {"train": (x, y)}})
    torch.manual_seed(0)
    nodes = [Node(nn.Sequential(nn.Linear(16, 12), nn.ReLU()), DATA_OWNER),
             Node(nn.Linear(12, 8), MODEL_OWNER, (0,)),
             Node(nn.Sequential(nn.ReLU(), nn.Linear(8, 4)), MODEL_OWNER, (1,))]
    plan = protect(SplitPlan(nodes, [Task(2)], ["m"], max_batch=16, datasets=["train"]),
                   level=level, batch_size=16, lr=0.1 if level == "B" else None)
    s = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("sgd", lr=0.1))
    dep.approve_all(s.propose())
    return s, x, y


def _step(s: SplitSession, y: torch.Tensor) -> float:
    idx = torch.arange(16)
    s.zero_grad()
    loss, _ = s.loss("m", idx, y[idx])
    loss.backward()
    s.step()
    return float(loss.detach())


@pytest.mark.parametrize("options", [{"mask_bits": 0}, {"x_bound": 1e6}])
def test_a_context_built_from_another_agreement_is_refused(
        monkeypatch: pytest.MonkeyPatch, options: dict[str, object]) -> None:
    """The model owner ran with the spec in the data owner's public context: keys built with
    mask_bits=0 (masks of +-1 instead of +-2^12) let the data owner read W from in-bound inputs
    (6% after 16 forwards, in review). Refused before anything is encrypted or sent."""
    s, _, y = _session(monkeypatch, options)
    key = next(iter(options))
    with pytest.raises(HEError, match=rf"not the encryption agreement.*spec\.{key}"):
        _step(s, y)
    assert s.he is not None and not s.he.servers  # no server was built on that context


def test_the_agreed_context_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: the same plan with the data owner following the agreement trains."""
    s, _, y = _session(monkeypatch, None)
    assert np.isfinite(_step(s, y)) and np.isfinite(_step(s, y))


@pytest.fixture(scope="module", params=["A", "B"])
def parties(request: pytest.FixtureRequest) -> tuple[KeyOwner, nn.Linear]:
    level = request.param
    spec = LayerSpec(8, 15, 6, level=level, lr=0.1 if level == "B" else None, x_bound=4.0)
    torch.manual_seed(0)
    return KeyOwner(spec), nn.Linear(15, 6).double()


def _forward(owner: KeyOwner, layer: nn.Linear, x: torch.Tensor, *, need_grad: bool = False,
             cheat: bool = False) -> tuple[HEServer, HEClient, bytes]:
    """One encrypted forward; ``cheat``: the data owner skips its own x_bound check."""
    server = HEServer.from_linear(ServerContext.from_bytes(owner.public_context_bytes()), layer)
    client = HEClient(owner, seed=1)
    if cheat:
        client.spec = dataclasses.replace(client.spec, x_bound=1e9)  # its check only
    ret = client.decrypt_output(server.forward(client.encrypt_input(x, need_grad=need_grad)))
    return server, client, ret


def test_an_output_from_inputs_past_x_bound_is_refused(
        parties: tuple[KeyOwner, nn.Linear]) -> None:
    """A data owner that encrypts x = c * e_i past x_bound reads row i of W through the
    masks ((y_i - y_0) / c: W to 8% in one forward at c = 1e6, in review). The model owner
    cannot see x, but z = xW + b is bounded by x_bound * sum_i |W_ij| (+ the share at level
    B) + |b_j|: the first such answer is refused."""
    owner, layer = parties
    bound = owner.spec.x_bound
    honest = torch.zeros(8, 15, dtype=torch.float64)
    honest[1:] = bound * torch.eye(15, dtype=torch.float64)[:7]  # at the bound: accepted
    server, _, ret = _forward(owner, layer, honest)
    z = server.receive_output(ret)
    want = honest @ layer.weight.detach().T + layer.bias.detach()
    if owner.spec.level == "A":
        assert torch.allclose(z, want, atol=1e-5)
    past = honest * 1e4
    server, _, ret = _forward(owner, layer, past, cheat=True)
    with pytest.raises(HEError, match="exceeds what inputs within the agreed x_bound"):
        server.receive_output(ret)


def test_a_garbage_weight_gradient_is_refused(parties: tuple[KeyOwner, nn.Linear]) -> None:
    """A returned weight gradient past x_bound * sum_b |delta_bj| (plus level B's correction)
    is refused instead of trained on; an honest one is accepted."""
    owner, layer = parties
    x = torch.rand(8, 15, dtype=torch.float64) * owner.spec.x_bound
    delta = torch.randn(8, 6, dtype=torch.float64)
    for garbage in (False, True):
        server, client, ret = _forward(owner, layer, x, need_grad=True)
        server.receive_output(ret)
        back, _ = client.decrypt_gradients(server.backward(delta))
        if garbage:
            head, blobs = decode_frame(back, "grad_return")
            g = array_from_bytes(blobs[0], (15, 6), "g") * 1e6
            head = {k: v for k, v in head.items() if k not in ("kind", "blob_sizes")}
            back = encode_frame("grad_return", head, [array_to_bytes(g)])
            with pytest.raises(HEError, match=r"returned weight gradient: .*exceeds"):
                server.receive_gradients(back)
        else:
            gw, _ = server.receive_gradients(back)
            if owner.spec.level == "A":
                assert torch.allclose(gw, delta.T @ x, atol=1e-5)


@pytest.mark.parametrize("level", ["A", "B"])
def test_honest_answers_with_coarse_flooding_and_a_dead_unit_are_accepted(level: str) -> None:
    """The data owner rounds what it returns to 2^-flood_bits: with flood_bits=20 (allowed)
    and an output unit whose gradient is 0 for the whole batch (its bound 0), the honest
    rounding alone was refused as cheating. The bound allows for it."""
    spec = LayerSpec(8, 15, 6, level=level, lr=0.1 if level == "B" else None, x_bound=4.0,
                     flood_bits=20)
    torch.manual_seed(1)
    owner, layer = KeyOwner(spec), nn.Linear(15, 6).double()
    x = torch.rand(8, 15, dtype=torch.float64) * spec.x_bound
    delta = torch.randn(8, 6, dtype=torch.float64)
    delta[:, 2] = 0.0  # a dead unit
    server, client, ret = _forward(owner, layer, x, need_grad=True)
    server.receive_output(ret)
    back, _ = client.decrypt_gradients(server.backward(delta))
    gw, _ = server.receive_gradients(back)
    if level == "A":
        assert torch.allclose(gw, delta.T @ x, atol=1e-5)


def test_a_resumed_step_keeps_its_gradient_bound(parties: tuple[KeyOwner, nn.Linear]) -> None:
    """A model owner that resumes a step from its checkpoint (grad_state) checks the answer
    as the process that sent it would have: the bound travels with the state."""
    owner, layer = parties
    x = torch.rand(8, 15, dtype=torch.float64) * owner.spec.x_bound
    server, client, ret = _forward(owner, layer, x, need_grad=True)
    server.receive_output(ret)
    back, _ = client.decrypt_gradients(server.backward(torch.randn(8, 6, dtype=torch.float64)))
    state = server.grad_state()
    head, blobs = decode_frame(back, "grad_return")
    g = array_from_bytes(blobs[0], (15, 6), "g") * 1e6
    head = {k: v for k, v in head.items() if k not in ("kind", "blob_sizes")}
    resumed = HEServer.from_linear(ServerContext.from_bytes(owner.public_context_bytes()), layer)
    resumed.expect_gradients(state)
    with pytest.raises(HEError, match="exceeds"):
        resumed.receive_gradients(encode_frame("grad_return", head, [array_to_bytes(g)]))
    resumed.expect_gradients(state)  # the honest answer is taken
    resumed.receive_gradients(back)
