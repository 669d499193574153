"""The one guard every value crosses on its way into or out of a data owner's host.

Ingress: record indices, activations and gradients a model owner sends are checked against
what the data owner approved (shape, dtype, finite, magnitude, batch) before anything runs.

Egress: every op declares the fields its response may carry, each with a :class:`Rule`; the
dispatcher hands every response to :meth:`Guard.release`, which refuses (``EgressError``) any
undeclared field and any value its rule rejects. No op writes to the wire by any other path.
A halt the data owner asks for (:meth:`Guard.stop`, from any thread, before the host's serving
lock is taken) closes the gate of that segment at once: an op in progress is refused
(``ApprovalError``) when its answer reaches the guard, and long loops (local training epochs)
look at :meth:`Guard.still_open` between their steps.
:meth:`Guard.admit` applies the optional cap on records released per minute, before an op runs;
its window (wall-clock times) is saved with the segment and comes back after a restart. A
window that changed alone (an evaluation's records, a PSI call's work, a refused proposal's
slot) is saved at most every :data:`WINDOW_SAVE_S` (:func:`window_save_due`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import wire
from ..errors import ApprovalError, EgressError, ProtocolError, ValidationError
from ..wire import within
from .records import Dataset, HostLimits, Runtime

__all__ = [
    "Call",
    "Guard",
    "Rule",
    "ACTIVATION",
    "GRAD_INPUT",
    "LABELS",
    "CIPHERTEXT",
    "SEALED",
    "WEIGHTS",
    "SCALAR",
    "TEXT",
    "JSON",
    "BYTES",
    "WINDOW_SAVE_S",
    "window_save_due",
]


@dataclass
class Call:
    """One model-owner request as an op sees it: who, what, on which approved runtime.

    ``rows`` is set by the op to the number of records the response concerns (the batch).
    ``undo`` is set by an op that applies a held-back step before it computes its answer (a
    fused forward or loss step): the host calls it if that answer is refused, and the segment
    is as it was before the call. ``unchanged`` is set by an op that found nothing to change
    (a ``discard`` with nothing pending): nothing is saved for it."""

    caller: str
    op: str
    req: dict[str, Any]
    rt: Runtime | None = None
    rows: int | None = None
    undo: Callable[[], None] | None = None
    unchanged: bool = False


#: a rule checks one outgoing value; it raises EgressError to stop it.
Rule = Callable[[str, Any, Call, "Guard"], None]


def _refuse(call: Call, name: str, why: str) -> EgressError:
    seg = f" of {call.rt.id}" if call.rt is not None else ""
    return EgressError(f"op {call.op!r}{seg} tried to release field {name!r}: {why}")


def _tensor(name: str, value: Any, call: Call, guard: Guard, shape: tuple[int, ...],
            dtype: torch.dtype | None = torch.float32) -> None:
    if not isinstance(value, torch.Tensor):
        raise _refuse(call, name, f"expected a tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape or (dtype is not None and value.dtype != dtype):
        raise _refuse(call, name, f"{tuple(value.shape)} {value.dtype}; approved: {shape} "
                                  f"{dtype if dtype is not None else ''}".rstrip())
    if value.is_floating_point() and not within(value, guard.limits.max_abs_value):
        if not bool(torch.isfinite(value).all()):
            raise _refuse(call, name, "non-finite values (NaN/Inf) never leave")
        raise _refuse(call, name, f"magnitude above the approved bound "
                                  f"{guard.limits.max_abs_value:g}")


def _rows(call: Call, name: str) -> int:
    if call.rows is None:
        raise _refuse(call, name, "the op did not say how many records it answers")
    return call.rows


def ACTIVATION(name: str, value: Any, call: Call, guard: Guard) -> None:
    """The approved cut-layer output, (batch, *output_shape) float32, finite, bounded; never
    from a segment approved to release only ciphertexts."""
    rt = call.rt
    if rt is None or rt.proposal.role not in ("input", "middle"):
        raise _refuse(call, name, "only input and middle segments release activations")
    if rt.proposal.he is not None:
        raise _refuse(call, name, "this segment was approved to release ciphertexts only")
    _tensor(name, value, call, guard, (_rows(call, name), *rt.proposal.output_shape))


def GRAD_INPUT(name: str, value: Any, call: Call, guard: Guard) -> None:
    """The gradient w.r.t. a middle or loss segment's input, (batch, *input_shape)."""
    rt = call.rt
    if rt is None or rt.proposal.role not in ("middle", "loss"):
        raise _refuse(call, name, "only middle and loss segments release input gradients")
    _tensor(name, value, call, guard, (_rows(call, name), *rt.proposal.input_shape))


