"""White-box model inversion: solve for the input that produces what left.

He, Zhang & Lee, "Model inversion attacks against collaborative inference" (ACSAC 2019), §4
"white-box attack": regularised maximum likelihood estimation (rMLE)::

    x* = argmin_x  ||f(x) - z||² / ||z||²  +  λ · TV(x) / d  +  μ · ||x - x̄||² / (d · s²)

over the input domain (here the box spanned by the mock records), with ``f`` the segment,
``z`` the released activation, ``TV`` the anisotropic total variation of an image record and
``d`` its number of values, ``x̄`` the mock mean and ``s`` the width of the mock's value range
(a Gaussian prior: UnSplit's L2 term, centred on the mock). With Gaussian noise on ``z`` the
first term is the negative log-likelihood up to scale and the priors carry the estimate.
UnSplit (Erdogan et al., WPES 2022, ``unsplit/attacks.py``) runs the
same input optimisation with TV and L2 priors against an *unknown* segment (alternating with
model fitting); the data owner knows its own weights, so this bounds an attacker who learns
them (e.g. by UnSplit's model stealing or a weight-sharing topology).

The prior weights ``(λ, μ)`` are chosen on mock rows (the attacker can do the same: it knows the
mock inputs) from ``tv_weights x l2_weights``; the start point is the mock mean; Adam with
projection on the box.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ShapeError
from .attacks import _pos_float, _pos_int, check_args, image_ssim
from .metrics import as_rows, encode, is_image_shape, mse_ratio
from .release import Release

__all__ = ["whitebox_inversion", "total_variation"]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation per record of ``(N, C, H, W)`` images:
    ``Σ |x[h+1,w] - x[h,w]| + |x[h,w+1] - x[h,w]|`` over channels and pixels."""
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).sum(1)
            + (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).sum(1))


def _solve(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, start: torch.Tensor,
           lo: torch.Tensor, hi: torch.Tensor, prior: tuple[float, float], iterations: int, lr: float,
           image: bool, deadline: float | None) -> tuple[torch.Tensor, int]:
    tv_weight, l2_weight = prior
    mean = start.detach()
    spread = (hi - lo).pow(2).mean().clamp_min(1e-12)
    x = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    z_norm = z.pow(2).sum(1).clamp_min(1e-12)
    d = x[0].numel()
    done = 0
    for done in range(1, iterations + 1):  # noqa: B007
        resid = (f(x).reshape(z.shape) - z).pow(2).sum(1) / z_norm
        loss = resid.sum()
        if tv_weight > 0 and image:
            loss = loss + tv_weight * (total_variation(x) / d).sum()
        if l2_weight > 0:
            loss = loss + l2_weight * ((x - mean).pow(2).flatten(1).mean(1) / spread).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, hi), lo))
        if deadline is not None and time.perf_counter() > deadline:
            break
    return x.detach(), done


def _image(t: torch.Tensor) -> bool:
    return isinstance(t, torch.Tensor) and is_image_shape(tuple(t.shape[1:]))


