"""The data owner's live watch over an input segment: a stop rule and a hijack detector.

The review measures the proposed weights once; training then follows gradients the model
owner chooses. :class:`LeakageWatch` runs at the data owner after every applied step:

* **Leakage of the current weights**, every ``every`` steps, by a cheap measure: the segment
  encodes the owner's mock rows and a probe of its private rows (eval mode, no gradients; a
  segment whose output depends on its mode, e.g. BatchNorm or Dropout, also as training runs
  it, on a copy in train mode, and the worse figure counts), the
  release transform applies (noise as configured), a ridge decoder fit on the mock pairs
  reconstructs the probe (the suite's linear decoder; ridge weight fixed at the baseline) →
  inversion MSE ratio and SSIM; plus dCor (bias-corrected, not NoPeek's V-statistic) between
  the probe and its released activations.
  A figure past the :class:`WatchBound` the owner set at approval halts the segment.
* **Training-hijack detector** (every step's cut gradient from the model owner and the labels
  the owner released for that batch, evaluated every ``detect_every`` steps in one pass). A
  feature-space hijack (Pasquini et al., CCS 2021) sends ``∂D(z)/∂z`` from its discriminator:
  it does not depend on the labels. An honest
  model owner minimises a loss of the released labels, so per-record gradients of two records
  with the same label point alike and those of different labels do not. The statistic is
  ``mean cos(g_i, g_j) over same-label pairs - mean over different-label pairs`` (the
  intrinsic attribute of Fu et al., "Focusing on Pinocchio's Nose: A Gradients Scrutinizer
  to Thwart Split-Learning Hijacking Attacks Using Intrinsic Attributes", NDSS 2023; the
  cosine label-leakage of Li et al., "Label Leakage and Protection in Two-party Split
  Learning", ICLR 2022, is the same structure seen from the attacker's side). The watch halts
  when the median over the last ``window`` steps falls below ``hijack_threshold`` (0.15). On
  the demo (``bench/leakage.py``, ``detection``; 100 steps, digits cut at pool1, 5 seeds) the
  lowest of every median the detector compared in honest runs (``honest_min_alignment`` in
  ``bench/results/leakage.json``, :attr:`LeakageWatch.median_min`) was 0.497 plain, 0.466 with
  NoPeek 2, 0.503 with NoPeek 8 and with randomized response ε=4; a simulated FSHA's median
  when the watch halted it (``fsha_alignment_at_halt``) was 0.003-0.008 from step 1 and
  0.011-0.028 after 30 honest steps: no false alarm, every hijack halted.
  It is passive (unlike SplitGuard's fake batches, Erdogan et al., WPES 2022, which need the
  data owner to compute or alter the loss) and works whenever the model owner holds the labels
  the data owner released. It needs the labels: without them (or with randomized response of
  ``ε < min_label_epsilon``, where honest alignment is too weak to separate) it reports
  ``not applicable`` and only the leakage bound guards. An adaptive hijacker that mixes a
  genuine task gradient into its own can evade it (the known limit of such detectors).

Costs (``bench/results/leakage.json``, 2 shared cores): on the demo's segment (digits, cut at
pool1) a step of plain local training takes ~1.0 ms; one measurement ~2 ms and the detector
~0.03-0.05 ms per step, so ``every=50`` costs ~9% of step time (on/off ratio 1.08-1.10;
``every=25``: 1.11-1.15). Over a transport a step costs far more (an in-process host ~1.5 ms,
a PySyft datasite ~90 ms), so a host may measure more often, e.g. every 5-10 steps on a
datasite, and once at each epoch's end (:meth:`LeakageWatch.measure`). A hijack from step
``s`` halts by step ``s + window + detect_every - 1`` (5 steps on the demo's runs).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, LeakageHaltError, ShapeError
from .attacks import image_ssim
from .metrics import as_rows, dcor_leakage, encode, mse_ratio
from .modes import TrainView, mode_dependent, worse_of
from .passthrough import ridge_decoder
from .release import Release

__all__ = ["WatchBound", "LeakageWatch", "label_alignment", "label_alignments", "MAX_HISTORY"]

#: measures a watch keeps in its history (the baseline and the newest): ~140 bytes each, saved
#: with the segment after every step
MAX_HISTORY = 1000


def _finite(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad_state(what: str) -> ConfigError:
    return ConfigError(f"Expected a watch state with {what}")


def _state_int(state: Mapping[str, Any], name: str, lo: int) -> int:
    v = state.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _bad_state(f"`{name}` an int >= {lo}, got {v!r}")
    return v


def _opt(name: str, v: float | None, lo: float, hi: float) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and lo <= v <= hi):
        raise ConfigError(f"Expected argument `{name}` to be None or a float in [{lo}, {hi}] but got {v!r}")


@dataclass(frozen=True)
class WatchBound:
    """The stop rule a data owner sets at approval (``None``: that figure is not bounded).

    Attributes:
        inversion_ratio: halt when the watch's inversion MSE ratio falls **below** this
            (smaller ratio = better reconstruction = more leakage).
        ssim: halt when the reconstruction SSIM rises **above** this (image records).
        dcor: halt when the distance correlation rises **above** this. It is the
            bias-corrected estimator (Székely & Rizzo 2014: ``sqrt(max(R², 0))`` of the
            U-centred statistic, :func:`~syft_split.leakage.dcor_leakage`), the figure the
            review and the watch show; NoPeek's regulariser (``nopeek`` defence) uses the
            V-statistic, which reads higher on small batches of wide records: a bound taken
            from NoPeek's values is on another scale.
        hijack: halt when the training-hijack detector fires.
    """

    inversion_ratio: float | None = None
    ssim: float | None = None
    dcor: float | None = None
    hijack: bool = True

    def __post_init__(self) -> None:
        _opt("inversion_ratio", self.inversion_ratio, 0.0, math.inf)
        _opt("ssim", self.ssim, -1.0, 1.0)
        _opt("dcor", self.dcor, 0.0, 1.0)
        if not isinstance(self.hijack, bool):
            raise ConfigError(f"Expected argument `hijack` to be a bool but got {self.hijack!r}")

    @classmethod
    def relative(cls, baseline: Mapping[str, Any], *, factor: float = 0.5, hijack: bool = True) -> WatchBound:
        """Halt when the inversion ratio falls below ``factor x`` its ``baseline`` value (the
        watch's figures at approval, :meth:`LeakageWatch.baseline`): "stop if an attacker's
        reconstruction error shrinks by more than ``1/factor``". SSIM and dCor stay unbounded
        (near 1 already for leaky segments, they move too little to bound relatively)."""
        _opt("factor", factor, 0.0, 1.0)
        r = baseline.get("inversion_ratio")
        return cls(inversion_ratio=None if r is None or not math.isfinite(r) else factor * float(r),
                   hijack=hijack)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (for the report)."""
        return asdict(self)


def label_alignments(grads: list[torch.Tensor], labels: list[torch.Tensor]) -> list[float | None]:
    """:func:`label_alignment` of several batches in one vectorised pass (batches of different
    sizes are padded with zero rows, which drop out)."""
    if len(grads) != len(labels):
        raise ShapeError(f"Expected as many label batches as gradients but got {len(labels)} and "
                         f"{len(grads)}")
    if not grads:
        return []
    rows = max(g.shape[0] for g in grads)
    dim = grads[0][0].numel() if grads[0].shape[0] else 0
    out: list[float | None] = [None] * len(grads)
    ok = [i for i, (g, y) in enumerate(zip(grads, labels))
          if g.shape[0] >= 2 and g[0].numel() == dim and y.numel() == g.shape[0]]
    if not ok or dim == 0:
        return out
    if all(grads[i].shape[0] == rows for i in ok):  # the usual case: one batch size
        g = torch.stack([grads[i].detach().reshape(rows, dim) for i in ok]).to(torch.float32)
        y = torch.stack([labels[i].detach().reshape(rows) for i in ok]).to(torch.int64)
    else:
        g = torch.zeros(len(ok), rows, dim)
        y = torch.zeros(len(ok), rows, dtype=torch.int64)
        for k, i in enumerate(ok):
            b = grads[i].shape[0]
            g[k, :b] = grads[i].detach().reshape(b, dim)
            y[k, :b] = labels[i].detach().reshape(-1)
    if bool((y < 0).any()):
        return out
    norms = torch.linalg.vector_norm(g, dim=2, keepdim=True)
    keep = (norms > 1e-6 * norms.amax(dim=1, keepdim=True)).to(g.dtype)
    unit = g * keep / norms.clamp_min(1e-30)
    onehot = F.one_hot(y).to(g.dtype) * keep
    n = keep.sum((1, 2))
    sq = onehot.sum(1).pow(2).sum(1)
    same = (onehot.transpose(1, 2) @ unit).pow(2).sum((1, 2))
    total = unit.sum(1).pow(2).sum(1)
    for k, (nk, sqk, samek, totk) in enumerate(torch.stack([n, sq, same, total], 1).tolist()):
        same_pairs, diff_pairs = sqk - nk, nk * nk - sqk
        if nk >= 2 and same_pairs >= 2 and diff_pairs >= 2:
            out[ok[k]] = float((samek - nk) / same_pairs - (totk - samek) / diff_pairs)
    return out


def label_alignment(grad: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Mean cosine between per-record gradients of same-label pairs minus that of
    different-label pairs (``None`` when the batch lacks such pairs or gradients are 0).

    Rows with a zero gradient carry no direction and are left out. With unit rows ``u_i`` and
    per-label sums ``S_k``: ``sum_{i!=j, same label} cos = sum_k |S_k|² - n`` and
    ``sum_{i!=j} cos = |sum_i u_i|² - n`` (no B x B matrix).
    """
    return label_alignments([grad], [labels])[0]


class LeakageWatch:
    """Watches one input segment during training; see the module docstring.

    Args:
        bound: the stop rule (:class:`WatchBound`).
        probe: private records the leakage is measured on (e.g. 64 held-out rows).
        mock: the owner's mock records (the attacker's pairs); at most ``mock_rows`` are used.
        every: measure leakage every ``every`` applied steps (the detector runs every step).
        release: what leaves (noise on the activations; released labels and their ε).
        hijack_threshold: halt when the median label alignment over the last ``window``
            steps with a value falls below this (the figures honest and FSHA runs reach on
            the demo are in the module docstring).
        window: steps in the detector's median.
        detect_every: the detector keeps each step's gradient and labels and evaluates them
            every ``detect_every`` steps in one vectorised pass (one pass costs about what
            one step's would): a hijack is halted at most ``window + detect_every - 1``
            steps after it starts.
        min_label_epsilon: randomized response with a smaller ε makes the detector
            not applicable.
        seed: seeds the noise the measure draws.
        max_batch: the segment runs on at most this many rows at a time (``None``: all at
            once).
    """

    def __init__(self, bound: WatchBound, *, probe: torch.Tensor, mock: torch.Tensor, every: int = 50,
                 release: Release | None = None, hijack_threshold: float = 0.15, window: int = 5,
                 detect_every: int = 5, min_label_epsilon: float = 2.0, mock_rows: int = 128,
                 seed: int = 0, max_batch: int | None = None) -> None:
        if not isinstance(bound, WatchBound):
            raise ConfigError(f"Expected argument `bound` to be a WatchBound but got {type(bound).__name__}")
        for name, v in (("every", every), ("window", window), ("detect_every", detect_every),
                        ("mock_rows", mock_rows), ("max_batch", 1 if max_batch is None else max_batch)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"Expected argument `{name}` to be an int >= 1 but got {v!r}")
        _opt("hijack_threshold", hijack_threshold, -1.0, 1.0)
        _opt("min_label_epsilon", min_label_epsilon, 0.0, math.inf)
        p, m = as_rows(probe, "probe"), as_rows(mock, "mock")
        if tuple(probe.shape[1:]) != tuple(mock.shape[1:]):
            raise ShapeError(f"Expected `probe` and `mock` with one row shape but got "
                             f"{tuple(probe.shape[1:])} and {tuple(mock.shape[1:])}")
        if p.shape[0] < 4 or m.shape[0] < 4:
            raise ShapeError(f"Expected at least 4 probe and 4 mock rows but got {p.shape[0]} and "
                             f"{m.shape[0]}")
        self.bound = bound
        self.every = every
        self.release = release or Release()
        self.hijack_threshold = float(hijack_threshold)
        self.window = window
        self.detect_every = detect_every
        self.seed = seed
        self.max_batch = max_batch
        self._probe = probe.detach().to(torch.float32)
        self._mock = mock.detach().to(torch.float32)[:mock_rows]
        self._shape = tuple(probe.shape[1:])
        self._gen = torch.Generator().manual_seed(seed)
        self._ridge: float | None = None
        self._alignments: deque[float] = deque(maxlen=window)
        #: the lowest and the latest median the detector compared with its threshold (None:
        #: no full window yet)
        self.median_min: float | None = None
        self.median_last: float | None = None
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        eps = self.release.label_epsilon
        self.hijack_applicable = self.release.labels and (eps == 0 or eps >= min_label_epsilon)
        self.history: list[dict[str, Any]] = []
        #: measures no longer in ``history`` (the oldest after the baseline)
        self.history_dropped = 0
        self.halted = False
        self.reason: str | None = None
        self.halted_at: int | None = None
        self.seconds = 0.0
        self.steps_seen = 0
        self.latest: dict[str, Any] = {}

    # ------------------------------------------------------------------ measuring
    def measure(self, module: nn.Module, step: int, *, record: bool = True) -> dict[str, Any]:
        """The cheap leakage measure of ``module``'s current weights (recorded in history and
        as ``latest`` unless ``record=False``: a look on request, e.g. the model owner's)."""
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"step": step, **self._figures(module)}
        if mode_dependent(module):  # what training releases too (batch statistics, Dropout)
            train = self._figures(TrainView(module, self.max_batch))
            entry = worse_of(entry, train)
            entry["train_mode"] = {k: train[k] for k in ("inversion_ratio", "ssim", "dcor")}
        entry["label_alignment"] = (statistics.median(self._alignments) if self._alignments
                                    else None)
        seconds = time.perf_counter() - t0
        entry["seconds"] = seconds
        self.seconds += seconds
        if record:
            self._keep(entry)
            self.latest = entry
        return entry

    def _figures(self, module: nn.Module | TrainView) -> dict[str, Any]:
        n_mock = self._mock.shape[0]
        z = encode(module, torch.cat([self._mock, self._probe]), "probe", self.max_batch)
        z = self.release.activations(z, self._gen)
        zm, zp = z[:n_mock], z[n_mock:]
        xm, xp = self._mock.reshape(n_mock, -1), self._probe.reshape(self._probe.shape[0], -1)
        if self._ridge is None:
            decode, self._ridge = ridge_decoder(zm, xm, seed=self.seed, dtype=torch.float32)
        else:
            decode, _ = ridge_decoder(zm, xm, weights=(self._ridge,), dtype=torch.float32)
        pred = decode(zp)
        return {"inversion_ratio": mse_ratio(pred, xp, xm.mean(0))["ratio"],
                "ssim": image_ssim(pred, xp, self._shape, xm), "dcor": dcor_leakage(xp, zp)}

    def baseline(self, module: nn.Module) -> dict[str, Any]:
        """Step-0 figures of the approved weights (call at approval; the relative bound and
        the review use them)."""
        return self.measure(module, 0)

    def after_step(self, module: nn.Module, step: int, *, grad: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> bool:
        """Call after every applied optimizer step of the segment.

        Args:
            module: the segment (its current weights are measured every ``every`` steps).
            step: the segment's step count after this step (1-based).
            grad: the cut gradient the model owner sent for this step's batch.
            labels: the labels released with that batch (as released: after randomized
                response), or ``None`` when none were released.

        Returns ``True`` if the watch is halted (now or earlier); then nothing is measured.
        """
        if self.halted:
            return True
        t0 = time.perf_counter()
        self.steps_seen += 1
        if self.bound.hijack and self.hijack_applicable and grad is not None and labels is not None:
            self._pending.append((step, grad.detach(), labels.detach()))
            if len(self._pending) >= self.detect_every:
                self._detect(step)
        self.seconds += time.perf_counter() - t0
        if not self.halted and step % self.every == 0:
            self._judge(self.measure(module, step))
        return self.halted

    def judge(self, module: nn.Module, step: int, *, note: str) -> bool:
        """Measure ``module``'s current weights now and hold them to the bound, whatever the
        step count (weights that no step of this segment made, e.g. loaded from peers:
        ``note`` says where from, in the history). Returns ``True`` if the watch is halted."""
        if not self.halted:
            entry = self.measure(module, step)
            entry["note"] = note
            self._judge(entry)
        return self.halted

    def _detect(self, step: int) -> None:
        """Alignment of the pending batches (one vectorised pass), then the window's median."""
        pending, self._pending = self._pending, []
        values = label_alignments([g for _, g, _ in pending], [y for _, _, y in pending])
        for a in values:
            if a is None:
                continue
            self._alignments.append(a)
            if len(self._alignments) == self.window:
                med = statistics.median(self._alignments)
                self.median_last = med
                self.median_min = med if self.median_min is None else min(self.median_min, med)
                if med < self.hijack_threshold:
                    self._halt(step, "training hijack suspected: the model owner's gradients no "
                                     f"longer follow the released labels (label alignment {med:.3f} "
                                     f"< {self.hijack_threshold:.3f}, median of {self.window} steps)")
                    return

    def _judge(self, e: dict[str, Any]) -> None:
        b, step = self.bound, e["step"]
        where = f"at step {step}, ridge decoder on {self._probe.shape[0]} of your records"
        # a figure that is not a number (weights the model owner blew up) is past every bound
        if b.inversion_ratio is not None and not e["inversion_ratio"] >= b.inversion_ratio:
            self._halt(step, f"inversion ratio {e['inversion_ratio']:.4f} < bound {b.inversion_ratio:.4f} "
                             f"({where})")
        elif b.ssim is not None and e["ssim"] is not None and not e["ssim"] <= b.ssim:
            self._halt(step, f"SSIM {e['ssim']:.4f} > bound {b.ssim:.4f} ({where})")
        elif b.dcor is not None and not e["dcor"] <= b.dcor:
            self._halt(step, f"dCor (bias-corrected) {e['dcor']:.4f} > bound {b.dcor:.4f} "
                             f"(at step {step})")

    def _halt(self, step: int, reason: str) -> None:
        self.halted, self.halted_at, self.reason = True, step, reason
        self._keep({"step": step, "halted": reason})

    def _keep(self, entry: dict[str, Any]) -> None:
        """Add ``entry`` to the history, which keeps the approval's baseline and the newest
        ``MAX_HISTORY - 1`` entries (``history_dropped`` counts the others): it is saved with
        the segment, and a history growing with every measure made a long run unsavable."""
        self.history.append(entry)
        over = len(self.history) - MAX_HISTORY
        if over > 0:
            del self.history[1:1 + over]
            self.history_dropped += over

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, Any]:
        """What this watch has decided and learnt, to go on after a restart (JSON data and
        tensors for :func:`syft_split.persist.pack`): the bound and schedule, the history (the
        approval's baseline first), the halt, the detector's window and pending steps, the
        measure's ridge weight and noise stream. The probe, the mock rows and the release are
        the data owner's own: :meth:`load_state` goes into a watch built from them again."""
        return {
            "bound": self.bound.as_dict(), "every": self.every, "ridge": self._ridge,
            "gen": self._gen.get_state(), "alignments": list(self._alignments),
            "pending": [{"step": s, "grad": g, "labels": y} for s, g, y in self._pending],
            "history": [dict(e) for e in self.history], "halted": self.halted,
            "history_dropped": self.history_dropped,
            "reason": self.reason, "halted_at": self.halted_at, "seconds": self.seconds,
            "steps_seen": self.steps_seen, "median_min": self.median_min,
            "median_last": self.median_last,
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state`. Every field is checked first: a bad state raises
        :class:`~syft_split.errors.ConfigError` and leaves this watch as it was."""
        if not isinstance(state, Mapping):
            raise _bad_state(f"a mapping, got {type(state).__name__}")
        raw_bound = state.get("bound")
        if not isinstance(raw_bound, Mapping):
            raise _bad_state("a bound (a mapping)")
        try:
            bound = WatchBound(**raw_bound)
        except (TypeError, ConfigError) as exc:
            raise _bad_state(f"a valid bound: {exc}") from exc
        every, seen = _state_int(state, "every", 1), _state_int(state, "steps_seen", 0)
        ridge, seconds = state.get("ridge"), state.get("seconds")
        if ridge is not None and not _finite(ridge):
            raise _bad_state(f"`ridge` None or a finite float, got {ridge!r}")
        if not _finite(seconds) or seconds < 0:
            raise _bad_state(f"`seconds` a float >= 0, got {seconds!r}")
        gen = torch.Generator()
        try:
            gen.set_state(state.get("gen"))  # type: ignore[arg-type]
        except (TypeError, RuntimeError) as exc:
            raise _bad_state(f"`gen` a generator state: {exc}") from exc
        alignments = state.get("alignments")
        if not isinstance(alignments, list) or len(alignments) > self.window or not all(
                _finite(a) for a in alignments):
            raise _bad_state(f"`alignments` at most {self.window} finite floats")
        pending = []
        raw_pending = state.get("pending")
        for e in raw_pending if isinstance(raw_pending, list) else [None]:
            if not isinstance(e, Mapping) or not isinstance(e.get("grad"), torch.Tensor) \
                    or not isinstance(e.get("labels"), torch.Tensor):
                raise _bad_state("`pending` a list of {step: int, grad: tensor, labels: tensor}")
            pending.append((_state_int(e, "step", 0), e["grad"], e["labels"]))
        history = state.get("history")
        if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
            raise _bad_state("`history` a list of dicts")
        dropped = _state_int(state, "history_dropped", 0) if "history_dropped" in state else 0
        halted, reason = state.get("halted"), state.get("reason")
        at = None if state.get("halted_at") is None else _state_int(state, "halted_at", 0)
        medians = state.get("median_min"), state.get("median_last")  # absent: an older file
        if not all(m is None or _finite(m) for m in medians):
            raise _bad_state(f"`median_min`/`median_last` None or finite floats, got {medians!r}")
        if not isinstance(halted, bool) or not (reason is None or isinstance(reason, str)):
            raise _bad_state(f"`halted` a bool and `reason` None or a str, got {halted!r}, "
                             f"{reason!r}")
        self.bound, self.every, self._ridge, self._gen = bound, every, ridge, gen
        self._alignments = deque((float(a) for a in alignments), maxlen=self.window)
        self._pending = pending
        self.history, self.history_dropped = [dict(e) for e in history[:1]], dropped
        for e in history[1:]:  # an older file's history may be longer than is kept now
            self._keep(dict(e))
        self.latest = next((e for e in reversed(self.history) if "halted" not in e), {})
        self.halted, self.reason, self.halted_at = halted, reason, at
        self.seconds, self.steps_seen = float(seconds), seen
        self.median_min, self.median_last = (None if m is None else float(m) for m in medians)

    # ------------------------------------------------------------------ host-facing
    def check(self) -> None:
        """Raise :class:`~syft_split.errors.LeakageHaltError` if halted (the host calls this
        before every op on the segment)."""
        if self.halted:
            raise LeakageHaltError(f"the data owner's leakage watch halted this segment at step "
                                   f"{self.halted_at}: {self.reason}")

    def report(self) -> dict[str, Any]:
        """JSON-able summary for the run report: bound, settings, history, halt, cost."""
        return {
            "bound": self.bound.as_dict(), "every": self.every, "release": self.release.as_dict(),
            "hijack_detector": {"applicable": self.hijack_applicable, "threshold": self.hijack_threshold,
                                "window": self.window, "detect_every": self.detect_every,
                                "median_min": self.median_min, "median_last": self.median_last},
            "history": [dict(e) for e in self.history], "history_dropped": self.history_dropped,
            "halted": self.halted, "reason": self.reason,
            "halted_at_step": self.halted_at, "steps": self.steps_seen, "seconds": self.seconds,
        }