def LABELS(name: str, value: Any, call: Call, guard: Guard) -> None:
    """A batch's labels: only where the data owner approved releasing them."""
    rt = call.rt
    if rt is None or not rt.proposal.release_labels:
        raise _refuse(call, name, "labels stay here: releasing them was not approved")
    if not isinstance(value, torch.Tensor) or value.dim() < 1 or value.shape[0] != _rows(call, name):
        raise _refuse(call, name, f"expected one label per record ({call.rows})")
    _tensor(name, value, call, guard, tuple(value.shape), dtype=None)


def CIPHERTEXT(name: str, value: Any, call: Call, guard: Guard) -> None:
    """CKKS material of a segment approved with encryption (never a secret key: he_layers
    builds it from public material only)."""
    if call.rt is None or call.rt.he is None:
        raise _refuse(call, name, "ciphertexts leave only segments approved with encryption")
    BYTES(name, value, call, guard)


def SEALED(name: str, value: Any, call: Call, guard: Guard) -> None:
    """Weights sealed for a trusted peer data owner (the model owner relays, cannot read)."""
    if call.rt is None or call.rt.proposal.share_weights != "peer":
        raise _refuse(call, name, "sealed weights leave only segments approved for peer sharing")
    BYTES(name, value, call, guard)


def WEIGHTS(name: str, value: Any, call: Call, guard: Guard) -> None:
    """A segment's weight tensor: only if the data owner released them to the model owner
    (its own approval: weights reveal training data)."""
    rt = call.rt
    if rt is None or not rt.extra.get("weights_released"):
        raise _refuse(call, name, "the data owner has not released these weights")
    key = name.removeprefix("state/")
    own = rt.module.state_dict().get(key)
    if own is None:
        raise _refuse(call, name, "not a weight of this segment")
    _tensor(name, value, call, guard, tuple(own.shape), dtype=own.dtype)


def SCALAR(name: str, value: Any, call: Call, guard: Guard) -> None:
    """One finite number or bool (losses, counts, measured figures)."""
    ok = isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value))
    if not ok:
        raise _refuse(call, name, f"expected a finite scalar, got {value!r:.60}")


def TEXT(name: str, value: Any, call: Call, guard: Guard) -> None:
    """A short identifier (segment id, status, host name)."""
    if not isinstance(value, str) or len(value) > 256:
        raise _refuse(call, name, "expected a short string")


def JSON(name: str, value: Any, call: Call, guard: Guard) -> None:
    """Public JSON data (metadata, shapes); no tensors, bounded size."""
    if isinstance(value, (torch.Tensor, bytes)) or len(repr(value)) > 65_536:
        raise _refuse(call, name, "expected small JSON data")


def BYTES(name: str, value: Any, call: Call, guard: Guard) -> None:
    """Opaque protocol bytes (PSI messages, ciphertexts), bounded by the response size cap."""
    if not isinstance(value, bytes):
        raise _refuse(call, name, f"expected bytes, got {type(value).__name__}")
    if len(value) > wire.DEFAULT_MAX_BYTES:
        raise _refuse(call, name, f"{len(value)} bytes exceed the response cap")


#: the span of the per-minute rate windows, in seconds of wall-clock time
WINDOW_S = 60.0


def in_window(t: float, now: float) -> bool:
    """Whether the wall-clock time ``t`` lies in the minute up to ``now`` (an entry from after
    ``now``, the clock having been set back, does not stay forever)."""
    return 0.0 <= now - t <= WINDOW_S


#: seconds between saves of a rate window that changed alone (nothing else the call did needed
#: saving), from the end of one save to the next: a crash forgets at most the entries charged
#: in that long after a save, so after a restart the cap is looser by at most that much, never
#: stricter
WINDOW_SAVE_S = 1.0


