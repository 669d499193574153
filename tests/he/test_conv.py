"""Conv1d/Conv2d through the encrypted Linear over im2col patches, and the validator."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from he_layers import (
    CKKSParams,
    ConvAsLinear,
    HEClient,
    HEServer,
    KeyOwner,
    LayerSpec,
    ServerContext,
    explain_unprotectable,
)
from syft_split.errors import ConfigError

pytestmark = pytest.mark.he


def _parties(conv: nn.Module, rows: int) -> tuple[ConvAsLinear, HEClient, HEServer]:
    geo = ConvAsLinear.from_module(conv)
    owner = KeyOwner(LayerSpec(rows, geo.d_in, geo.d_out))
    context = ServerContext.from_bytes(owner.public_context_bytes())
    server = HEServer(context, geo.linear_weight(conv), conv.bias.detach(), seed=1)
    return geo, HEClient(owner, seed=2), server


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv1d(3, 5, kernel_size=4, stride=2, padding=1), (4, 3, 30)),
        (nn.Conv2d(2, 4, kernel_size=3, padding=1, dilation=1), (2, 2, 9, 9)),
        (nn.Conv2d(1, 3, kernel_size=(2, 3), stride=(2, 1), dilation=(1, 2)), (3, 1, 8, 10)),
    ],
    ids=["conv1d", "conv2d", "conv2d-strided-dilated"],
)
def test_conv_forward_and_backward_equal_torch(
    conv: nn.Module, shape: tuple[int, ...], kit: SimpleNamespace
) -> None:
    torch.manual_seed(0)
    conv = conv.double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y_ref = conv(x)
    target = torch.randn_like(y_ref)
    torch.nn.functional.mse_loss(y_ref, target).backward()

    geo, client, server = _parties(conv, ConvAsLinear.from_module(conv).rows(shape))
    # data owner: unfold and encrypt; model owner: encrypted Linear, fold rows back
    msg = server.forward(client.encrypt_input(geo.unfold(x.detach())))
    z = server.receive_output(client.decrypt_output(msg))
    y = geo.fold_output(z, shape[0], geo.output_spatial(shape[2:]))
    assert y.shape == y_ref.shape and kit.rel_err(y, y_ref) < 1e-5

    yy = y.detach().clone().requires_grad_(True)
    torch.nn.functional.mse_loss(yy, target).backward()
    msg = server.backward(geo.unfold_output_grad(yy.grad))
    ret, dpatches = client.decrypt_gradients(msg)
    gw, gb = server.receive_gradients(ret)
    assert kit.rel_err(geo.fold_input_grad(dpatches, shape), x.grad) < 1e-5
    assert kit.rel_err(gw.reshape(conv.weight.shape), conv.weight.grad) < 1e-5
    assert gb is not None and kit.rel_err(gb, conv.bias.grad) < 1e-5


def test_large_effective_batch_uses_per_feature_layout() -> None:
    conv = nn.Conv1d(1, 2, kernel_size=3)
    geo = ConvAsLinear.from_module(conv)
    rows = geo.rows((64, 1, 200))
    spec = LayerSpec(rows, geo.d_in, geo.d_out)
    assert rows > 10_000 and spec.layouts(CKKSParams())["forward"].kind == "per_feature"


@pytest.mark.parametrize(
    ("layer", "needle"),
    [
        (nn.LSTM(4, 4), "nn.LSTM is not supported"),
        (nn.Sequential(nn.Linear(2, 2)), "first child is Linear"),
        (nn.Embedding(10, 3), "one-hot"),
        (nn.ReLU(), "one affine map"),
        (nn.Conv3d(1, 1, 2), "nn.Conv3d is not supported"),
        (nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
        (nn.Conv2d(1, 1, 3, padding="same"), "padding='same'"),
        (nn.Conv1d(1, 1, 3, padding=1, padding_mode="circular"), "padding_mode='circular'"),
    ],
)
def test_explain_unprotectable_says_why_and_what_to_change(layer: nn.Module, needle: str) -> None:
    problems = explain_unprotectable(layer)
    assert problems and any(needle in p for p in problems), problems


def test_explain_unprotectable_accepts_supported_layers_and_checks_size() -> None:
    assert explain_unprotectable(nn.Linear(8, 4), batch_size=32) == []
    assert explain_unprotectable(nn.Conv2d(3, 8, 3), batch_size=8, input_spatial=(16, 16)) == []
    big = explain_unprotectable(nn.Linear(4096, 512), batch_size=4096, max_step_mb=64)
    assert big and "MB of ciphertexts per step" in big[0]
    huge_w = nn.Linear(4, 2)
    with torch.no_grad():
        huge_w.weight.fill_(1e4)
    assert "headroom" in explain_unprotectable(huge_w)[0]
    with pytest.raises(ConfigError, match="groups=2"):
        ConvAsLinear.from_module(nn.Conv2d(4, 4, 3, groups=2))


def _conv_spec_parties(conv: nn.Module, batch: int, spatial: tuple[int, ...], **kw: object
                       ) -> tuple[HEClient, HEServer]:
    """Parties built from a convolution agreement: the client unfolds, the server folds."""
    geo = ConvAsLinear.from_module(conv)
    out = geo.output_spatial(spatial)
    spec = LayerSpec(batch, geo.in_channels * math.prod(spatial),
                     geo.out_channels * math.prod(out), conv=geo.to_dict(spatial), **kw)  # type: ignore[arg-type]
    owner = KeyOwner(spec)
    server = HEServer.from_linear(ServerContext.from_bytes(owner.public_context_bytes()), conv,
                                  seed=1)
    return HEClient(owner, seed=2), server


@pytest.mark.parametrize("level", ["A", "B"])
@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv1d(16, 8, kernel_size=5, padding=2), (4, 16, 23)),   # ECG-shaped (HESplitNet)
        (nn.Conv2d(16, 32, kernel_size=3, padding=1), (4, 16, 4, 4)),  # the demo's pool1 cut
    ],
    ids=["conv1d", "conv2d"],
)
def test_conv_agreement_equals_torch(conv: nn.Module, shape: tuple[int, ...], level: str,
                                     kit: SimpleNamespace) -> None:
    """The data owner passes its flattened activation; outputs, dL/dx, dW and db equal the
    plaintext convolution within 1e-5 relative (level B: W = W_s + A after an SGD step)."""
    torch.manual_seed(1)
    conv = copy.deepcopy(conv).double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y_ref = conv(x)
    target = torch.randn_like(y_ref)
    torch.nn.functional.mse_loss(y_ref, target).backward()

    client, server = _conv_spec_parties(conv, shape[0] + 2, shape[2:], level=level, lr=0.1)
    msg = server.forward(client.encrypt_input(x.detach().flatten(1)))
    y = server.receive_output(client.decrypt_output(msg))
    assert y.shape == y_ref.shape and kit.rel_err(y, y_ref) < 1e-5
    yy = y.detach().clone().requires_grad_(True)
    torch.nn.functional.mse_loss(yy, target).backward()
    ret, dx = client.decrypt_gradients(server.backward(yy.grad))
    gw, gb = server.receive_gradients(ret)
    assert dx.shape == (shape[0], x[0].numel())
    assert kit.rel_err(dx.reshape(shape), x.grad) < 1e-5
    assert gb is not None and kit.rel_err(gb, conv.bias.grad) < 1e-5
    if level == "A":
        assert kit.rel_err(gw, conv.weight.grad) < 1e-5
    else:
        server.apply_sgd()
        want = conv.weight - 0.1 * conv.weight.grad
        from he_layers import combine_shares

        got = combine_shares(server.weight, client.weight_share)
        assert kit.rel_err(got, want) < 1e-5 and (server.weight - want).abs().max() > 0.01


def test_conv_agreement_is_checked() -> None:
    conv = nn.Conv2d(16, 32, 3, padding=1)
    geo = ConvAsLinear.from_module(conv)
    with pytest.raises(ConfigError, match="expected d_in=256, d_out=512"):
        LayerSpec(4, 255, 512, conv=geo.to_dict((4, 4))).validate(CKKSParams())
    with pytest.raises(ConfigError, match="malformed convolution geometry"):
        LayerSpec(4, 256, 512, conv={**geo.to_dict((4, 4)), "stride": [0, 1]}).validate(
            CKKSParams())
