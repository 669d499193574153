"""What the data owner reads before approving: the suite's measured figures and warnings.

:func:`review_lines` turns a :func:`~syft_split.leakage.suite.leakage_suite` result (and,
optionally, the bound and the watch's step-0 figures) into review lines. Warnings come from
the measured figures — copies, an invertible linear map, reconstruction error and SSIM,
exact labels — never from layer widths.

The review measures the *proposed* weights only. It does not rehearse training on mock
data: the direction training takes is set by the model owner's gradients, which the data
owner cannot reproduce before approval (a hijacker would behave in a rehearsal), and on the
demo honest training does not change the verdict (``bench/results/leakage.json``,
``honest_training``: the decoder's ratio goes 0.097 -> 0.080, the ridge's 0.105 -> 0.089, the
white-box 7e-4 -> 2e-6; the proposed weights are already flagged as reconstructable). The
:class:`~syft_split.leakage.watch.LeakageWatch` measures the real trajectory instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .watch import WatchBound

__all__ = ["review_lines", "RECOGNISABLE_RATIO", "RECOGNISABLE_SSIM"]

#: reconstruction error at or below this fraction of guessing the mock mean is flagged.
RECOGNISABLE_RATIO = 0.25
#: reconstruction SSIM at or above this is flagged.
RECOGNISABLE_SSIM = 0.8

_NAMES = {"whitebox": "white-box inversion (rMLE, knows the weights)",
          "decoder": "learned decoder (MLP on mock pairs)", "linear": "linear decoder (ridge on mock pairs)"}


def _f(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _what_leaves(release: Mapping[str, Any]) -> str:
    noise = release["noise_sigma"]
    parts = ["activations" + (f" + Gaussian noise sigma={noise:g}" if noise else "")]
    if release["labels"]:
        eps = release["label_epsilon"]
        parts.append(f"labels (randomized response ε={eps:g})" if eps else "labels (exact)")
    return ", ".join(parts)


def review_lines(suite: Mapping[str, Any], *, bound: WatchBound | None = None,
                 watch_baseline: Mapping[str, Any] | None = None, every: int | None = None) -> list[str]:
    """Review lines (indented two spaces, like the host's review) for a suite result.

    ``bound``/``watch_baseline``/``every`` (optional) add what the live watch will do: its
    step-0 figures, what halts the segment, and whether the bound is already passed.
    """
    att = suite["attacks"]
    pt = suite["passthrough"]
    side = ("of your private records standing in for" if suite.get("mock_stand_in")
            else "mock records as")
    lines = [f"  leakage measured here on {suite['n_held_out']} of your records ({suite['n_mock']} "
             f"{side} the attacker's side data; what leaves: {_what_leaves(suite['release'])}; "
             f"{suite['seconds']:.1f} s):",
             "    attack                                          MSE ratio  SSIM   (ratio 1 = guessing the "
             "mock mean, 0 = exact; SSIM 1 = identical)"]
    modes = suite.get("modes")
    if modes:
        lines.insert(1, f"    the segment computes something else in training than in eval mode "
                        f"({', '.join(modes['layers'])}): measured both ways, as training runs it on a "
                        f"copy in train mode with batches of {modes['train_batch'] or 'all'} records "
                        f"(rows marked 'training mode'); every figure below is the worse of the two")
    for name in sorted(att, key=lambda k: att[k]["ratio"] if math.isfinite(att[k]["ratio"]) else math.inf):
        r = att[name]
        base = name[:-len("_train")] if name.endswith("_train") else name
        label = _NAMES.get(base, base) + (", training mode" if base != name else "")
        lines.append(f"    {label:<47} {_f(r['ratio']):<10} {_f(r.get('ssim')):<6} "
                     f"({r['seconds']:.1f} s{', cut by the time budget' if r.get('budget_hit') else ''})")
    w = suite["worst"]
    lines.append(f"    worst case: {w['attack']} (ratio {_f(w['ratio'])}); highest SSIM {_f(w['ssim'])}"
                 f"{'' if w['ssim_attack'] is None else ' (' + str(w['ssim_attack']) + ')'}")
    lines.append(f"    distance correlation, bias-corrected (records vs what leaves): {_f(suite['dcor'])} "
                 "(1.0: a similarity; NoPeek's regulariser uses the V-statistic, another scale)")
    rank = pt["jacobian_rank_median"]
    lines.append(f"    exact copies: {pt['copied_inputs']} of {pt['input_dim']} input values; affine map: "
                 f"{'yes, rank ' + str(pt['rank']) if pt['affine'] else 'no'}; local Jacobian rank "
                 f"{'n/a' if rank is None else rank} of {pt['input_dim']} ({pt['varying_inputs']} vary in "
                 "your data)")
    lab = suite.get("labels")
    if lab:
        got = lab.get("correct_fraction")
        lines.append(f"    labels leave: the model owner gets {_f(lab['theoretical'], '.1%')} right in theory"
                     f"{'' if got is None else ', ' + format(got, '.1%') + ' measured'}")
    lines.extend(_warnings(suite))
    if bound is not None:
        lines.extend(_watch_lines(bound, watch_baseline, every))
    return lines


def _warnings(suite: Mapping[str, Any]) -> list[str]:
    pt, w, out = suite["passthrough"], suite["worst"], []
    if pt["copied_inputs"]:
        idx = pt["copied_indices"][:8]
        more = "" if len(pt["copied_indices"]) <= 8 else ", ..."
        out.append(f"  WARNING: {pt['copied_inputs']} of your {pt['input_dim']} input values leave as exact "
                   f"copies (up to scale and offset, or a monotone map; flat indices {idx}{more})")
    if pt["affine"] and pt["rank"]:
        if pt["rank"] >= pt["input_dim"]:
            out.append("  WARNING: the segment is an invertible linear map: your records follow exactly from "
                       "what leaves (given the weights)")
        else:
            out.append(f"  WARNING: the segment is linear: {pt['rank']} of {pt['input_dim']} dimensions of "
                       "your records follow exactly from what leaves (given the weights)")
    r, s = w["ratio"], w["ssim"]
    if (r is not None and r <= RECOGNISABLE_RATIO) or (s is not None and s >= RECOGNISABLE_SSIM):
        out.append(f"  WARNING: your records can be reconstructed from what leaves: the {w['attack']} attack "
                   f"reaches {_f(r, '.1%')} of the error of guessing (SSIM {_f(s)}); "
                   f"flagged at ratio <= {RECOGNISABLE_RATIO} or SSIM >= {RECOGNISABLE_SSIM}")
    lab = suite.get("labels")
    if lab and not lab.get("epsilon"):
        out.append("  WARNING: labels leave exactly (no randomized response)")
    if suite.get("memory_cut"):
        out.append("  NOTE: the segment's outputs are large: fewer records (or a narrower decoder) were "
                   "used to stay within the review's memory bound; the figures may understate leakage")
    if suite.get("budget_hit"):
        out.append("  NOTE: the time budget cut an attack: the figures may understate leakage")
    return out


def _watch_lines(bound: WatchBound, base: Mapping[str, Any] | None, every: int | None) -> list[str]:
    halts = []
    if bound.inversion_ratio is not None:
        halts.append(f"inversion ratio < {bound.inversion_ratio:.4f}")
    if bound.ssim is not None:
        halts.append(f"SSIM > {bound.ssim:.4f}")
    if bound.dcor is not None:
        halts.append(f"dCor (bias-corrected) > {bound.dcor:.4f}")
    if bound.hijack:
        halts.append("a suspected training hijack")
    out = [f"  live watch{'' if every is None else f' (every {every} steps)'}: halts on "
           f"{', '.join(halts) if halts else 'nothing (no bound set)'}"]
    if base is not None:
        out.append(f"    now: inversion ratio {_f(base.get('inversion_ratio'), '.4f')} (ridge decoder), "
                   f"SSIM {_f(base.get('ssim'))}, dCor (bias-corrected) {_f(base.get('dcor'))}")
        past = ((bound.inversion_ratio is not None and base["inversion_ratio"] < bound.inversion_ratio)
                or (bound.ssim is not None and base.get("ssim") is not None and base["ssim"] > bound.ssim)
                or (bound.dcor is not None and base["dcor"] > bound.dcor))
        if past:
            out.append("  WARNING: the proposed weights are already past your bound: the watch would halt "
                       "at its first measurement")
    return out