def window_save_due(saved_at: dict[str, float], key: str, now: float,
                    every: float | None = None) -> bool:
    """Whether the rate window(s) saved under ``key`` are due for a save at wall-clock ``now``:
    none ended in the last ``every`` seconds (default :data:`WINDOW_SAVE_S`; a clock set back
    makes it due). The caller records in ``saved_at[key]`` when its save ended, failed or not
    (a save slower than ``every`` then cannot make every call save; a failed one marks the
    store unsaved, and the next change saves everything)."""
    last = saved_at.get(key)
    span = WINDOW_SAVE_S if every is None else every
    return last is None or not 0.0 <= now - last < span


def last_minute(entries: Iterable[tuple[float, int]], now: float
                ) -> tuple[deque[tuple[float, int]], int]:
    """The ``(time, amount)`` entries of the minute up to ``now`` and their total: a rate cap's
    window (records a segment released, PSI elements a user had processed)."""
    recent = deque(e for e in entries if in_window(e[0], now))
    return recent, sum(n for _, n in recent)


class Guard:
    """Ingress checks and the egress gate of one host (see the module docstring)."""

    def __init__(self, limits: HostLimits) -> None:
        self.limits = limits
        self._released: dict[str, deque[tuple[float, int]]] = {}
        #: segments the data owner asked to halt, with the reason: nothing of theirs passes
        #: from the moment it is asked (set from the console's thread, without the serving lock)
        self._stopped: dict[str, str] = {}
        #: halts asked per segment and not undone (:meth:`reopen`): a gate opens again only
        #: when every halt that asked for it failed
        self._asks: Counter[str] = Counter()
        self._stop_lock = threading.Lock()
        self._charged: dict[str, int] = {}

    # -------------------------------------------------------------------------- halts
    def stop(self, segment: str, reason: str) -> bool:
        """Close the gate of ``segment`` now (thread-safe, no other lock needed): from this
        call on no answer of it passes :meth:`release`, an op in progress included. True if
        this call closed it (False: it was closed already). Each call counts as one halt
        asked (see :meth:`reopen`)."""
        with self._stop_lock:
            self._asks[segment] += 1
            if segment in self._stopped:
                return False
            self._stopped[segment] = str(reason)[:1000]
            return True

    def reopen(self, segments: Iterable[str]) -> None:
        """A halt that asked for the gates of ``segments`` (:meth:`stop`) failed: each opens
        again once no other halt asked for it is still on its way (review R13: a failed halt
        opened the gate a valid halt of the same segment, waiting for the lock, relied on)."""
        with self._stop_lock:
            for segment in segments:
                left = self._asks[segment] - 1
                if left > 0:
                    self._asks[segment] = left
                else:
                    self._asks.pop(segment, None)
                    self._stopped.pop(segment, None)

    def stopped(self, segment: str) -> str | None:
        """Why ``segment``'s gate is closed (the data owner's halt reason), or None."""
        with self._stop_lock:
            return self._stopped.get(segment)

    def stops(self) -> dict[str, str]:
        """Every closed gate: segment -> reason (saved with the host's state)."""
        with self._stop_lock:
            return dict(self._stopped)

    def still_open(self, call: Call) -> None:
        """Refuse (``ApprovalError``) ``call`` if the data owner asked to halt its segment
        since it began: its answer never leaves, and a long op stops where it stands."""
        if call.rt is None:
            return
        why = self.stopped(call.rt.id)
        if why is not None:
            raise ApprovalError(f"segment {call.rt.id} was halted by its data owner while op "
                                f"{call.op!r} ran ({why}): the op was refused, nothing of its "
                                "answer left")

    # ------------------------------------------------------------------------ ingress
    def batch(self, rt: Runtime, n: int, name: str) -> None:
        if n > rt.proposal.max_batch:
            raise ValidationError(f"{name}: batch of {n} exceeds the approved max_batch "
                                  f"{rt.proposal.max_batch}")

    def indices(self, rt: Runtime, req: Mapping[str, Any], ds: Dataset) -> torch.Tensor:
        """Record indices into ``ds``: int64, 1-D, non-empty, in range, at most max_batch."""
        idx = wire.check_tensor(req.get("indices"), "indices", shape=(None,), dtype=torch.int64)
        self.batch(rt, idx.shape[0], "indices")
        n = ds.features.shape[0]
        if bool((idx < 0).any()) or bool((idx >= n).any()):
            raise ValidationError(f"indices must be in 0..{n - 1}")
        return idx

    def activation_in(self, rt: Runtime, req: Mapping[str, Any], name: str = "x") -> torch.Tensor:
        """An incoming activation for a middle/loss segment: approved shape, float32, finite,
        bounded."""
        x = wire.check_tensor(req.get(name), name, shape=(None, *rt.proposal.input_shape),
                              dtype=torch.float32, finite=False)
        self.batch(rt, x.shape[0], name)
        self._finite_bounded(x, name)
        return x

    def grad_in(self, rt: Runtime, grad: Any, name: str = "grad") -> torch.Tensor:
        """The gradient for the pending forward: its exact shape, float32, finite, bounded."""
        if rt.pending_output is None:
            raise ProtocolError(f"gradient for {rt.id} without a pending forward")
        g = wire.check_tensor(grad, name, shape=tuple(rt.pending_output.shape),
                              dtype=torch.float32, finite=False)
        self._finite_bounded(g, name)
        return g

    def _finite_bounded(self, t: torch.Tensor, name: str) -> None:
        """NonFiniteError for NaN/Inf, ValidationError above the bound (fast path: one pass)."""
        if within(t, self.limits.max_abs_value):
            return
        wire.check_tensor(t, name, nonempty=False)  # raises NonFiniteError, with counts
        self.bounded(t, name)

    def bounded(self, t: torch.Tensor, name: str) -> None:
        """Refuse ``t`` if any value exceeds the data owner's magnitude bound."""
        if t.numel() and float(t.abs().max()) > self.limits.max_abs_value:
            raise ValidationError(f"{name}: magnitude {float(t.abs().max()):.3g} exceeds the "
                                  f"data owner's bound {self.limits.max_abs_value:g}")

    # ------------------------------------------------------------------------- egress
    def release(self, rules: Mapping[str, Rule], call: Call, response: dict[str, Any]
                ) -> dict[str, Any]:
        """Let ``response`` leave only if every field is declared and passes its rule, and
        the data owner has not asked to halt the segment (:meth:`still_open`)."""
        self.still_open(call)
        for name, value in response.items():
            rule = rules.get(name)
            if rule is None and "/" in name:
                rule = rules.get(name.split("/", 1)[0] + "/*")
            if rule is None:
                rule = rules.get("*")  # an op whose every field is of one kind (e.g. costs)
            if rule is None:
                raise _refuse(call, name, f"not a field this op may release; declared: "
                                          f"{sorted(rules)}")
            rule(name, value, call, self)
        self.still_open(call)  # a halt asked while the rules ran
        return response

    def admit(self, rt: Runtime, rows: int) -> None:
        """Before an op that releases ``rows`` records runs: refuse it over the rate cap."""
        cap = self.limits.max_records_per_minute
        if cap is None:
            return
        now = time.time()
        window, used = last_minute(self._released.get(rt.id, ()), now)
        self._released[rt.id] = window
        if used + rows > cap:
            raise EgressError(f"{rt.id} would release {used + rows} records in a minute; the "
                              f"data owner allows {cap}")
        window.append((now, rows))
        self._charged[rt.id] = self._charged.get(rt.id, 0) + 1

    def charged(self, segment: str) -> int:
        """How many calls :meth:`admit` has let through on ``segment`` (in this process): a
        changed count says its window changed and is to be saved."""
        return self._charged.get(segment, 0)

    def window(self, segment: str) -> list[list[float]] | None:
        """The records ``segment`` released in the last minute, ``[[time, records], ...]``, to
        save with it (None: none)."""
        now = time.time()
        kept = [[t, float(n)] for t, n in self._released.get(segment, ()) if in_window(t, now)]
        return kept or None

    def restore_window(self, segment: str, saved: Any) -> None:
        """Put back a window :meth:`window` returned (after a restart). A window in use is
        left as it is: a step undone does not give back the records it was admitted for."""
        if self._released.get(segment) or not isinstance(saved, list):
            return
        self._released[segment] = deque((float(t), int(n)) for t, n in saved)
