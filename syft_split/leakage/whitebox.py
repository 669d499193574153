"""White-box model inversion: solve for the input that produces what left.

He, Zhang & Lee, "Model inversion attacks against collaborative inference" (ACSAC 2019), §4
"white-box attack": regularised maximum likelihood estimation (rMLE)::

    x* = argmin_x  ||f(x) - z||² / ||z||²  +  λ · TV(x) / d  +  μ · ||x - x̄||² / (d · s²)

over the input domain (here the value range of the mock records), with ``f`` the segment,
``z`` the released activation, ``TV`` the anisotropic total variation of an image record and
``d`` its number of values, ``x̄`` the mock mean and ``s`` the width of the mock's value range
(a Gaussian prior: UnSplit's L2 term, centred on the mock). With Gaussian noise on ``z`` the
first term is the negative log-likelihood up to scale and the priors carry the estimate.
UnSplit (Erdogan et al., WPES 2022, ``unsplit/attacks.py``) runs the
same input optimisation with TV and L2 priors against an *unknown* segment (alternating with
model fitting); the data owner knows its own weights, so this bounds an attacker who learns
them (e.g. by UnSplit's model stealing or a weight-sharing topology).

The prior weights ``(λ, μ)`` are chosen on mock rows (the attacker can do the same: it knows the
mock inputs) from ``tv_weights x l2_weights``. The optimiser is L-BFGS (strong Wolfe line
search, float64) in two parametrisations (a sigmoid box, and unconstrained then clipped),
started from the reconstruction of a ridge decoder fit on the released mock pairs (it lands
the solve near the right basin: on the demo segment 3-15x lower error than from the mock
mean), from the mock mean, and unconstrained from ``restarts`` random mock records; each
record keeps the run with the lowest objective (an attacker can compute it: no ground truth
is used).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ShapeError
from .attacks import _pos_float, _pos_int, check_args, image_ssim
from .metrics import as_rows, encode, is_image_shape, mse_ratio, row_chunks
from .passthrough import ridge_decoder
from .release import Release

__all__ = ["whitebox_inversion", "total_variation"]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation per record of ``(N, C, H, W)`` images:
    ``Σ |x[h+1,w] - x[h,w]| + |x[h,w+1] - x[h,w]|`` over channels and pixels."""
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).sum(1)
            + (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).sum(1))


def _objective(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, z: torch.Tensor,
               z_norm: torch.Tensor, mean: torch.Tensor, spread: torch.Tensor, prior: tuple[float, float],
               image: bool) -> torch.Tensor:
    """The rMLE objective per record (see the module docstring)."""
    tv_weight, l2_weight = prior
    d = x[0].numel()
    out = (f(x).reshape(z.shape) - z).pow(2).sum(1) / z_norm
    if tv_weight > 0 and image:
        out = out + tv_weight * total_variation(x) / d
    if l2_weight > 0:
        out = out + l2_weight * (x - mean).pow(2).flatten(1).mean(1) / spread
    return out


