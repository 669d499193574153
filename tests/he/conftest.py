"""Helpers for the real-CKKS tests (no mocks): build both parties, run protocol steps.

The suite runs with ``--import-mode=importlib``, so tests get the helpers through the
``kit`` fixture instead of importing this module.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("tenseal")

from he_layers import HEClient, HEServer, KeyOwner, LayerSpec, ServerContext


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def make_parties(
    batch: int, d_in: int, d_out: int, *, level: str = "A", lr: float | None = None,
    bias: bool = True, seed: int = 0, **spec_kw: object,
) -> tuple[HEClient, HEServer, nn.Linear]:
    """A fresh key owner, its public context loaded by the server, and the reference Linear."""
    spec = LayerSpec(batch, d_in, d_out, level=level, lr=lr, bias=bias, **spec_kw)  # type: ignore[arg-type]
    owner = KeyOwner(spec)
    context = ServerContext.from_bytes(owner.public_context_bytes())
    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out, bias=bias).double()
    server = HEServer.from_linear(context, linear, seed=seed + 2)
    return HEClient(owner, seed=seed + 1), server, linear


def forward(client: HEClient, server: HEServer, x: torch.Tensor, **kw: bool) -> torch.Tensor:
    """Forward half of a step (messages as bytes); returns z on the server."""
    msg = client.encrypt_input(x, **kw)
    msg = server.forward(msg)
    msg = client.decrypt_output(msg)
    return server.receive_output(msg)


def step(
    client: HEClient, server: HEServer, x: torch.Tensor,
    grad_of_z: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A full step; returns z, dL/dx (client), weight and bias gradients (server)."""
    z = forward(client, server, x)
    msg = server.backward(grad_of_z(z))
    msg, dx = client.decrypt_gradients(msg)
    gw, gb = server.receive_gradients(msg)
    return z, dx, gw, gb


def mse_grad(target: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """dL/dz of mean squared error against ``target``."""
    def grad(z: torch.Tensor) -> torch.Tensor:
        zz = z.detach().clone().requires_grad_(True)
        torch.nn.functional.mse_loss(zz, target).backward()
        assert zz.grad is not None
        return zz.grad
    return grad


def check_step(client: HEClient, server: HEServer, linear: nn.Linear, level: str) -> None:
    """One MSE step through the protocol equals autograd on ``linear`` (within 1e-5 relative):
    z, dL/dx (level B: 2e-5), the bias gradient and, at level A, the weight gradient (level B:
    the server only sees dW + eps/lr, far from dW)."""
    b, d_in, d_out = server.spec.batch_size, server.spec.d_in, server.spec.d_out
    x = torch.randn(b, d_in, dtype=torch.float64, requires_grad=True)
    target = torch.randn(b, d_out, dtype=torch.float64)
    torch.nn.functional.mse_loss(linear(x), target).backward()
    z, dx, gw, gb = step(client, server, x.detach(), mse_grad(target))
    assert rel_err(z, linear(x)) < 1e-5
    # level B's dL/dx carries the key-switching noise of Enc(delta A^T): measured 5e-6 median,
    # 6.8e-6 max in 12 runs (1.0e-5 seen once), so its bound is 2e-5; level A's is exact to 1e-8
    assert x.grad is not None and rel_err(dx, x.grad) < (1e-5 if level == "A" else 2e-5)
    assert gb is not None and linear.bias.grad is not None
    assert rel_err(gb, linear.bias.grad) < 1e-5
    if level == "A":
        assert rel_err(gw, linear.weight.grad) < 1e-5
    else:
        assert (gw - linear.weight.grad).abs().max() > 1.0


@pytest.fixture
def kit() -> SimpleNamespace:
    """``kit.make_parties``, ``kit.forward``, ``kit.step``, ``kit.check_step``,
    ``kit.mse_grad``, ``kit.rel_err``."""
    return SimpleNamespace(make_parties=make_parties, forward=forward, step=step,
                           check_step=check_step, mse_grad=mse_grad, rel_err=rel_err)
