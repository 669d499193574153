"""Leakage, measured by the data owner on its own side: before approval and during training.

- **Review**: the attack suite (:func:`syft_split.leakage.leakage_suite`: white-box inversion,
  a converged decoder, exact-copy / linear checks, dCor, labels) runs on the proposed weights,
  on exactly what would leave, and the review shows its figures and warnings.
- **Approval** installs a :class:`~syft_split.leakage.LeakageWatch` on an input segment with
  the bound the data owner sets (option ``leakage_bound``: a dict of ``inversion_ratio``,
  ``ssim``, ``dcor`` (absolute; the bias-corrected dCor the review shows, not NoPeek's
  V-statistic), ``relative`` (halt when the watch's inversion ratio falls
  below that fraction of its value at approval) and ``hijack``). Without the option the
  watch runs the training-hijack detector and records the figures but bounds none of them:
  honest training may legitimately make a representation more invertible (seen on tabular
  data: the ridge ratio halves within 25 steps), so how much is too much is the data owner's
  call, made on the review's figures. After every step the watch re-measures the current
  weights every ``HostLimits.watch_every`` steps and runs the hijack detector; past the bound
  the segment halts and every further op is refused with
  :class:`~syft_split.errors.LeakageHaltError` naming the figure.
- **Restarts**: the watch is saved in the segment's file with its steps (bound, history, halt,
  detector window; :meth:`LeakageOps.segment_state`) and rebuilt on restore: what the data
  owner approved keeps acting after a restart or a crash.
- **Bounded cost**: every forward of the segment the review, the watch and the ``leakage`` op
  run goes on at most the proposal's ``max_batch`` records at a time (the size check at
  proposal assumed that many; the white-box inversion's autograd too), and the activations
  they keep stay within ``max(HostLimits.max_activation_bytes, 256 MiB)`` (fewer mock,
  held-out and augmentation rows, a narrower decoder; a segment whose records do not fit is
  reported as not measurable). A failure inside the measurement comes out as a
  :class:`~syft_split.errors.ConfigError`, shown in the review.
- Model-owner ops (scalars only leave): ``leakage`` (the suite on the current weights, within
  ``HostLimits.review_budget_s`` a call and ``leakage_seconds_per_hour`` a segment) and
  ``watch`` (the watch's latest figures, measured now, and whether it halted). Data-owner op
  ``watch``: the whole watch (bound, history, halt).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ..errors import ConfigError, LeakageHaltError, SyftSplitError, ValidationError
from .dispatch import Host, OpFamily, op, owner_op, register_family
from .guard import SCALAR, TEXT, Call
from .records import AuditEntry, Dataset, Proposal, Runtime

__all__ = ["LeakageOps", "REVIEW_MEMORY_FLOOR", "MOCK_ROWS", "LEAKAGE_WINDOW_S"]

T = TypeVar("T")

#: the activations a review, watch or ``leakage`` op keeps are bounded by the larger of this and
#: ``HostLimits.max_activation_bytes``.
REVIEW_MEMORY_FLOOR = 1 << 28
#: at most this many mock records are used (the attacker's side data; the mock asset may be big).
MOCK_ROWS = 200
#: the window of ``HostLimits.leakage_seconds_per_hour`` (seconds)
LEAKAGE_WINDOW_S = 3600.0

_WATCH_FIELDS = {"step": SCALAR, "inversion_ratio": SCALAR, "ssim": SCALAR, "dcor": SCALAR,
                 "label_alignment": SCALAR, "seconds": SCALAR, "halted": SCALAR,
                 "reason": TEXT, "halted_at_step": SCALAR, "watch_seconds": SCALAR}


def _rows(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool] | None:
    """(held-out probe, mock, probe labels, mock is a stand-in) from a dataset, or None when it
    is too small. Without a mock asset, private records stand in for the attacker's side data
    (conservative: they look exactly like the targets)."""
    x = ds.features.to(torch.float32)
    n = x.shape[0]
    probe_n = min(128, n // 2)
    if probe_n < 4:
        return None
    mock = (ds.mock[:MOCK_ROWS].to(torch.float32) if ds.mock is not None
            else x[probe_n:probe_n + MOCK_ROWS])
    if mock.shape[0] < 8:
        return None
    labels = ds.labels[:probe_n] if ds.labels is not None else torch.zeros(0)
    return x[:probe_n], mock, labels, ds.mock is None


def _measuring(what: str, run: Callable[[], T], *, detail: bool = True) -> T:
    """``run()``, a failure of the segment inside it (e.g. out of memory, a shape it does not
    take) raised as :class:`ConfigError` naming ``what`` and the exception's type, and its
    text with ``detail`` (the data owner's review; never for the model owner's ops: torch's
    texts can be computed from private values)."""
    try:
        return run()
    except SyftSplitError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, MemoryError) as exc:
        text = f": {str(exc)[:200]}" if detail else ""
        raise ConfigError(f"{what} failed on this segment: {type(exc).__name__}{text}") from exc


def _scalar(v: Any) -> Any:
    if isinstance(v, bool) or isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v):
        return v
    return None


def _json(value: Any) -> Any:
    """``value`` with non-finite floats as None (JSON on the wire)."""
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@register_family
class LeakageOps(OpFamily):
    """Review figures, the live watch, and the ``leakage``/``watch`` ops."""

    name = "leakage"

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self._suites: dict[str, dict[str, Any]] = {}
        #: per segment, (monotonic time, seconds) of the ``leakage`` calls of the last hour
        self._spent: dict[str, list[tuple[float, float]]] = {}

    def _release(self, p: Proposal) -> Any:
        from ..leakage import Release

        return Release.from_defences(p.defences, release_labels=p.release_labels)

    def _watched(self, p: Proposal) -> bool:
        """Input segments, encrypted ones too: a malicious model owner can decrypt what an
        encrypted segment releases (SECURITY.md), so it is measured like a plain one."""
        return p.role == "input" and bool(p.datasets)

    # ------------------------------------------------------------------------- review
    def suite(self, p: Proposal) -> dict[str, Any] | None:
        """The attack suite on the proposed weights (run once per proposal, cached)."""
        from ..leakage import leakage_suite

        if not self._watched(p) or p.module is None:
            return None
        if p.id not in self._suites:
            rows = _rows(self.host.datasets[p.datasets[0]])
            if rows is None:
                return None
            probe, mock, labels, stand_in = rows
            module = p.module
            result = _measuring("the leakage review", lambda: leakage_suite(
                module, mock, probe, release=self._release(p),
                held_out_labels=labels if p.release_labels else None,
                budget_s=self.host.limits.review_budget_s, seed=0, max_batch=p.max_batch,
                memory_bytes=self._memory()))
            result["mock_stand_in"] = stand_in
            self._suites[p.id] = result
        return self._suites[p.id]

    def review_lines(self, proposal: Proposal) -> list[str]:
        from ..leakage import WatchBound, review_lines

        try:
            result = self.suite(proposal)
            if result is None:
                return []
            assert proposal.module is not None
            watch = self._new_watch(proposal)
            module = proposal.module
            base = _measuring("the leakage watch", lambda: watch.baseline(module))
        except SyftSplitError as exc:  # e.g. a segment whose output has no row per record
            return [f"  WARNING: leakage could not be measured on this segment: {exc}"]
        lines = []
        if result.get("mock_stand_in"):
            lines.append("  (no mock asset: private records stand in for the attacker's side data)")
        lines += review_lines(result, bound=WatchBound(), watch_baseline=base, every=watch.every)
        ratio = base.get("inversion_ratio")
        if isinstance(ratio, float) and math.isfinite(ratio):
            lines.append(f"    to halt on leakage too, approve with e.g. leakage_bound="
                         f"{{'relative': 0.5}} (halts below inversion ratio {0.5 * ratio:.4f}) or "
                         "an absolute {'inversion_ratio': ..., 'ssim': ..., 'dcor': ...}")
        return lines

    def _memory(self) -> int:
        return max(self.host.limits.max_activation_bytes, REVIEW_MEMORY_FLOOR)

    def _new_watch(self, p: Proposal) -> Any:
        from ..leakage import LeakageWatch, WatchBound
        from ..leakage.suite import rows_within

        ds = self.host.datasets.get(p.datasets[0])
        rows = None if ds is None else _rows(ds)
        if rows is None:
            raise ConfigError(f"dataset {p.datasets[0]!r} is not on {self.host.name} or has too "
                              "few records to watch")
        probe, mock, _, _ = rows
        # the watch keeps its mock and probe rows' activations, counted as the review does:
        # fewer rows for a segment with many values per record
        fit = rows_within(self._memory(), math.prod(p.output_shape), math.prod(p.input_shape),
                          "watch")
        n_probe = min(64, fit // 3)
        return LeakageWatch(WatchBound(), probe=probe[:n_probe], mock=mock,
                            mock_rows=min(128, fit - n_probe), release=self._release(p),
                            every=self.host.limits.watch_every, max_batch=p.max_batch)

    # ---------------------------------------------------------------------- the watch
    def on_approve(self, rt: Runtime, options: dict[str, Any]) -> None:
        from ..leakage import WatchBound

        bound_opt = options.pop("leakage_bound", None)
        if bound_opt is not None and not isinstance(bound_opt, (dict, WatchBound)):
            raise ConfigError(f"leakage_bound must be a dict of inversion_ratio/ssim/dcor/"
                              f"relative/hijack, got {bound_opt!r}")
        if not self._watched(rt.proposal) or _rows(
                self.host.datasets[rt.proposal.datasets[0]]) is None:
            return
        try:
            watch = self._new_watch(rt.proposal)
            base = _measuring("the leakage watch", lambda: watch.baseline(rt.module))
        except SyftSplitError as exc:  # not measurable (e.g. no row per record, or it fails)
            if bound_opt is not None:  # a bound nothing would enforce: not approved
                raise ConfigError(f"the leakage watch cannot be built on this segment ({exc}): "
                                  "its leakage_bound could not be enforced. Approve without "
                                  "leakage_bound to run it unwatched") from exc
            self.host.record(AuditEntry(time.time(), "watch", "approve", rt.id, {}, 0, 0, 0.0,
                                        f"runs unwatched: the leakage watch cannot be built "
                                        f"({exc})"))
            return
        if isinstance(bound_opt, dict):
            opts = dict(bound_opt)
            factor = opts.pop("relative", None)
            try:
                if factor is not None:
                    rel = WatchBound.relative(base, factor=factor, hijack=opts.pop("hijack", True))
                    opts.setdefault("inversion_ratio", rel.inversion_ratio)
                    opts["hijack"] = rel.hijack
                watch.bound = WatchBound(**opts)
            except TypeError as exc:
                raise ConfigError(f"leakage_bound: {exc}") from exc
        elif isinstance(bound_opt, WatchBound):
            watch.bound = bound_opt
        rt.extra["watch"] = watch

    def after_step(self, rt: Runtime, grad: Any) -> None:
        watch = rt.extra.get("watch")
        labels = rt.extra.pop("pending_labels", None)
        if watch is None or rt.proposal.status != "approved":
            return
        if watch.after_step(rt.module, rt.steps, grad=grad, labels=labels):
            self.host.halt(rt.id, f"leakage watch: {watch.reason}", by="watch")

    def after_load(self, rt: Runtime) -> None:
        """Weights loaded from peers (a relayed copy, an average) are measured at once and held
        to the bound, like a step's: past it the watch halts and the load is refused (the
        segment keeps its own weights; :meth:`WeightOps._load` puts them back and halts it)."""
        watch = rt.extra.get("watch")
        if watch is None or rt.proposal.status != "approved":
            return
        if _measuring("the leakage watch", lambda: watch.judge(
                rt.module, rt.steps, note="weights loaded from peers"), detail=False):
            raise LeakageHaltError(f"leakage watch: weights loaded from peers: {watch.reason}")

    # ---------------------------------------------------- persistence (host.store)
    def segment_state(self, rt: Runtime) -> dict[str, Any] | None:
        """The watch (None: none was installed) and the labels released with the pending
        forward (what its gradient will answer to), saved with the segment's steps."""
        if not self._watched(rt.proposal):
            return None
        watch = rt.extra.get("watch")
        return {"watch": None if watch is None else watch.state(),
                "pending_labels": rt.extra.get("pending_labels")}

    def restore_segment(self, rt: Runtime, state: Any) -> None:
        """Rebuild the watch from the data owner's records and its saved state: the bound the
        data owner approved, the history, the halt and the detector's window go on as before.
        A watched segment whose watch cannot be rebuilt (not in its file, e.g. written by an
        older version, or invalid) is halted: it never runs unwatched."""
        if not self._watched(rt.proposal):
            return
        try:
            if not isinstance(state, dict):
                raise ConfigError("its state is not in the segment's file")
            watch = None
            if state.get("watch") is not None:  # None: approved unwatched (not measurable)
                watch = self._new_watch(rt.proposal)
                watch.load_state(state["watch"])
        except ConfigError as exc:
            if rt.proposal.status == "approved":
                self.host.halt(rt.id, f"this segment's leakage watch could not be rebuilt "
                                      f"({exc}): propose this segment again", by="watch")
            return
        rt.extra.pop("watch", None)
        if watch is not None:
            rt.extra["watch"] = watch
        labels = state.get("pending_labels")
        if isinstance(labels, torch.Tensor) and rt.pending_output is not None:
            rt.extra["pending_labels"] = labels
        else:
            rt.extra.pop("pending_labels", None)

    @owner_op("watch")
    def owner_watch(self, segment: str) -> dict[str, Any]:
        """The data owner's view of a segment's live watch: bound, every figure measured so
        far (``history``), whether and why it halted. Empty: no watch on that segment."""
        w = self.host.owned_runtime(segment).extra.get("watch")
        return {} if w is None else _json(w.report())

    # ---------------------------------------------------------------- model-owner ops
    @op("watch", roles=("input",), egress=_WATCH_FIELDS)
    def watch(self, call: Call) -> dict[str, Any]:
        """The watch's figures on the current weights (measured now) and its state."""
        rt = call.rt
        assert rt is not None
        w = rt.extra.get("watch")
        if w is None:  # no watch on this segment (not measurable, or too few records)
            return {}
        entry = w.measure(rt.module, rt.steps, record=False)  # asking adds nothing to keep
        out = {k: _scalar(entry.get(k)) for k in ("step", "inversion_ratio", "ssim", "dcor",
                                                   "label_alignment", "seconds")}
        out.update(halted=bool(w.halted), watch_seconds=float(w.seconds))
        return {k: v for k, v in out.items() if v is not None}

    def _left(self, segment: str) -> float:
        """Seconds of ``leakage`` calls ``segment`` may still spend this hour
        (``HostLimits.leakage_seconds_per_hour``); refused (ValidationError) when none."""
        now, cap = time.monotonic(), self.host.limits.leakage_seconds_per_hour
        spent = [(t, s) for t, s in self._spent.get(segment, ()) if now - t < LEAKAGE_WINDOW_S]
        self._spent[segment] = spent
        used = sum(s for _, s in spent)
        if used >= cap:
            raise ValidationError(f"{segment}: leakage measurements took {used:.1f} s in the last "
                                  f"hour; this data owner allows {cap:g} s an hour per segment "
                                  "(HostLimits.leakage_seconds_per_hour): ask again later")
        return cap - used

    @op("leakage", roles=("input",), egress={"*": SCALAR})
    def leakage(self, call: Call) -> dict[str, Any]:
        """The attack suite on the current weights, scored on held-out records here, within
        the data owner's ``review_budget_s`` (the model owner may ask for less, never more:
        the host is busy meanwhile) and what is left of the segment's
        ``HostLimits.leakage_seconds_per_hour`` (the seconds each call took count; a call
        past it is refused). The hour's count is not kept across a restart."""
        from ..leakage import leakage_suite

        rt = call.rt
        assert rt is not None
        ds = self.host.dataset(rt, call.req)
        budget = call.req.get("budget_s", self.host.limits.review_budget_s)
        if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 0 < budget <= 120:
            raise ValidationError(f"budget_s must be in (0, 120], got {budget!r}")
        budget = min(float(budget), self.host.limits.review_budget_s, self._left(rt.id))
        rows = _rows(ds)
        if rows is None:  # too few records to score an attack on: say how many, nothing else
            return {"records": int(ds.features.shape[0])}
        probe, mock, labels, _ = rows
        rt.module.eval()
        started = time.monotonic()
        try:
            r = _measuring("the leakage measurement", lambda: leakage_suite(
                rt.module, mock, probe, release=self._release(rt.proposal),
                held_out_labels=labels if rt.proposal.release_labels else None,
                budget_s=budget, seed=0, max_batch=rt.proposal.max_batch,
                memory_bytes=self._memory()), detail=False)
        finally:
            rt.module.train()
            self._spent[rt.id].append((started, time.monotonic() - started))
        out: dict[str, Any] = {"records": r["n_held_out"], "dcor": r["dcor"],
                               "inversion_ratio": r["worst"]["ratio"],
                               "inversion_ssim": r["worst"]["ssim"], "seconds": r["seconds"]}
        for name, figures in r["attacks"].items():
            out[f"{name}_ratio"] = figures.get("ratio")
            out[f"{name}_ssim"] = figures.get("ssim")
        if r.get("labels"):
            out["labels_correct_fraction"] = r["labels"].get("correct_fraction")
            out["labels_theoretical"] = r["labels"].get("theoretical")
        return {k: v for k, v in ((k, _scalar(v)) for k, v in out.items()) if v is not None}
