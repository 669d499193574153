"""Simulated model owners for evaluating the watch: an honest one and a training hijacker.

:class:`FeatureSpaceHijack` follows the feature-space hijacking attack (FSHA) of Pasquini,
Ateniese & Bernaschi, "Unleashing the Tiger: Inference Attacks on Split Learning", CCS 2021
(``SplitNN_FSHA/FSHA.py``): the malicious model owner trains, on public data, a *pilot*
encoder ``f~`` and a decoder ``f~⁻¹`` as an autoencoder, and a discriminator ``D`` (WGAN with
gradient penalty) that tells the pilot's features from the client's. The gradient it sends the
client for its activations ``z = f(x)`` is ``∂ mean D(z) / ∂z``: it pulls the client's
features into the pilot's feature space, where ``f~⁻¹`` inverts them. It never uses labels.

:class:`HonestModelOwner` runs the rest of the model on the released labels (cross-entropy).

Both expose ``gradient(z, labels) -> dL/dz``; :func:`drive` trains a data owner's input
segment with them, through those gradients only, as the host would (optimizer step per
batch), and calls a :class:`~syft_split.leakage.watch.LeakageWatch` after each step.
These are simulation utilities for tests and ``bench/leakage.py``, not used by the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["FeatureSpaceHijack", "HonestModelOwner", "SwitchingModelOwner", "drive"]


def _image_nets(in_shape: tuple[int, ...], z_shape: tuple[int, ...], width: int) -> tuple[nn.Module, ...]:
    c, h, w = in_shape
    zc, zh, zw = z_shape
    pilot = nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.LeakyReLU(0.2),
                          nn.Conv2d(width, zc, 3, padding=1), nn.AdaptiveMaxPool2d((zh, zw)))
    decoder = nn.Sequential(nn.Upsample(size=(h, w)), nn.Conv2d(zc, width, 3, padding=1), nn.LeakyReLU(0.2),
                            nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2),
                            nn.Conv2d(width, c, 3, padding=1), nn.Sigmoid())
    critic = nn.Sequential(nn.Conv2d(zc, width, 3, padding=1), nn.LeakyReLU(0.2), nn.Flatten(),
                           nn.Linear(width * zh * zw, 1))
    return pilot, decoder, critic


def _flat_nets(in_dim: int, z_dim: int, width: int) -> tuple[nn.Module, ...]:
    pilot = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, width), nn.LeakyReLU(0.2), nn.Linear(width, z_dim))
    decoder = nn.Sequential(nn.Linear(z_dim, width), nn.LeakyReLU(0.2), nn.Linear(width, in_dim))
    critic = nn.Sequential(nn.Linear(z_dim, width), nn.LeakyReLU(0.2), nn.Linear(width, 1))
    return pilot, decoder, critic


class FeatureSpaceHijack:
    """A malicious model owner running FSHA (Pasquini et al., CCS 2021) on public data.

    Args:
        public: the attacker's public records (e.g. the data owner's mock asset), shaped like
            the private records.
        activation_shape: the shape of one record's activations (the segment's output).
        width: channels / units of the attacker's networks.
        lr: Adam learning rate of the pilot/decoder and of the critic.
        gradient_penalty: WGAN-GP weight.
        n_critic: critic (and pilot) updates per client step (WGAN-GP's usual 5; with 1 the
            attack makes no progress in a few hundred steps on the demo).
        seed: seeds the networks and the public batches.
    """

    def __init__(self, public: torch.Tensor, activation_shape: tuple[int, ...], *, width: int = 32,
                 lr: float = 1e-3, gradient_penalty: float = 10.0, batch_size: int = 32, n_critic: int = 5,
                 seed: int = 0) -> None:
        if public.dim() < 2 or public.shape[0] < 2:
            raise ConfigError(f"Expected `public` with at least 2 records but got shape "
                              f"{tuple(public.shape)}")
        self.public = public.detach().to(torch.float32)
        in_shape = tuple(public.shape[1:])
        self.z_shape = tuple(activation_shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if len(in_shape) == 3 and len(self.z_shape) == 3:
                nets = _image_nets(in_shape, self.z_shape, width)  # type: ignore[arg-type]
            else:
                nets = _flat_nets(math.prod(in_shape), math.prod(self.z_shape), width)
        self.pilot, self.decoder, self.critic = nets
        self.flat = not (len(in_shape) == 3 and len(self.z_shape) == 3)
        self.opt_ae = torch.optim.Adam([*self.pilot.parameters(), *self.decoder.parameters()], lr=lr)
        self.opt_d = torch.optim.Adam(self.critic.parameters(), lr=lr)
        self.gp = gradient_penalty
        self.n_critic = n_critic
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.steps = 0

    def _z(self, z: torch.Tensor) -> torch.Tensor:
        return z.reshape(z.shape[0], -1) if self.flat else z.reshape(z.shape[0], *self.z_shape)

    def _public_batch(self) -> torch.Tensor:
        idx = torch.randint(0, self.public.shape[0], (self.batch_size,), generator=self.gen)
        return self.public[idx]

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self._z(z))
        return out.reshape(z.shape[0], *self.public.shape[1:])

    def _autoencoder_step(self) -> float:
        x = self._public_batch()
        loss = F.mse_loss(self._decode(self.pilot(x)), x)
        self.opt_ae.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_ae.step()
        return float(loss.detach())

    def pretrain(self, steps: int) -> float:
        """Train the pilot autoencoder alone on public data (no client involved); last loss."""
        loss = math.nan
        for _ in range(steps):
            loss = self._autoencoder_step()
        return loss

    def gradient(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """One FSHA server step on the client's activations ``z``; returns ``dL/dz`` to send.

        ``n_critic`` times: one pilot/decoder step on public data and one critic step
        (public features real, client features fake, gradient penalty). The client's loss is
        the critic's mean score of its features (WGAN generator loss). ``labels`` are ignored.
        """
        zp = self._z(z.detach())
        for _ in range(self.n_critic):
            self._autoencoder_step()
            with torch.no_grad():
                zr = self._z(self.pilot(self._public_batch()))
            n = min(zp.shape[0], zr.shape[0])
            a = torch.rand((n,) + (1,) * (zp.dim() - 1), generator=self.gen)
            mid = (a * zr[:n] + (1 - a) * zp[:n]).requires_grad_(True)
            (g,) = torch.autograd.grad(self.critic(mid).sum(), mid, create_graph=True)
            penalty = (g.reshape(n, -1).norm(dim=1) - 1).pow(2).mean()
            d_loss = self.critic(zr).mean() - self.critic(zp).mean() + self.gp * penalty
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
        zc = z.detach().clone().requires_grad_(True)
        self.critic(self._z(zc)).mean().backward()
        self.steps += 1
        assert zc.grad is not None
        return zc.grad

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        """The attacker's reconstruction of records from their activations."""
        with torch.no_grad():
            return self._decode(z)


