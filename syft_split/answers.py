"""What the model owner checks in a data owner's answers before it uses them.

An honest data owner's host releases only what its egress guard (:mod:`syft_split.host.guard`)
lets through; a malicious one answers whatever it likes. So every value the model owner reads
from a data owner's answer (activations, released labels, input gradients, loss figures,
counts, segment ids, measured figures; the federated baselines' weights, gradients and
figures) passes one of these checks first, mirroring the guard:
required fields and their types; tensors of the expected shape (batch first) and dtype, finite
and within ``max_abs_value`` in magnitude (by default the host's own default,
:data:`MAX_ABS_VALUE`); class labels in range; ``count`` equal to the batch and
``0 <= correct <= count``. A refused answer raises :class:`~syft_split.errors.ValidationError`
(or a subclass) whose ``party`` is the data owner and whose message names the op and the field,
before the value reaches the model owner's weights, optimizer or checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .errors import DTypeError, NonFiniteError, ShapeError, ValidationError, shown
from .host.admission import MAX_BATCHES_TRACKED
from .wire import within

__all__ = ["Answer", "MAX_ABS_VALUE", "MAX_COUNT", "MAX_ID_CHARS"]

#: the bound on |value| of tensors in data owners' answers: ``HostLimits().max_abs_value``
#: (an honest host with the default limits releases nothing larger)
MAX_ABS_VALUE = 1e6
#: the longest segment id accepted (the host's own limit for the ids and names it keeps)
MAX_ID_CHARS = 256
_MAX_FIGURES = 64  # measured figures in one leakage / watch answer
_MAX_TEXT = 1000  # a text figure (a watch's halt reason)
#: an integer tensor in an answer (a counter: ``num_batches_tracked``) lies in
#: ``[0, MAX_COUNT]`` by default: every data owner's host refuses to load one outside
MAX_COUNT = MAX_BATCHES_TRACKED
_INTEGER = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_FLOAT = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _finite(value: Any) -> bool:
    """A finite int or float (not a bool; an int within 64 bits)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(1 << 63) <= value < 1 << 63
    return isinstance(value, float) and math.isfinite(value)