def _solve(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, mean: torch.Tensor,
           runs: list[tuple[torch.Tensor, bool]], lo: torch.Tensor, hi: torch.Tensor,
           prior: tuple[float, float], iterations: int, image: bool,
           deadline: float | None) -> tuple[torch.Tensor, int]:
    """L-BFGS runs ``(start, sigmoid)``, the best per record by objective: ``(x, runs done)``.

    ``sigmoid``: ``x = lo + (hi - lo)·sigmoid(u)`` (stays in the box); otherwise unconstrained
    ``x`` clipped to the box afterwards. Neither wins everywhere: the sigmoid is flat at the
    edge of the range (where most of a digit sits), a clipped solve can stall elsewhere."""
    width = hi - lo
    spread = width.pow(2).mean().clamp_min(1e-12)
    z_norm = z.pow(2).sum(1).clamp_min(1e-12)
    best_x: torch.Tensor | None = None
    best_obj = torch.full((z.shape[0],), float("inf"), dtype=z.dtype)
    done = 0
    for start, sigmoid in runs:
        if sigmoid:
            u = torch.logit(((start - lo) / width).clamp(0.02, 0.98)).detach().clone().requires_grad_(True)
        else:
            u = start.detach().clone().requires_grad_(True)

        def to_x(u: torch.Tensor, sigmoid: bool = sigmoid) -> torch.Tensor:
            return lo + width * torch.sigmoid(u) if sigmoid else u

        opt = torch.optim.LBFGS([u], lr=1.0, max_iter=20, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-12, tolerance_change=1e-16)

        def closure(u: torch.Tensor = u, opt: torch.optim.LBFGS = opt,
                    to_x: Callable[[torch.Tensor], torch.Tensor] = to_x) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = _objective(f, to_x(u), z, z_norm, mean, spread, prior, image).sum()
            loss.backward()
            return loss

        for _ in range(max(1, iterations // 20)):
            opt.step(closure)
            if deadline is not None and time.perf_counter() > deadline:
                break
        with torch.no_grad():
            x_box = torch.maximum(torch.minimum(to_x(u), hi), lo)
            obj = _objective(f, x_box, z, z_norm, mean, spread, prior, image)
        keep = (obj < best_obj).reshape(-1, *[1] * (x_box.dim() - 1))
        best_x = x_box.clone() if best_x is None else torch.where(keep, x_box, best_x)
        best_obj = torch.minimum(obj, best_obj)
        done += 1
        if deadline is not None and time.perf_counter() > deadline:
            break
    assert best_x is not None
    return best_x.detach(), done


def _solve_rows(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, mean: torch.Tensor,
                runs: list[tuple[torch.Tensor, bool]], lo: torch.Tensor, hi: torch.Tensor,
                prior: tuple[float, float], iterations: int, image: bool, deadline: float | None,
                max_batch: int | None) -> tuple[torch.Tensor, int]:
    """:func:`_solve` on at most ``max_batch`` records at a time (records are independent:
    each has its own objective); runs done: the fewest over the chunks."""
    chunks = row_chunks(z.shape[0], max_batch)
    if len(chunks) == 1:
        return _solve(f, z, mean, runs, lo, hi, prior, iterations, image, deadline)
    parts, done = [], len(runs)
    for s in chunks:
        x, d = _solve(f, z[s], mean[s], [(start[s], sig) for start, sig in runs], lo, hi, prior,
                      iterations, image, deadline)
        parts.append(x)
        done = min(done, d)
    return torch.cat(parts), done


def _float64(encoder: nn.Module) -> tuple[nn.Module, torch.dtype]:
    """A float64 copy of the segment (L-BFGS converges much further in float64); the segment
    itself if it cannot be copied."""
    try:
        return copy.deepcopy(encoder).double(), torch.float64
    except Exception:  # a module that cannot be deep-copied: invert in its own precision
        return encoder, torch.float32


def _image(t: torch.Tensor) -> bool:
    return isinstance(t, torch.Tensor) and is_image_shape(tuple(t.shape[1:]))


def whitebox_inversion(encoder: nn.Module, mock_inputs: torch.Tensor, target_inputs: torch.Tensor, *,
                       release: Release | None = None, seed: int = 0,
                       tv_weights: Sequence[float] = (0.0, 1e-2, 1e-1),
                       l2_weights: Sequence[float] = (0.0, 0.1, 1.0, 3.0), iterations: int = 200,
                       restarts: int = 2, select_rows: int = 32, select_iterations: int = 40,
                       budget_s: float | None = None,
                       num_threads: int | None = 1, max_batch: int | None = None) -> dict[str, Any]:
    """rMLE white-box inversion (He et al. 2019) of the targets' released activations.

    ``(λ, μ)`` is picked from ``tv_weights x l2_weights`` by the MSE on ``select_rows`` mock
    rows after ``select_iterations`` L-BFGS iterations (TV applies to image records only; other
    records use ``λ = 0``), then the targets are inverted with it: ``iterations`` L-BFGS
    iterations per run, ``4 + restarts`` runs, in float64 (on a copy of the segment).
    ``budget_s`` caps the seconds (selection gets at most half); deterministic for a seed
    unless the budget cuts it. The encoder's parameters are not changed (no gradient is kept
    for them; an ``nn.Module`` runs in eval mode, mode restored). The segment runs (with
    autograd) on at most ``max_batch`` rows at a time: more rows are solved chunk by chunk.

    Returns:
        ``mse`` / ``baseline_mse`` / ``ratio`` / ``ssim`` as :func:`decoder_attack`,
        ``tv_weight``, ``l2_weight`` (chosen), ``selection`` ("λ,μ" -> mock MSE ratio),
        ``restarts`` (runs done on the targets), ``iterations``, ``n_target``, ``seed``, ``seconds``,
        ``budget_hit``.
    """
    if not callable(encoder):
        raise ConfigError(f"Expected `encoder` to be a callable module but got {type(encoder).__name__}")
    check_args(iterations=(iterations, _pos_int(iterations)), restarts=(restarts, _pos_int(restarts)),
               select_iterations=(select_iterations, _pos_int(select_iterations)),
               select_rows=(select_rows, _pos_int(select_rows)),
               budget_s=(budget_s, budget_s is None or _pos_float(budget_s)),
               num_threads=(num_threads, num_threads is None or _pos_int(num_threads)),
               max_batch=(max_batch, max_batch is None or _pos_int(max_batch)),
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
                                 for m in l2_weights], iterations=iterations, restarts=restarts,
                         select_iterations=select_iterations,
                         select_rows=select_rows, budget_s=budget_s, max_batch=max_batch)
    finally:
        for p, flag in zip(params, grad_flags):
            p.requires_grad_(flag)
        if was_training:
            encoder.train()
        torch.set_num_threads(threads)


def _whitebox(encoder: nn.Module, mock_inputs: torch.Tensor, target_inputs: torch.Tensor, release: Release,
              *, seed: int, priors: list[tuple[float, float]], iterations: int, restarts: int,
              select_rows: int, select_iterations: int, budget_s: float | None,
              max_batch: int | None) -> dict[str, Any]:
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
    # the box is the mock's value range (one interval for every value: a per-value box from a
    # few hundred mock records would forbid values the private records do take)
    lo, hi = xm.min().reshape(1), xm.max().reshape(1)
    if float(hi) <= float(lo):
        hi = lo + 1.0
    mean = xm.mean(0).reshape(1, *shape)
    mock_f = mock_inputs.detach().to(torch.float32)
    sel = torch.randperm(xm.shape[0], generator=gen)[:select_rows]
    z_sel = release.activations(encode(encoder, mock_f[sel], "mock_inputs", max_batch), gen)
    z_t = release.activations(encode(encoder, target_inputs.detach().to(torch.float32), "target_inputs",
                                     max_batch), gen)
    # the ridge decoder's reconstruction starts the solve near the right basin (the attacker
    # fits it on released mock pairs; for the selection rows, on the other mock rows)
    z_mock = release.activations(encode(encoder, mock_f, "mock_inputs", max_batch), gen)
    rest = torch.ones(xm.shape[0], dtype=torch.bool)
    rest[sel] = False
    ridge_sel, _ = ridge_decoder(z_mock[rest], xm[rest], seed=seed)
    ridge_all, _ = ridge_decoder(z_mock, xm, seed=seed)
    f, dt = _float64(encoder)
    start_sel = ridge_sel(z_sel).reshape(len(sel), *shape).to(dt)
    start_t = ridge_all(z_t).reshape(xt.shape[0], *shape).to(dt)
    z_sel, z_t, mean, lo, hi, mock_d = (t.to(dt) for t in (z_sel, z_t, mean, lo, hi, mock_f))
    start_sel, start_t = (torch.maximum(torch.minimum(s, hi), lo) for s in (start_sel, start_t))
    half = None if budget_s is None else t0 + budget_s / 2
    selection: dict[str, float] = {}
    best_w, best = priors[0], float("inf")
    m_sel = mean.expand(len(sel), *shape)
    sel_runs = [(start_sel, True), (m_sel, True), (start_sel, False), (m_sel, False)]
    for w in priors:  # the runs from the ridge start and the mean, fewer iterations
        rec, _ = _solve_rows(f, z_sel, m_sel, sel_runs, lo, hi, w, select_iterations, image, half,
                             max_batch)
        r = mse_ratio(rec.reshape(len(sel), -1).float(), xm[sel], xm.mean(0))["ratio"]
        selection[f"{w[0]:g},{w[1]:g}"] = r
        if r < best:
            best_w, best = w, r
        if half is not None and time.perf_counter() > half:
            break
    end = None if budget_s is None else t0 + budget_s
    n = xt.shape[0]
    m_t = mean.expand(n, *shape)
    runs = [(start_t, True), (m_t, True), (start_t, False), (m_t, False)]
    runs += [(mock_d[torch.randint(0, xm.shape[0], (n,), generator=gen)], False) for _ in range(restarts)]
    rec, done = _solve_rows(f, z_t, m_t, runs, lo, hi, best_w, iterations, image, end, max_batch)
    rec = rec.to(torch.float32)
    pred = rec.reshape(xt.shape[0], -1)
    out: dict[str, Any] = mse_ratio(pred, xt, xm.mean(0))
    out["ssim"] = image_ssim(pred, xt, shape, xm)
    out.update({"tv_weight": best_w[0], "l2_weight": best_w[1], "selection": selection, "restarts": done,
                "iterations": iterations, "n_target": int(xt.shape[0]), "seed": seed,
                "seconds": time.perf_counter() - t0,
                "budget_hit": done < len(runs) or len(selection) < len(priors)})
    return out