def whitebox_inversion(encoder: nn.Module, mock_inputs: torch.Tensor, target_inputs: torch.Tensor, *,
                       release: Release | None = None, seed: int = 0,
                       tv_weights: Sequence[float] = (0.0, 1e-2, 1e-1),
                       l2_weights: Sequence[float] = (0.0, 0.1, 1.0, 3.0), iterations: int = 300,
                       lr: float = 0.05, select_rows: int = 32, budget_s: float | None = None,
                       num_threads: int | None = 1) -> dict[str, Any]:
    """rMLE white-box inversion (He et al. 2019) of the targets' released activations.

    ``(λ, μ)`` is picked from ``tv_weights x l2_weights`` by the MSE on ``select_rows`` mock
    rows (TV applies to image records only; other records use ``λ = 0``), then the targets are
    inverted with it,
    ``iterations`` Adam steps (``lr``) from the mock mean, projected on the mock's value range.
    ``budget_s`` caps the seconds (selection gets at most half); deterministic for a seed
    unless the budget cuts it. The encoder's parameters are not changed (no gradient is kept
    for them; an ``nn.Module`` runs in eval mode, mode restored).

    Returns:
        ``mse`` / ``baseline_mse`` / ``ratio`` / ``ssim`` as :func:`decoder_attack`,
        ``tv_weight``, ``l2_weight`` (chosen), ``selection`` ("λ,μ" -> mock MSE ratio),
        ``iterations`` (run on
        the targets), ``n_target``, ``seed``, ``seconds``, ``budget_hit``.
    """
    if not callable(encoder):
        raise ConfigError(f"Expected `encoder` to be a callable module but got {type(encoder).__name__}")
    check_args(iterations=(iterations, _pos_int(iterations)), lr=(lr, _pos_float(lr)),
               select_rows=(select_rows, _pos_int(select_rows)),
               budget_s=(budget_s, budget_s is None or _pos_float(budget_s)),
               num_threads=(num_threads, num_threads is None or _pos_int(num_threads)),
               tv_weights=(tv_weights, len(tv_weights) > 0 and all(
                   isinstance(w, (int, float)) and w >= 0 for w in tv_weights)),
               l2_weights=(l2_weights, len(l2_weights) > 0 and all(
                   isinstance(w, (int, float)) and w >= 0 for w in l2_weights)))
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    was_training = isinstance(encoder, nn.Module) and encoder.training
    params = list(encoder.parameters()) if isinstance(encoder, nn.Module) else []
    grad_flags = [p.requires_grad for p in params]
    try:
        if isinstance(encoder, nn.Module):
            encoder.eval()
        for p in params:
            p.requires_grad_(False)
        return _whitebox(encoder, mock_inputs, target_inputs, release or Release(), seed=seed,
                         priors=[(float(t), float(m))
                                 for t in (tv_weights if _image(target_inputs) else (0.0,))
                                 for m in l2_weights], iterations=iterations, lr=lr,
                         select_rows=select_rows, budget_s=budget_s)
    finally:
        for p, flag in zip(params, grad_flags):
            p.requires_grad_(flag)
        if was_training:
            encoder.train()
        torch.set_num_threads(threads)


def _whitebox(encoder: nn.Module, mock_inputs: torch.Tensor, target_inputs: torch.Tensor, release: Release,
              *, seed: int, priors: list[tuple[float, float]], iterations: int, lr: float, select_rows: int,
              budget_s: float | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    xm, xt = as_rows(mock_inputs, "mock_inputs"), as_rows(target_inputs, "target_inputs")
    shape = tuple(target_inputs.shape[1:])
    if tuple(mock_inputs.shape[1:]) != shape:
        raise ShapeError(f"Expected `mock_inputs` and `target_inputs` with the same row shape but got "
                         f"{tuple(mock_inputs.shape[1:])} and {shape}")
    if xm.shape[0] < 2 or xt.shape[0] < 1:
        raise ShapeError(f"Expected at least 2 mock rows and 1 target row but got {xm.shape[0]} and "
                         f"{xt.shape[0]}")
    image = is_image_shape(shape)
    gen = torch.Generator().manual_seed(seed)
    lo = xm.min(0).values.reshape(1, *shape)
    hi = xm.max(0).values.reshape(1, *shape)
    mean = xm.mean(0).reshape(1, *shape)
    mock_f = mock_inputs.detach().to(torch.float32)
    sel = torch.randperm(xm.shape[0], generator=gen)[:select_rows]
    z_sel = release.activations(encode(encoder, mock_f[sel], "mock_inputs"), gen)
    z_t = release.activations(encode(encoder, target_inputs.detach().to(torch.float32), "target_inputs"), gen)
    half = None if budget_s is None else t0 + budget_s / 2
    selection: dict[str, float] = {}
    best_w, best = priors[0], float("inf")
    for w in priors:
        rec, _ = _solve(encoder, z_sel, mean.expand(len(sel), *shape), lo, hi, w, iterations, lr, image, half)
        r = mse_ratio(rec.reshape(len(sel), -1), xm[sel], xm.mean(0))["ratio"]
        selection[f"{w[0]:g},{w[1]:g}"] = r
        if r < best:
            best_w, best = w, r
        if half is not None and time.perf_counter() > half:
            break
    end = None if budget_s is None else t0 + budget_s
    rec, done = _solve(encoder, z_t, mean.expand(xt.shape[0], *shape), lo, hi, best_w, iterations, lr,
                       image, end)
    pred = rec.reshape(xt.shape[0], -1)
    out: dict[str, Any] = mse_ratio(pred, xt, xm.mean(0))
    out["ssim"] = image_ssim(pred, xt, shape, xm)
    out.update({"tv_weight": best_w[0], "l2_weight": best_w[1], "selection": selection, "iterations": done,
                "n_target": int(xt.shape[0]), "seed": seed, "seconds": time.perf_counter() - t0,
                "budget_hit": done < iterations or len(selection) < len(priors)})
    return out