class HonestModelOwner:
    """The rest of the model trained on the released labels with cross-entropy (Adam)."""

    def __init__(self, rest: nn.Module, *, lr: float = 1e-2) -> None:
        self.rest = rest
        self.opt = torch.optim.Adam(rest.parameters(), lr=lr)
        self.steps = 0

    def gradient(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """One training step of the rest on ``(z, labels)``; returns ``dL/dz``."""
        if labels is None:
            raise ConfigError("Expected `labels`: the honest model owner trains on the released labels")
        zc = z.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(self.rest(zc), labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.steps += 1
        assert zc.grad is not None
        return zc.grad


class SwitchingModelOwner:
    """Honest for the first ``honest_steps`` steps, then ``hijacker`` (an attacker that
    earns trust before it turns). The hijacker's own networks keep training meanwhile only
    through :meth:`FeatureSpaceHijack.pretrain` (called by the caller)."""

    def __init__(self, honest: HonestModelOwner, hijacker: FeatureSpaceHijack, honest_steps: int) -> None:
        self.honest, self.hijacker, self.honest_steps = honest, hijacker, honest_steps
        self.steps = 0

    def gradient(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The honest gradient before the switch, the hijacker's after it."""
        self.steps += 1
        owner = self.honest if self.steps <= self.honest_steps else self.hijacker
        return owner.gradient(z, labels)


def drive(segment: nn.Module, optimizer: torch.optim.Optimizer, owner: Any, features: torch.Tensor,
          labels: torch.Tensor, steps: int, *, batch_size: int = 32, seed: int = 0,
          on_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], bool] | None = None
          ) -> int:
    """Train ``segment`` for ``steps`` batches with gradients from ``owner`` only.

    Per step: sample a batch, release ``z = segment(x)`` and the labels, receive
    ``owner.gradient(z, labels)``, backpropagate it into the segment, step ``optimizer``,
    then call ``on_step(step, x, z, grad, labels)`` (1-based step); it returns ``True`` to
    stop (e.g. the watch halted). Returns the number of steps run.
    """
    gen = torch.Generator().manual_seed(seed)
    segment.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, features.shape[0], (batch_size,), generator=gen)
        x, y = features[idx].to(torch.float32), labels[idx]
        z = segment(x)
        grad = owner.gradient(z.detach(), y)
        optimizer.zero_grad(set_to_none=True)
        z.backward(grad)
        optimizer.step()
        if on_step is not None and on_step(step, x, z.detach(), grad, y):
            return step
    return steps
