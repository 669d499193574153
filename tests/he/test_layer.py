"""The encrypted Linear equals torch: forward, dL/dx, dW, and multi-step SGD (levels A, B)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from he_layers import combine_shares
from syft_split.errors import ConfigError, ProtocolError

pytestmark = pytest.mark.he

SHAPES = [(4, 3, 2), (16, 40, 12), (64, 300, 20), (8, 1100, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_equals_torch_linear(shape: tuple[int, int, int], kit: SimpleNamespace) -> None:
    b, d_in, d_out = shape
    client, server, linear = kit.make_parties(b, d_in, d_out, seed=b)
    x = torch.randn(b, d_in, dtype=torch.float64)
    z = kit.forward(client, server, x, need_grad=False)
    assert kit.rel_err(z, linear(x)) < 1e-5


@pytest.mark.parametrize("level", ["A", "B"])
def test_gradients_equal_autograd(level: str, kit: SimpleNamespace) -> None:
    client, server, linear = kit.make_parties(16, 40, 12, level=level, lr=0.1)
    kit.check_step(client, server, linear, level)


def test_smaller_last_batch_and_no_bias(kit: SimpleNamespace) -> None:
    client, server, linear = kit.make_parties(16, 10, 4, bias=False)
    x = torch.randn(5, 10, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, 4, dtype=torch.float64)
    torch.nn.functional.mse_loss(linear(x), target).backward()
    z, dx, gw, gb = kit.step(client, server, x.detach(), kit.mse_grad(target))
    assert gb is None and z.shape == (5, 4)
    assert kit.rel_err(dx, x.grad) < 1e-5 and kit.rel_err(gw, linear.weight.grad) < 1e-5


@pytest.mark.parametrize("level", ["A", "B"])
@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.01)],
                         ids=["sgd", "momentum-wd"])
def test_sgd_steps_match_plain_sgd(level: str, momentum: float, weight_decay: float,
                                   kit: SimpleNamespace) -> None:
    """W = W_s + A follows torch.optim.SGD exactly, with momentum and weight decay too: the
    data owner's share correction accounts for the momentum the server applies to it."""
    b, d_in, d_out, lr = 12, 20, 6, 0.2
    client, server, linear = kit.make_parties(b, d_in, d_out, level=level, lr=lr, seed=7,
                                              momentum=momentum, weight_decay=weight_decay)
    ref = torch.nn.Linear(d_in, d_out).double()
    ref.load_state_dict(linear.state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    for _ in range(4):
        x = torch.randn(b, d_in, dtype=torch.float64)
        target = torch.randn(b, d_out, dtype=torch.float64)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), target).backward()
        opt.step()
        kit.step(client, server, x, kit.mse_grad(target))
        server.apply_sgd()
    weight = combine_shares(server.weight, client.weight_share) if level == "B" else server.weight
    assert (weight - ref.weight).abs().max() < 1e-4
    assert server.bias is not None and (server.bias - ref.bias).abs().max() < 1e-4
    if level == "B":
        # the server's stored weight is a share, far from the true weight
        assert (server.weight - ref.weight).abs().max() > 0.1
        assert (client.weight_share.abs().max()) <= 1.0


def test_level_b_weight_only_changes_through_agreed_sgd(kit: SimpleNamespace) -> None:
    client, server, _ = kit.make_parties(4, 3, 2, level="B", lr=0.1)
    with pytest.raises(ConfigError, match=r"lr=0\.1"):
        server.set_parameters(weight=torch.zeros(2, 3))
    kit.step(client, server, torch.randn(4, 3, dtype=torch.float64),
         kit.mse_grad(torch.zeros(4, 2, dtype=torch.float64)))
    with pytest.raises(ConfigError, match=r"expected lr=0\.1"):
        server.apply_sgd(lr=0.5)
    with pytest.raises(ProtocolError, match="apply_sgd"):
        server.forward(client.encrypt_input(torch.randn(4, 3, dtype=torch.float64)))
    server.apply_sgd()
    server.forward(client.encrypt_input(torch.randn(4, 3, dtype=torch.float64)))


def test_protocol_order_is_enforced(kit: SimpleNamespace) -> None:
    client, server, _ = kit.make_parties(4, 3, 2)
    with pytest.raises(ProtocolError):
        server.backward(torch.zeros(4, 2))
    with pytest.raises(ProtocolError):
        server.apply_sgd(0.1)
    msg = client.encrypt_input(torch.randn(4, 3, dtype=torch.float64))
    reply = server.forward(msg)
    with pytest.raises(ProtocolError, match="replayed"):
        server.forward(msg)
    ret = client.decrypt_output(reply)
    with pytest.raises(ProtocolError):
        client.decrypt_output(reply)
    server.receive_output(ret)
    with pytest.raises(ProtocolError):
        server.receive_output(ret)


