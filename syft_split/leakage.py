"""Leakage measures for the run report: how much of a data owner's raw input the cut-layer
activations give away. Pure torch, no transport.

* :func:`dcor_leakage` — distance correlation between raw inputs and activations on a
  held-out batch (bias-corrected by default, so independent data scores ≈ 0 even when the
  batch is small next to the feature dimension).
* :func:`inversion_attack` — a model-inversion attack by the party that sees activations:
  it trains a decoder (activation -> input) on the data owner's *mock* data, which it may
  query through the encoder, and is scored on the real held-out batch. The result says how
  much better than "predict the mock mean" it reconstructs real records.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .defences import distance_correlation
from .errors import ConfigError, NonFiniteError, ShapeError, ValidationError

__all__ = ["dcor_leakage", "inversion_attack"]


def dcor_leakage(raw: torch.Tensor, activations: torch.Tensor, *, unbiased: bool = True) -> float:
    """Distance correlation between raw inputs and their cut activations, as a float.

    ``1`` means the activations are a similarity (e.g. invertible linear map) of the inputs;
    ``≈ 0`` means no dependence is detectable on this batch. With ``unbiased=True`` (default)
    the bias-corrected estimator (Székely & Rizzo, 2014) is used and the batch needs
    ≥ 4 rows; ``unbiased=False`` gives the classic V-statistic used by NoPeek, which drifts
    towards 1 for small batches of high-dimensional data. No gradients are recorded.
    """
    with torch.no_grad():
        return float(distance_correlation(raw.detach(), activations.detach(), unbiased=unbiased))


def _as_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValidationError(f"Expected `{name}` to be a floating-point tensor but got {got}")
    if t.dim() < 1:
        raise ShapeError(f"Expected `{name}` with a batch dimension but got a scalar")
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"Expected `{name}` to be finite but it contains NaN or Inf")
    return t.detach().reshape(t.shape[0], -1).to(torch.float32)


def _encode(encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, name: str) -> torch.Tensor:
    z = encoder(x)
    if not isinstance(z, torch.Tensor):
        raise ValidationError(f"Expected `encoder` to return a tensor but got {type(z).__name__}")
    if z.dim() < 1 or z.shape[0] != x.shape[0]:
        raise ShapeError(f"Expected `encoder({name})` with {x.shape[0]} rows but got shape {tuple(z.shape)}")
    return _as_rows(z.float() if not z.dtype.is_floating_point else z, f"encoder({name})")


def inversion_attack(encoder: Callable[[torch.Tensor], torch.Tensor], mock_inputs: torch.Tensor,
                     target_inputs: torch.Tensor, *, epochs: int = 60, seed: int = 0,
                     hidden: int | None = None, lr: float = 3e-3, batch_size: int = 128,
                     val_fraction: float = 0.2, num_threads: int | None = 1) -> dict[str, Any]:
    """Model-inversion attack: decoder trained on mock pairs, scored on the real batch.

    The attacker encodes the mock inputs and trains an MLP decoder ``flatten(encoder(x)) ->
    flatten(x)`` (one hidden layer of ``hidden`` units, default ``clamp(2·input_dim, 64, 512)``;
    Adam; MSE on features centred and scaled by one number per side) on ``1 - val_fraction``
    of the mock pairs, keeps the epoch with the best MSE on the rest (epoch 0 = predict the
    mean), then reconstructs ``target_inputs`` from ``encoder(target_inputs)``.

    Deterministic for a given ``seed`` on CPU; the global RNG is left untouched. An
    ``nn.Module`` encoder runs in eval mode (its mode is restored) without gradients. While
    the attack runs torch uses ``num_threads`` intra-op threads (``None``: unchanged; the
    default 1 is several times faster for this small MLP on a busy machine); the previous
    setting is restored.

    Returns:
        ``mse``: reconstruction MSE on the targets (input units, mean over all elements);
        ``baseline_mse``: MSE of predicting the mock mean for every target;
        ``ratio``: ``mse / baseline_mse`` (``≈ 1``: no better than the mean; ``≪ 1``:
        activations leak the input; NaN if the baseline is 0);
        ``val_mse`` (mock hold-out, input units), ``best_epoch``, ``epochs``, ``hidden``,
        ``activation_dim``, ``input_dim``, ``n_mock``, ``n_target``, ``seed``.

    Raises:
        ConfigError: bad ``epochs``/``hidden``/``lr``/``batch_size``/``val_fraction``/
            ``num_threads``.
        ShapeError / ValidationError / NonFiniteError: bad inputs or encoder outputs.
    """
    for name, value, ok in (
        ("epochs", epochs, isinstance(epochs, int) and epochs >= 1),
        ("hidden", hidden, hidden is None or (isinstance(hidden, int) and hidden >= 1)),
        ("lr", lr, isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0),
        ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1),
        ("val_fraction", val_fraction, isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1),
        ("num_threads", num_threads,
         num_threads is None or (isinstance(num_threads, int) and num_threads >= 1)),
    ):
        if not ok or isinstance(value, bool):
            raise ConfigError(f"Expected a valid argument `{name}` but got {value!r}")
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _attack(encoder, mock_inputs, target_inputs, epochs=epochs, seed=seed, hidden=hidden,
                       lr=lr, batch_size=batch_size, val_fraction=val_fraction)
    finally:
        torch.set_num_threads(threads)


def _attack(encoder: Callable[[torch.Tensor], torch.Tensor], mock_inputs: torch.Tensor,
            target_inputs: torch.Tensor, *, epochs: int, seed: int, hidden: int | None, lr: float,
            batch_size: int, val_fraction: float) -> dict[str, Any]:
    xm, xt = _as_rows(mock_inputs, "mock_inputs"), _as_rows(target_inputs, "target_inputs")
    if mock_inputs.shape[1:] != target_inputs.shape[1:]:
        raise ShapeError(f"Expected `mock_inputs` and `target_inputs` with the same row shape but got "
                         f"{tuple(mock_inputs.shape[1:])} and {tuple(target_inputs.shape[1:])}")
    n_val = int(round(xm.shape[0] * val_fraction))
    if n_val < 1 or xm.shape[0] - n_val < 2 or xt.shape[0] < 1:
        raise ShapeError(f"Expected enough rows (mock: ≥ 2 for training and 1 for validation, target: ≥ 1) "
                         f"but got {xm.shape[0]} mock and {xt.shape[0]} target rows")

    was_training = isinstance(encoder, nn.Module) and encoder.training
    if isinstance(encoder, nn.Module):
        encoder.eval()
    try:
        with torch.no_grad():
            zm = _encode(encoder, mock_inputs, "mock_inputs")
            zt = _encode(encoder, target_inputs, "target_inputs")
    finally:
        if was_training:
            assert isinstance(encoder, nn.Module)
            encoder.train()
    if zm.shape[1] != zt.shape[1]:
        raise ShapeError(f"Expected encoder outputs of one width but got {zm.shape[1]} and {zt.shape[1]}")

    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(xm.shape[0], generator=gen)
    val, tr = order[:n_val], order[n_val:]
    # centre per feature, scale by one number: rare features must not blow up (a per-feature
    # std of a nearly dead ReLU unit would), and the loss stays MSE in input units.
    z_mu, x_mu = zm[tr].mean(0), xm[tr].mean(0)
    z_sd = (zm[tr] - z_mu).pow(2).mean().sqrt().clamp_min(1e-12)
    x_sd = (xm[tr] - x_mu).pow(2).mean().sqrt().clamp_min(1e-12)
    in_dim, out_dim = zm.shape[1], xm.shape[1]
    width = hidden if hidden is not None else int(min(512, max(64, 2 * out_dim)))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, out_dim))
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    zs_tr, xs_tr = (zm[tr] - z_mu) / z_sd, (xm[tr] - x_mu) / x_sd
    zs_val = (zm[val] - z_mu) / z_sd

    def reconstruct(z_std: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return decoder(z_std) * x_sd + x_mu

    best_val, best_epoch = float(((xm[val] - x_mu) ** 2).mean()), 0  # epoch 0: predict the mean
    best_state: dict[str, torch.Tensor] | None = None
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(tr), generator=gen)
        for start in range(0, len(tr), batch_size):
            idx = perm[start:start + batch_size]
            loss = ((decoder(zs_tr[idx]) - xs_tr[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val_mse = float(((reconstruct(zs_val) - xm[val]) ** 2).mean())
        if val_mse < best_val:
            best_val, best_epoch = val_mse, epoch
            best_state = {k: v.clone() for k, v in decoder.state_dict().items()}

    if best_state is None:
        pred = xm.mean(0).expand_as(xt)
    else:
        decoder.load_state_dict(best_state)
        pred = reconstruct((zt - z_mu) / z_sd)
    mse = float(((pred - xt) ** 2).mean())
    baseline = float(((xm.mean(0) - xt) ** 2).mean())
    return {
        "mse": mse,
        "baseline_mse": baseline,
        "ratio": mse / baseline if baseline > 0 else float("nan"),
        "val_mse": best_val,
        "best_epoch": best_epoch,
        "epochs": epochs,
        "hidden": width,
        "activation_dim": in_dim,
        "input_dim": out_dim,
        "n_mock": int(xm.shape[0]),
        "n_target": int(xt.shape[0]),
        "seed": seed,
    }
