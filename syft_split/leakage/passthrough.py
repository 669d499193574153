"""Exact checks for segments that pass input values through: copies, linear maps, rank.

Layer widths say little: a ``Linear(64, 8)`` whose rows select 8 pixels sends 8 of 64 input
values out verbatim although it is narrow. :func:`passthrough_check` looks at what the segment
*computes*:

* **copies** — input coordinates that some output coordinate reproduces exactly, up to scale
  and offset (Pearson ``|corr| >= 1 - tol``) or up to any strictly monotone map (Spearman
  ``|corr| >= 1 - tol``), over the probe rows, on the noise-free outputs: selection,
  permutation and identity rows, also inside non-linear segments (``tanh`` of a pixel, a ReLU
  of a non-negative pixel). Coordinates that rarely differ from their usual value are not
  tested (a pixel lit in one record correlates with anything);
* **affine** — whether ``f(a·u + (1-a)·v) = a·f(u) + (1-a)·f(v)`` on random probe pairs (to a
  relative 1e-4). An affine segment is ``W·x + b``; its ``rank`` is how many input directions an
  attacker who learns ``W`` recovers exactly (``rank == input_dim``: the whole record);
* **local rank** — the median rank of the Jacobian at probe rows (a ReLU/max-pool segment is
  piecewise affine: full local rank means the white-box inversion has a unique local answer);
* **linear decoder** — ridge regression from the released activations to the input, fit on
  mock rows (ridge weight picked on held-back mock rows), scored on the held-out rows:
  MSE ratio and ``R² = 1 - ratio``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .attacks import image_ssim
from .metrics import as_rows, encode, forward, mse_ratio, row_chunks
from .release import Release

__all__ = ["passthrough_check", "ridge_decoder", "JACOBIAN_ENTRIES"]


def _supported(x: torch.Tensor) -> torch.Tensor:
    """Mask of input coordinates that differ from their most common value in at least
    ``max(5, 2%)`` of the rows (a pixel lit in one record correlates with anything)."""
    mode = torch.mode(x, dim=0).values
    off = (x != mode).sum(0)
    return off >= max(5, int(0.02 * x.shape[0]))


def _avg_ranks(t: torch.Tensor) -> torch.Tensor:
    """Column-wise ranks with ties averaged (Spearman's convention), float64."""
    out = torch.empty(t.shape, dtype=torch.float64)
    for j in range(t.shape[1]):
        _, inv, counts = torch.unique(t[:, j], return_inverse=True, return_counts=True)
        end = counts.cumsum(0).to(torch.float64)
        out[:, j] = (end - (counts.to(torch.float64) - 1) / 2)[inv]
    return out


def _max_abs_corr(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    xs, zs = x.std(0).clamp_min(1e-300), z.std(0).clamp_min(1e-300)
    corr = ((x - x.mean(0)) / xs).T @ ((z - z.mean(0)) / zs) / (x.shape[0] - 1)
    return corr.abs().max(1).values


def _per_batch(t: torch.Tensor, batch_rows: int) -> torch.Tensor:
    """``t`` with each column standardised within each batch of rows (a per-batch affine map
    undone: what BatchNorm's batch statistics apply in training)."""
    out = torch.empty_like(t)
    for s in row_chunks(t.shape[0], batch_rows):
        c = t[s] - t[s].mean(0)
        out[s] = c / c.pow(2).mean(0).sqrt().clamp_min(1e-300)
    return out


def _copies(x: torch.Tensor, z: torch.Tensor, tol: float, batch_rows: int | None = None) -> list[int]:
    """Input coordinates some output reproduces exactly: affine (Pearson) or any strictly
    monotone function (Spearman on tie-averaged ranks) with ``|corr| >= 1 - tol``; with
    ``batch_rows``, also up to an affine map per batch of that many rows."""
    xd, zd = x.double(), z.double()
    xi = torch.nonzero((xd.std(0) > 1e-12) & _supported(x)).flatten()
    if batch_rows is not None and batch_rows < x.shape[0]:
        xd, zd = _per_batch(xd, batch_rows), _per_batch(zd, batch_rows)
    zi = torch.nonzero(zd.std(0) > 1e-12).flatten()
    if xi.numel() == 0 or zi.numel() == 0:
        return []
    xv, zv = xd[:, xi], zd[:, zi]
    hit = (_max_abs_corr(xv, zv) >= 1 - tol) | (_max_abs_corr(_avg_ranks(xv), _avg_ranks(zv)) >= 1 - tol)
    return [int(i) for i in xi[hit]]


def ridge_decoder(z_fit: torch.Tensor, x_fit: torch.Tensor, *,
                  weights: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0),
                  val_fraction: float = 0.2, seed: int = 0, dtype: torch.dtype = torch.float64
                  ) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """A ridge map ``z -> x`` fit on rows ``(z_fit, x_fit)``: ``(predictor, weight)``.

    The ridge weight (relative to the mean squared centred activation) is picked from
    ``weights`` on ``val_fraction`` held-back rows (skipped for a single weight), then the map
    is refit on all rows. The predictor computes in ``dtype`` and returns float32."""
    z, x = z_fit.to(dtype), x_fit.to(dtype)
    n = z.shape[0]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    n_val = max(1, int(round(n * val_fraction))) if n >= 4 else 0

    def fit(rows: torch.Tensor, lam: float) -> Callable[[torch.Tensor], torch.Tensor]:
        zr, xr = z[rows], x[rows]
        zm, xmu = zr.mean(0), xr.mean(0)
        zc = zr - zm
        scale = float(zc.pow(2).mean()) or 1.0
        if zc.shape[1] <= zc.shape[0]:  # primal: (d_z x d_z)
            a = zc.T @ zc + lam * scale * zc.shape[0] * torch.eye(zc.shape[1], dtype=dtype)
            w = torch.linalg.solve(a, zc.T @ (xr - xmu))
        else:  # dual: (n x n)
            k = zc @ zc.T + lam * scale * zc.shape[0] * torch.eye(zc.shape[0], dtype=dtype)
            alpha = torch.linalg.solve(k, xr - xmu)
            if zc.shape[1] * alpha.shape[1] > 1 << 24:
                # W = zc.T @ alpha (d_z x d_x) would be large: predict through the n rows
                return lambda q: (((q.to(dtype) - zm) @ zc.T) @ alpha + xmu).float()
            w = zc.T @ alpha
        return lambda q: ((q.to(dtype) - zm) @ w + xmu).float()

    lam = weights[0]
    if n_val and len(weights) > 1:
        val, tr = order[:n_val], order[n_val:]
        errs = [float((fit(tr, w)(z[val]) - x[val].float()).pow(2).mean()) for w in weights]
        lam = weights[min(range(len(weights)), key=errs.__getitem__)]
    return fit(torch.arange(n), lam), lam


def _affine(f: Callable[[torch.Tensor], torch.Tensor], probe: torch.Tensor, gen: torch.Generator,
            max_batch: int | None = None) -> bool:
    n = probe.shape[0]
    i, j = torch.randperm(n, generator=gen), torch.randperm(n, generator=gen)
    a = torch.rand((n,) + (1,) * (probe.dim() - 1), generator=gen)
    mixed = a * probe[i] + (1 - a) * probe[j]
    lhs = forward(f, mixed, max_batch).reshape(n, -1).double()
    w = a.reshape(n, 1)
    rhs = (w * forward(f, probe[i], max_batch).reshape(n, -1)
           + (1 - w) * forward(f, probe[j], max_batch).reshape(n, -1)).double()
    scale = float(rhs.abs().max()) or 1.0
    return float((lhs - rhs).abs().max()) <= 1e-4 * scale


#: the Jacobian rank is computed on as many rows at once as keep its entries (output x input
#: values per row) within this many; a segment with more per row gets no rank (``None``).
JACOBIAN_ENTRIES = 1 << 24


def _jacobian_ranks(f: Callable[[torch.Tensor], torch.Tensor], probe: torch.Tensor,
                    out_dim: int, max_batch: int | None = None) -> list[int]:
    per_row = out_dim * probe[0].numel()
    if per_row > JACOBIAN_ENTRIES:
        return []
    rows = max(1, min(max_batch or probe.shape[0], JACOBIAN_ENTRIES // per_row))
    ranks: list[int] = []
    for s in row_chunks(probe.shape[0], rows):
        ranks += _chunk_ranks(f, probe[s].detach().clone().requires_grad_(True))
    return ranks


def _chunk_ranks(f: Callable[[torch.Tensor], torch.Tensor], probe: torch.Tensor) -> list[int]:
    n = probe.shape[0]

    def summed(x: torch.Tensor) -> torch.Tensor:
        return f(x).reshape(n, -1).sum(0)

    try:
        jac = torch.autograd.functional.jacobian(summed, probe, vectorize=True)
    except RuntimeError:  # an op without a batching rule: slower, plain reverse mode
        jac = torch.autograd.functional.jacobian(summed, probe)
    jac = jac.reshape(jac.shape[0], n, -1).permute(1, 0, 2).double()  # (n, out, in)
    return [int(r) for r in torch.linalg.matrix_rank(jac)]


def passthrough_check(encoder: Callable[[torch.Tensor], torch.Tensor], mock_inputs: torch.Tensor,
                      target_inputs: torch.Tensor, *, release: Release | None = None, seed: int = 0,
                      tol: float = 1e-5, jacobian_rows: int = 16,
                      max_batch: int | None = None, batch_rows: int | None = None) -> dict[str, Any]:
    """Copies, affinity, rank and a ridge (linear) decoder; see the module docstring.

    ``batch_rows`` (a train-mode view whose batch statistics apply an affine map per batch of
    that many rows): copies are also counted up to such a per-batch map.

    The segment runs on at most ``max_batch`` rows at a time (``None``: all at once); the
    Jacobian rank on as many as keep it within :data:`JACOBIAN_ENTRIES` entries (none: no rank).

    Probe rows are the mock and target rows together. ``release`` applies to the linear
    decoder (it sees what leaves); copies, affinity and rank describe the segment itself.

    Returns:
        ``copied_inputs`` (count), ``copied_indices`` (flat input indices),
        ``varying_inputs`` (inputs that differ from their most common value in at least
        ``max(5, 2%)`` of the probe rows: the ones copies are tested on), ``input_dim``,
        ``output_dim``, ``affine`` (bool), ``rank`` (of ``W`` if affine, else ``None``),
        ``jacobian_rank_median`` (``None`` if not differentiable), ``linear`` (``mse``,
        ``baseline_mse``, ``ratio``, ``r2``, ``ssim``), ``seconds``.
    """
    t0 = time.perf_counter()
    rel = release or Release()
    xm, xt = as_rows(mock_inputs, "mock_inputs"), as_rows(target_inputs, "target_inputs")
    probe = torch.cat([mock_inputs, target_inputs]).detach().to(torch.float32)
    x_all = torch.cat([xm, xt])
    was_training = isinstance(encoder, nn.Module) and encoder.training
    z_all = encode(encoder, probe, "probe", max_batch)
    copied = _copies(x_all, z_all, tol, batch_rows)
    gen = torch.Generator().manual_seed(seed)
    if isinstance(encoder, nn.Module):
        encoder.eval()
    try:
        affine = _affine(encoder, probe, gen, max_batch)
        try:
            ranks = _jacobian_ranks(encoder, probe[:jacobian_rows], int(z_all.shape[1]), max_batch)
            local = int(torch.tensor(ranks).median()) if ranks else None
        except (RuntimeError, TypeError):
            ranks, local = [], None
    finally:
        if was_training:
            assert isinstance(encoder, nn.Module)
            encoder.train()
    rank = ranks[0] if affine and ranks else None
    zm, zt = rel.activations(z_all[: xm.shape[0]], gen), rel.activations(z_all[xm.shape[0]:], gen)
    decode, lam = ridge_decoder(zm, xm, seed=seed)
    pred = decode(zt)
    lin: dict[str, Any] = mse_ratio(pred, xt, xm.mean(0))
    lin["r2"] = 1.0 - lin["ratio"]
    lin["ridge_weight"] = lam
    lin["ssim"] = image_ssim(pred, xt, tuple(target_inputs.shape[1:]), xm)
    varying = int(_supported(x_all).sum())
    return {"copied_inputs": len(copied), "copied_indices": copied, "varying_inputs": varying,
            "input_dim": int(xm.shape[1]), "output_dim": int(z_all.shape[1]), "affine": affine,
            "rank": rank, "jacobian_rank_median": local, "linear": lin,
            "seconds": time.perf_counter() - t0}