class Answer:
    """``party``'s answer to ``op``: each accessor checks one field and returns it."""

    def __init__(self, party: str, op: str, response: Mapping[str, Any], *,
                 bound: float = MAX_ABS_VALUE) -> None:
        self.party = party
        self.op = op
        self.response = response
        self.bound = bound

    def refuse(self, name: str, why: str, cls: type[ValidationError] = ValidationError
               ) -> ValidationError:
        """The error for a bad field ``name`` (``party`` set: who sent it)."""
        exc = cls(f"{self.party}'s answer to {self.op!r} has a bad field {name!r}: {why}")
        exc.party = self.party
        return exc

    def field(self, name: str) -> Any:
        """A required field."""
        if name not in self.response:
            raise self.refuse(name, "missing")
        return self.response[name]

    def tensor(self, name: str, shape: tuple[int, ...],
               dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> torch.Tensor:
        """A required tensor of exactly ``shape`` and one of ``dtypes``, finite and within the
        bound."""
        return self.check_tensor(name, self.field(name), shape, dtypes)

    def check_tensor(self, name: str, value: Any, shape: tuple[int, ...],
                     dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> torch.Tensor:
        """``value`` (field ``name``) as :meth:`tensor` checks it."""
        if not isinstance(value, torch.Tensor):
            raise self.refuse(name, f"expected a tensor, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            raise self.refuse(name, f"expected shape {shape}, got {tuple(value.shape)}",
                              ShapeError)
        if value.dtype not in dtypes:
            want = " or ".join(str(d) for d in dtypes)
            raise self.refuse(name, f"expected {want}, got {value.dtype}", DTypeError)
        if value.is_floating_point() and not within(value, self.bound):
            if not bool(torch.isfinite(value).all()):
                raise self.refuse(name, "non-finite values (NaN/Inf)", NonFiniteError)
            raise self.refuse(name, f"magnitude {float(value.abs().max()):.3g} above the bound "
                                    f"{self.bound:g}")
        return value

    def tensors(self, prefix: str, like: Mapping[str, torch.Tensor], *,
                counts: tuple[int, int] = (0, MAX_COUNT)) -> dict[str, torch.Tensor]:
        """The fields named ``prefix`` + a key of ``like`` (a model's weights, gradients or
        buffers), keyed without ``prefix``: exactly ``like``'s keys, each tensor of its
        shape and dtype (:meth:`check_tensor`: finite and within the bound); an integer one
        (a counter such as ``num_batches_tracked``) with every value in ``counts``."""
        got = {k[len(prefix):]: v for k, v in self.response.items()
               if isinstance(k, str) and k.startswith(prefix)}
        if got.keys() != like.keys():
            missing, extra = sorted(like.keys() - got.keys()), sorted(got.keys() - like.keys())
            raise self.refuse(f"{prefix}*", f"not the model's keys: missing {shown(missing)}, "
                                            f"unexpected {shown(extra)}")
        low, high = counts
        for k, v in got.items():
            name = prefix + k
            self.check_tensor(name, v, tuple(like[k].shape), (like[k].dtype,))
            if not v.is_floating_point() and v.numel() and not (
                    low <= int(v.min()) and int(v.max()) <= high):
                raise self.refuse(name, f"holds {int(v.min())}..{int(v.max())}; an integer "
                                        "tensor (a counter such as num_batches_tracked) lies "
                                        f"in [{low}, {high}]")
        return got

    def count(self, name: str, low: int, high: int, why: str = "") -> int:
        """A required integer in ``[low, high]`` (``why``: where the bounds come from, for
        the message)."""
        value = self.field(name)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            want = f"{low}" if low == high else f"an integer in [{low}, {high}]"
            raise self.refuse(name, f"expected {want}{why}, got {shown(value, 60)}")
        return value

    def scalar(self, name: str, *, low: float | None = None) -> float:
        """A required finite number (``low``: and at least that)."""
        value = self.field(name)
        if not _finite(value) or (low is not None and value < low):
            want = "a finite number" + ("" if low is None else f" >= {low:g}")
            raise self.refuse(name, f"expected {want}, got {shown(value, 60)}")
        return float(value)

    def segment_id(self, name: str = "segment") -> str:
        """A segment id: a string of 1 to :data:`MAX_ID_CHARS` printable characters."""
        value = self.field(name)
        if (not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS
                or not value.isprintable()):
            got = f"{type(value).__name__} of {len(value)}" if hasattr(value, "__len__") else (
                type(value).__name__)
            raise self.refuse(name, f"expected a string of 1 to {MAX_ID_CHARS} printable "
                                    f"characters, got {got}")
        return value

    def loss(self, batch: int, input_shape: tuple[int, ...], *, train: bool) -> dict[str, Any]:
        """A loss step's answer over ``batch`` records: ``loss_sum`` (finite), ``count``
        (the batch), ``correct`` (0 to count) and, in training, ``grad_input`` (the gradient
        w.r.t. the segment's input, ``(batch, *input_shape)`` float32)."""
        out: dict[str, Any] = {"loss_sum": self.scalar("loss_sum"),
                               "count": self.count("count", batch, batch)}
        out["correct"] = self.count("correct", 0, batch)
        if train:
            out["grad_input"] = self.tensor("grad_input", (batch, *input_shape))
        return out

    def labels(self, name: str, value: Any, out: torch.Tensor, loss: str) -> torch.Tensor:
        """Labels released with a batch, for ``loss`` on the model's output ``out``, as torch's
        losses take them: for cross-entropy class indices (int64 or uint8, ``out``'s shape
        without dimension 1, each in ``[0, out.shape[1])``) or class probabilities (a float
        dtype, ``out``'s shape); otherwise targets of ``out``'s shape, any float or integer
        dtype (float in [0, 1] for ``bce_with_logits``). Every value finite and within the
        bound."""
        shape = tuple(out.shape)
        if loss == "cross_entropy" and not (isinstance(value, torch.Tensor)
                                            and value.is_floating_point()):
            shape = (out.shape[0], *out.shape[2:]) if out.dim() > 1 else shape
            y = self.check_tensor(name, value, shape, (torch.int64, torch.uint8))
            classes = out.shape[1] if out.dim() > 1 else 0
            if y.numel() and not (0 <= int(y.min()) and int(y.max()) < classes):
                raise self.refuse(name, f"class labels outside [0, {classes})")
            return y
        # bce_with_logits takes float targets only (torch refuses integer ones)
        kinds = _FLOAT if loss == "bce_with_logits" else _FLOAT + _INTEGER
        y = self.check_tensor(name, value, shape, kinds)
        if not y.is_floating_point() and y.numel() and float(y.abs().max()) > self.bound:
            raise self.refuse(name, f"targets above the bound {self.bound:g}")
        if loss == "bce_with_logits" and y.numel() and not (0 <= float(y.min())
                                                             and float(y.max()) <= 1):
            raise self.refuse(name, "binary targets outside [0, 1]")
        return y

    def figures(self, *, text: bool = False) -> dict[str, Any]:
        """Measured figures (leakage, watch): at most 64 fields, each a finite number (or,
        with ``text``, a string of at most 1000 characters)."""
        if len(self.response) > _MAX_FIGURES:
            raise self.refuse("*", f"{len(self.response)} figures, at most {_MAX_FIGURES}")
        out: dict[str, Any] = {}
        for k, v in self.response.items():
            if not isinstance(k, str) or len(k) > 64:
                raise self.refuse(str(k)[:64], "a figure's name must be at most 64 characters")
            if isinstance(v, bool) or _finite(v):
                out[k] = v
            elif text and isinstance(v, str) and len(v) <= _MAX_TEXT:
                out[k] = v
            else:
                raise self.refuse(str(k)[:64], f"expected a finite number, got {v!r:.60}")
        return out
