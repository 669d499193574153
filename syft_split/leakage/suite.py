"""One entry point for the data owner: every attack on what leaves, with bounded cost.

:func:`leakage_suite` runs, on the data owner's side and on the *released* values:

1. :func:`~syft_split.leakage.passthrough.passthrough_check` — copies, affinity, rank, and a
   ridge (linear) decoder;
2. :func:`~syft_split.leakage.whitebox.whitebox_inversion` — rMLE input optimisation with TV
   and L2 priors (He et al., ACSAC 2019), started from the ridge decoder's reconstruction, for
   ``nn.Module`` segments;
3. :func:`~syft_split.leakage.attacks.decoder_attack` — a learned MLP decoder trained to
   convergence on mock (+ mixup) pairs;
4. dCor between the held-out records and their released activations (bias-corrected,
   :func:`~syft_split.leakage.dcor_leakage`; NoPeek's regulariser uses the V-statistic);
5. a label entry when labels leave (randomized response: fraction right, theory).

The reported figure is the **worst case** over the attacks (lowest MSE ratio, highest SSIM),
named by attack: what the data owner should believe an attacker can do.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .attacks import _pos_float, _pos_int, check_args, decoder_attack
from .metrics import as_rows, dcor_leakage, encode
from .modes import TrainView, mode_dependent
from .passthrough import passthrough_check
from .release import Release
from .whitebox import whitebox_inversion

__all__ = ["leakage_suite", "label_leakage", "rows_within", "ATTACKS"]

#: the attacks :func:`leakage_suite` runs, in order (``linear`` is the passthrough check's decoder).
ATTACKS = ("linear", "whitebox", "decoder")


def label_leakage(labels: torch.Tensor, release: Release, *, seed: int = 0) -> dict[str, Any] | None:
    """What released labels give away (``None`` when labels do not leave).

    The model owner's guess of a record's label is the released label: the fraction it gets
    right is measured by releasing ``labels`` once (seeded) and comparing, next to the
    theoretical keep probability ``e^ε / (e^ε + K - 1)`` of K-ary randomized response (1 for
    exact labels).
    """
    if not release.labels:
        return None
    gen = torch.Generator().manual_seed(seed)
    y = labels.detach().to(torch.int64).reshape(-1)
    out = release.released_labels(y, gen)
    return {"released": True, "epsilon": release.label_epsilon or None, "num_classes": release.num_classes,
            "correct_fraction": float((out == y).to(torch.float32).mean()) if y.numel() else math.nan,
            "theoretical": release.label_keep_probability(), "records": int(y.numel())}


def leakage_suite(encoder: Callable[[torch.Tensor], torch.Tensor], mock: torch.Tensor, held_out: torch.Tensor,
                  *, release: Release | None = None, held_out_labels: torch.Tensor | None = None,
                  budget_s: float = 30.0, seed: int = 0, attacks: Sequence[str] = ATTACKS,
                  num_threads: int | None = 1, max_batch: int | None = None,
                  memory_bytes: int | None = None) -> dict[str, Any]:
    """Run the attack suite on ``encoder`` (the proposed or current segment).

    Args:
        encoder: the segment (an ``nn.Module`` for the white-box attack and the Jacobian
            rank; any callable otherwise). Its weights and mode are left as found.
        mock: the owner's mock records (the attacker's side information).
        held_out: private records the attacks are scored on (never leave; scalars only).
        release: what leaves (noise on activations, released labels); default exact
            activations, no labels.
        held_out_labels: labels of ``held_out`` for the label entry (when labels leave).
        budget_s: seconds for the whole suite: up to 40% for the white-box attack, the rest
            for the decoder (the passthrough check is cheap and always runs); ``budget_hit``
            says if it cut an attack.
        seed: seeds every attack (deterministic for a seed unless the budget cuts).
        attacks: a subset of :data:`ATTACKS`.
        max_batch: the segment runs on at most this many rows at a time (forwards, and the
            white-box inversion's autograd); ``None``: all rows at once.
        memory_bytes: bound on the activations the suite keeps (counted as 16 bytes per
            value: float64 copies): fewer mock, held-out and decoder-augmentation rows and a
            narrower decoder when they would not fit; :class:`ConfigError` when not even 4
            held-out and 8 mock rows fit. ``None``: no bound.

    A segment whose output depends on its mode (BatchNorm/InstanceNorm with running statistics,
    Dropout: :func:`~syft_split.leakage.modes.mode_dependent`) is measured twice, in eval mode
    and as training runs it (:class:`~syft_split.leakage.modes.TrainView`: a copy in train mode
    on batches of ``max_batch`` rows; the white-box attack is eval-mode only), each with part of
    the budget; the result is the worse of the two (``modes`` says which gave what).

    Returns:
        ``attacks`` (name -> figures: ``ratio``, ``mse``, ``baseline_mse``, ``ssim``,
        ``seconds``, ...), ``passthrough`` (copies, affine, rank, ...), ``dcor`` (bias-corrected), ``labels``
        (or ``None``), ``worst`` (``ratio`` and its ``attack``, ``ssim`` and its
        ``ssim_attack``), ``release``, ``seconds``, ``budget_s``, ``budget_hit``, ``n_mock``,
        ``n_held_out``, ``seed``.
    """
    check_args(budget_s=(budget_s, _pos_float(budget_s)),
               attacks=(attacks, len(attacks) > 0 and all(a in ATTACKS for a in attacks)),
               max_batch=(max_batch, max_batch is None or _pos_int(max_batch)),
               memory_bytes=(memory_bytes, memory_bytes is None or _pos_int(memory_bytes)))
    layers = mode_dependent(encoder)
    if not layers:
        return _suite(encoder, mock, held_out, release=release, held_out_labels=held_out_labels,
                      budget_s=budget_s, seed=seed, attacks=attacks, num_threads=num_threads,
                      max_batch=max_batch, memory_bytes=memory_bytes)
    assert isinstance(encoder, nn.Module)
    t0 = time.perf_counter()
    ev = _suite(encoder, mock, held_out, release=release, held_out_labels=held_out_labels,
                budget_s=0.6 * budget_s, seed=seed, attacks=attacks, num_threads=num_threads,
                max_batch=max_batch, memory_bytes=memory_bytes)
    train = TrainView(encoder, max_batch)
    tr = _suite(train, mock, held_out, release=release, held_out_labels=held_out_labels,
                budget_s=0.4 * budget_s, seed=seed, num_threads=num_threads, max_batch=max_batch,
                memory_bytes=memory_bytes, attacks=[a for a in attacks if a != "whitebox"],
                batch_rows=max_batch)
    return _merge(ev, tr, layers, max_batch, time.perf_counter() - t0, budget_s)


def _merge(ev: dict[str, Any], tr: dict[str, Any], layers: list[str], batch: int | None,
           seconds: float, budget_s: float) -> dict[str, Any]:
    """The eval-mode and train-mode suites as one: every attack of both (train mode's named
    ``<attack>_train``), the worst over them, the more copies, the higher dCor."""
    out = dict(ev)
    attacks = dict(ev["attacks"])
    attacks.update({f"{k}_train": v for k, v in tr["attacks"].items()})
    out["attacks"] = attacks
    out["worst"] = _worst(attacks)
    pt = dict(ev["passthrough"])
    if tr["passthrough"]["copied_inputs"] > pt["copied_inputs"]:
        pt.update(copied_inputs=tr["passthrough"]["copied_inputs"],
                  copied_indices=tr["passthrough"]["copied_indices"])
    out["passthrough"] = pt
    if isinstance(tr["dcor"], float) and not (tr["dcor"] <= ev["dcor"]):
        out["dcor"] = tr["dcor"]
    out["modes"] = {"layers": layers, "train_batch": batch,
                    "eval": {"ratio": ev["worst"]["ratio"], "dcor": ev["dcor"],
                             "copied_inputs": ev["passthrough"]["copied_inputs"]},
                    "train": {"ratio": tr["worst"]["ratio"], "dcor": tr["dcor"],
                              "copied_inputs": tr["passthrough"]["copied_inputs"]}}
    out.update(seconds=seconds, budget_s=budget_s,
               budget_hit=bool(ev["budget_hit"] or tr["budget_hit"]),
               memory_cut=bool(ev["memory_cut"] or tr["memory_cut"]))
    return out


def _suite(encoder: Callable[[torch.Tensor], torch.Tensor], mock: torch.Tensor, held_out: torch.Tensor,
           *, release: Release | None, held_out_labels: torch.Tensor | None, budget_s: float, seed: int,
           attacks: Sequence[str], num_threads: int | None, max_batch: int | None,
           memory_bytes: int | None, batch_rows: int | None = None) -> dict[str, Any]:
    """One mode of :func:`leakage_suite` (``batch_rows``: the copies check allows a per-batch
    affine map, for a train-mode view)."""
    rel = release or Release()
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        mock, held_out, fit = _fit(encoder, mock, held_out, max_batch, memory_bytes)
        xm, xh = as_rows(mock, "mock"), as_rows(held_out, "held_out")
        results: dict[str, dict[str, Any]] = {}
        passthrough = passthrough_check(encoder, mock, held_out, release=rel, seed=seed,
                                        max_batch=max_batch, batch_rows=batch_rows)
        if "linear" in attacks:
            results["linear"] = dict(passthrough["linear"], seconds=passthrough["seconds"])
        if "whitebox" in attacks and isinstance(encoder, nn.Module):
            results["whitebox"] = whitebox_inversion(encoder, mock, held_out, release=rel, seed=seed,
                                                     budget_s=0.4 * budget_s, num_threads=None,
                                                     max_batch=max_batch)
        if "decoder" in attacks and fit["decoder_hidden"] != 0:
            left = max(budget_s - (time.perf_counter() - t0), 0.1 * budget_s)
            results["decoder"] = decoder_attack(encoder, mock, held_out, release=rel, seed=seed,
                                                budget_s=left, num_threads=None, max_batch=max_batch,
                                                augment=fit["augment"], hidden=fit["decoder_hidden"])
        gen = torch.Generator().manual_seed(seed)
        z_held = rel.activations(encode(encoder, held_out.detach().to(torch.float32), "held_out",
                                        max_batch), gen)
        dcor = dcor_leakage(xh, z_held) if xh.shape[0] >= 4 else math.nan
        labels = None
        if held_out_labels is not None:
            labels = label_leakage(held_out_labels, rel, seed=seed)
        elif rel.labels:
            labels = {"released": True, "epsilon": rel.label_epsilon or None, "num_classes": rel.num_classes,
                      "correct_fraction": None, "theoretical": rel.label_keep_probability(), "records": 0}
    finally:
        torch.set_num_threads(threads)
    worst = _worst(results)
    return {"attacks": results, "passthrough": {k: v for k, v in passthrough.items() if k != "linear"},
            "dcor": dcor, "labels": labels, "worst": worst, "release": rel.as_dict(),
            "seconds": time.perf_counter() - t0, "budget_s": budget_s,
            "budget_hit": any(bool(r.get("budget_hit")) for r in results.values()),
            "n_mock": int(xm.shape[0]), "n_held_out": int(xh.shape[0]), "seed": seed,
            "max_batch": max_batch, "memory_cut": fit["cut"]}


#: decoder augmentation rows without a memory bound (:func:`decoder_attack`'s default).
AUGMENT = 2000


def _fit(encoder: Callable[[torch.Tensor], torch.Tensor], mock: torch.Tensor, held_out: torch.Tensor,
         max_batch: int | None, memory_bytes: int | None
         ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The rows and decoder size that keep the suite's activations within ``memory_bytes``
    (16 bytes per kept value): ``(mock, held_out, {augment, decoder_hidden, cut})`` with
    ``decoder_hidden`` ``None`` (default width), a width, or ``0`` (no decoder)."""
    fit: dict[str, Any] = {"augment": AUGMENT, "decoder_hidden": None, "cut": False}
    if memory_bytes is None:
        return mock, held_out, fit
    per_value = 16
    out_dim = int(encode(encoder, mock[:2].detach().to(torch.float32), "mock", max_batch).shape[1])
    in_dim = int(mock[0].numel())
    rows = rows_within(memory_bytes, out_dim, in_dim, "measure leakage")
    n_held = min(held_out.shape[0], max(4, rows // 3))
    n_mock = min(mock.shape[0], rows - n_held)
    augment = min(AUGMENT, max(0, rows - n_held - n_mock))
    width = min(1024, max(128, 8 * in_dim))
    fits = memory_bytes // (per_value * (out_dim + in_dim))  # weights, gradient, Adam's two moments
    hidden = None if fits >= width else (fits if fits >= 16 else 0)
    cut = (n_held, n_mock, augment) != (held_out.shape[0], mock.shape[0], AUGMENT) or hidden is not None
    fit.update(augment=augment, decoder_hidden=hidden, cut=cut)
    return mock[:n_mock], held_out[:n_held], fit


def _worst(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ratios = {k: r["ratio"] for k, r in results.items()
              if r.get("ratio") is not None and math.isfinite(r["ratio"])}
    ssims = {k: r["ssim"] for k, r in results.items() if r.get("ssim") is not None}
    out: dict[str, Any] = {"ratio": None, "attack": None, "ssim": None, "ssim_attack": None}
    if ratios:
        k = min(ratios, key=ratios.__getitem__)
        out.update(ratio=ratios[k], attack=k, mse=results[k]["mse"], baseline_mse=results[k]["baseline_mse"])
    if ssims:
        k = max(ssims, key=ssims.__getitem__)
        out.update(ssim=ssims[k], ssim_attack=k)
    return out


def rows_within(memory_bytes: int, out_dim: int, in_dim: int, what: str) -> int:
    """How many records' activations (and inputs) a measurement may keep within
    ``memory_bytes`` (16 bytes per kept value); :class:`ConfigError` below the 12 it needs
    (4 held-out and 8 mock records), saying it cannot ``what``."""
    rows = memory_bytes // (16 * max(out_dim, in_dim))
    if rows < 12:
        raise ConfigError(f"the segment's {out_dim} output values per record are too many to "
                          f"{what} within {memory_bytes} bytes (at least 4 held-out and 8 mock "
                          "records are needed)")
    return rows