@pytest.mark.parametrize("level", ["A", "B"])
def test_an_evaluation_forward_between_forward_and_backward(level: str,
                                                            kit: SimpleNamespace) -> None:
    """Both parties keep an evaluation forward apart from the training step in flight: its
    output is right and the training step's gradients still equal autograd; the evaluation
    forward's output is decrypted once."""
    client, server, linear = kit.make_parties(8, 6, 3, level=level, lr=0.1)
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randn(8, 3, dtype=torch.float64)
    torch.nn.functional.mse_loss(linear(x), target).backward()
    z = kit.forward(client, server, x.detach())
    x_eval = torch.randn(5, 6, dtype=torch.float64)
    reply = server.forward(client.encrypt_input(x_eval, need_grad=False))
    ret = client.decrypt_output(reply)
    with pytest.raises(ProtocolError):
        client.decrypt_output(reply)
    assert kit.rel_err(server.receive_output(ret), linear(x_eval)) < 1e-5
    msg, dx = client.decrypt_gradients(server.backward(kit.mse_grad(target)(z)))
    gw, gb = server.receive_gradients(msg)
    assert kit.rel_err(z, linear(x)) < 1e-5 and kit.rel_err(dx, x.grad) < 1e-5
    assert gb is not None and kit.rel_err(gb, linear.bias.grad) < 1e-5
    if level == "A":
        assert kit.rel_err(gw, linear.weight.grad) < 1e-5


def test_a_cancelled_step_is_not_decrypted(kit: SimpleNamespace) -> None:
    client, server, _ = kit.make_parties(4, 3, 2)
    reply = server.forward(client.encrypt_input(torch.randn(4, 3, dtype=torch.float64)))
    client.cancel()
    with pytest.raises(ProtocolError):
        client.decrypt_output(reply)


def test_forward_only_step_cannot_backprop(kit: SimpleNamespace) -> None:
    client, server, _ = kit.make_parties(4, 3, 2)
    kit.forward(client, server, torch.randn(4, 3, dtype=torch.float64), need_grad=False)
    with pytest.raises(ProtocolError):
        server.backward(torch.zeros(4, 2))


def test_costs_are_accounted(kit: SimpleNamespace) -> None:
    client, server, _ = kit.make_parties(8, 6, 3)
    kit.step(client, server, torch.randn(8, 6, dtype=torch.float64),
         kit.mse_grad(torch.zeros(8, 3, dtype=torch.float64)))
    c, s = client.costs.as_dict(), server.costs.as_dict()
    assert c["steps"] == 1 and c["enc_s"] > 0 and c["dec_s"] > 0 and s["server_s"] > 0
    assert c["bytes_sent"] == s["bytes_received"] > 0
    assert c["bytes_received"] == s["bytes_sent"] > 0
    from he_layers import merge_costs

    merged = merge_costs(client.costs, server.costs)
    assert merged["bytes_up"] == c["bytes_sent"] and merged["server_s"] == s["server_s"]


def test_level_b_initial_share_hides_the_first_weight(kit: SimpleNamespace) -> None:
    client, server, linear = kit.make_parties(6, 5, 8, level="B", lr=0.1, initial_share=0.05)
    share = client.weight_share
    assert share.abs().max() > 0
    x = torch.randn(6, 5, dtype=torch.float64)
    z = kit.forward(client, server, x, need_grad=False)
    true_w = combine_shares(server.weight, share)
    assert kit.rel_err(z, x @ true_w.T + linear.bias) < 1e-5
    assert (true_w - server.weight).abs().max() > 0


def test_exact_zero_gradients_stay_zero(kit: SimpleNamespace) -> None:
    """A dead output unit (zero delta column) and a dead input feature (zero x column) have
    exactly zero weight gradient at level A, as in plain training: no CKKS noise is left
    for Adam to blow up into a full step."""
    client, server, _ = kit.make_parties(32, 128, 64)
    x = torch.rand(32, 128, dtype=torch.float64)
    x[:, :7] = 0.0
    delta = torch.randn(32, 64, dtype=torch.float64) / 32
    delta[:, :5] = 0.0
    z = kit.forward(client, server, x)
    ret, _ = client.decrypt_gradients(server.backward(delta))
    gw, _ = server.receive_gradients(ret)
    want = delta.T @ x
    assert (gw[:5] == 0).all() and (gw[:, :7] == 0).all()
    assert kit.rel_err(gw, want) < 1e-7 and z.shape == (32, 64)


def test_an_unchanged_weight_is_encoded_once(kit: SimpleNamespace) -> None:
    """Evaluation batches reuse the encoded weight; a weight that moved is encoded again."""
    client, server, linear = kit.make_parties(16, 40, 12, seed=3)
    ev = server.context.evaluator
    xs = [torch.randn(16, 40, dtype=torch.float64) for _ in range(3)]
    encodes = []
    for x in xs[:2]:
        before = ev.counts["encodes"]
        z = kit.forward(client, server, x, need_grad=False)
        encodes.append(ev.counts["encodes"] - before)
        assert kit.rel_err(z, linear(x)) < 1e-5
    outputs = server.context.layouts["forward"].n_outputs  # the masks' encodings
    assert encodes[0] > outputs and encodes[1] == outputs
    with torch.no_grad():
        linear.weight[0, 0] += 0.5
    server.set_parameters(linear.weight, linear.bias)
    before = ev.counts["encodes"]
    z = kit.forward(client, server, xs[2], need_grad=False)
    assert ev.counts["encodes"] - before == encodes[0]
    assert kit.rel_err(z, linear(xs[2])) < 1e-5
