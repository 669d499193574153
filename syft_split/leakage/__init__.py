"""Leakage a data owner can believe: attacks on what leaves, review lines, a live watch.

Pure torch, no transport; everything here runs on the data owner's side.

* :func:`leakage_suite` — every attack on the *released* values (:class:`Release`), the
  worst case named, seconds bounded: white-box inversion (:func:`whitebox_inversion`), a
  learned decoder trained to convergence (:func:`decoder_attack`), exact copy / linear /
  rank checks and a ridge decoder (:func:`passthrough_check`), dCor, a label entry.
* :func:`review_lines` — the review's lines and warnings from those figures.
* :class:`LeakageWatch` with a :class:`WatchBound` — re-measures the current weights during
  training, detects training hijacking, halts (:class:`~syft_split.errors.LeakageHaltError`).
* :func:`dcor_leakage`, :func:`inversion_attack` (earlier entry points), :func:`ssim`,
  :func:`mse_ratio`.

:mod:`syft_split.leakage.hijack` simulates honest and hijacking model owners (tests, bench).
"""

from __future__ import annotations

from .attacks import decoder_attack, inversion_attack
from .metrics import dcor_leakage, mse_ratio, ssim
from .passthrough import passthrough_check
from .release import Release
from .review import review_lines
from .suite import label_leakage, leakage_suite
from .watch import LeakageWatch, WatchBound, label_alignment
from .whitebox import whitebox_inversion

__all__ = [
    "dcor_leakage",
    "inversion_attack",
    "decoder_attack",
    "whitebox_inversion",
    "passthrough_check",
    "leakage_suite",
    "label_leakage",
    "review_lines",
    "LeakageWatch",
    "WatchBound",
    "label_alignment",
    "Release",
    "mse_ratio",
    "ssim",
]
