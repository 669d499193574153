"""What a data owner checks before it builds or loads anything a model owner proposes: the
spec's serialized size and declared size (from its JSON alone), the weights sent with it, and
a dry run on the meta device (shapes only: nothing is computed). Used by segment proposals,
federated models and local-loss auxiliary heads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .. import wire
from ..errors import ConfigError, ValidationError
from ..spec import spec_size
from .records import HostLimits, spec_bytes

__all__ = ["check_size", "check_weights", "load_weights", "dry_run", "check_classes", "check_norm_state",
           "MAX_BATCHES_TRACKED", "MIN_MOMENTUM"]

#: a proposed ``num_batches_tracked`` above this is refused: with ``momentum=None`` (a
#: cumulative average) running statistics then barely move, so eval mode keeps whatever the
#: model owner sent.
MAX_BATCHES_TRACKED = 10**7
#: the least a tracked running statistic must follow each training batch: ``momentum`` at
#: least this, or with ``momentum=None`` (weight 1 / (num_batches_tracked + 1)) at most
#: ``1 / MIN_MOMENTUM - 1`` batches tracked (a tiny momentum froze the statistics too)
MIN_MOMENTUM = 1e-3


def check_size(spec: Any, limits: HostLimits, what: str, *,
               input_shape: tuple[int, ...] | None = None, max_batch: int = 0) -> None:
    """Refuse a spec that is too large, from its JSON alone (no module built, no memory);
    with ``input_shape``, also one whose widest values over ``max_batch`` records are, or
    whose training forward keeps too much until its gradient returns (every layer's output:
    ``HostLimits.max_activation_bytes`` bounds both), or whose training step computes too much
    (``HostLimits.max_step_flops``: forward and backward over ``max_batch`` records, counted
    as three forwards). First of all, a spec whose JSON is longer than
    ``HostLimits.max_spec_bytes`` is refused (the host keeps it, and saves it, with the
    proposal)."""
    length = spec_bytes(spec)
    if length > limits.max_spec_bytes:
        raise ConfigError(f"{what}'s spec takes {length} bytes of JSON; this data owner accepts "
                          f"at most {limits.max_spec_bytes} (HostLimits.max_spec_bytes)")
    size = spec_size(spec)
    for kind, got, cap in (("parameters", size.parameters + size.buffers, limits.max_parameters),
                           ("layer width", size.max_width, limits.max_width),
                           ("layers", size.layers, limits.max_layers)):
        if got > cap:
            raise ConfigError(f"{what} declares {got} {kind}; this data owner accepts at most "
                              f"{cap}")
    if input_shape is None:
        return
    shaped = spec_size(spec, input_shape, max_batch=max_batch)
    n = max_batch
    checks: list[tuple[float, float, str, str]] = [
            (4 * (shaped.activations or 0) * n, limits.max_activation_bytes, "{} bytes",
             f"{what}'s widest values (those alive at once) take {{}} per step of {n} records"),
            (4 * (shaped.training or 0) * n, limits.max_activation_bytes, "{} bytes",
             f"a training step of {what} keeps {{}} of values until its gradient returns (every "
             f"layer's output, for {n} records)"),
            (3 * (shaped.flops or 0) * n, limits.max_step_flops, "{:.3g} FLOPs",
             f"a training step of {what} computes about {{}} (forward and backward, {n} "
             "records)")]
    for amount, limit, unit, says in checks:
        if amount > limit:
            raise ConfigError(says.format(unit.format(amount)) + "; this data owner accepts "
                              f"{unit.format(limit)} (a smaller max_batch takes less)")


def load_weights(module: torch.nn.Module, state: dict[str, Any], bound: float,
                 what: str) -> None:
    """Load weights a model owner sent, once :func:`check_weights` let them in and their
    running statistics can follow the data (:func:`check_norm_state`); nothing changes if
    any of them is refused. Once loaded, ``state`` holds the module's own tensors (the same
    storage, not the copies sent): a pending proposal keeps one copy of its weights, the one
    ``HostLimits.max_pending_bytes`` counts. Whoever then trains the module must copy
    ``state`` first if it keeps it (approval does)."""
    check_weights(module, state, bound, what)
    check_norm_state(module, state, what)
    module.load_state_dict(state)
    state.update(module.state_dict())


def check_weights(module: torch.nn.Module, state: dict[str, Any], bound: float,
                  what: str) -> None:
    """Refuse weights for ``module`` unless they are exactly its keys, shapes and dtypes,
    finite and bounded by ``bound``. Nothing is loaded."""
    own = module.state_dict()
    if set(state) != set(own):
        raise ConfigError(f"weights {sorted(state)} do not match {what}'s {sorted(own)}")
    for k, v in state.items():
        wire.check_tensor(v, f"weight {k}", shape=tuple(own[k].shape), dtype=own[k].dtype,
                          nonempty=False)
        if v.is_floating_point() and v.numel() and float(v.abs().max()) > bound:
            raise ValidationError(f"weight {k}: magnitude {float(v.abs().max()):.3g} exceeds "
                                  f"the data owner's bound {bound:g}")


def check_norm_state(module: torch.nn.Module, state: dict[str, Any], what: str) -> None:
    """Refuse running statistics a model owner could freeze: a BatchNorm/InstanceNorm that
    tracks them with ``momentum`` below :data:`MIN_MOMENTUM` (they would barely follow the
    data, so eval mode computes whatever the proposal sent), with ``momentum=None`` and more
    than ``1 / MIN_MOMENTUM - 1`` batches tracked (the same, for a cumulative average), or
    a ``num_batches_tracked`` outside ``[0,`` :data:`MAX_BATCHES_TRACKED` ``]``."""
    for name, m in module.named_modules():
        if not isinstance(m, (_BatchNorm, _InstanceNorm)) or not m.track_running_stats:
            continue
        where = f"{what}'s {type(m).__name__} {name or '(top)'}"
        if m.momentum is not None and not m.momentum >= MIN_MOMENTUM:
            raise ConfigError(f"{where} has momentum {m.momentum}: its running statistics would "
                              f"barely follow the data (use momentum >= {MIN_MOMENTUM} or None)")
        tracked = state.get(f"{name}.num_batches_tracked" if name else "num_batches_tracked")
        if not isinstance(tracked, torch.Tensor) or tracked.numel() != 1:
            continue
        if not 0 <= int(tracked) <= MAX_BATCHES_TRACKED:
            raise ConfigError(f"{where}: num_batches_tracked {int(tracked)} is outside "
                              f"[0, {MAX_BATCHES_TRACKED}]")
        if m.momentum is None and int(tracked) > round(1 / MIN_MOMENTUM) - 1:
            raise ConfigError(f"{where}: momentum None (a cumulative average) with "
                              f"num_batches_tracked {int(tracked)}: its running statistics "
                              "would barely follow the data (at most "
                              f"{round(1 / MIN_MOMENTUM) - 1} with momentum None)")


def dry_run(module: torch.nn.Module, input_shape: tuple[int, ...], what: str, *,
            loss: str | None = None, labels: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
    """``module``'s output for two records of ``input_shape`` on the meta device (eval mode,
    no grad; its weights replaced by meta tensors: shapes only, nothing is computed or
    allocated, so it costs the host nothing whatever the input shape): a module that does not
    accept its declared input is refused here, and one ending in ``loss`` that does not fit
    the classes of ``labels`` (:func:`check_classes`). The result is a meta tensor: its shape
    is all a caller may read."""
    meta = {name: torch.empty_like(t, device="meta")
            for name, t in (*module.named_parameters(), *module.named_buffers())}
    try:
        with torch.no_grad():
            module.eval()
            out = torch.func.functional_call(module, meta, (torch.empty((2, *input_shape),
                                                                        device="meta"),))
    except Exception as exc:
        raise ConfigError(f"{what} does not accept input {input_shape}: {exc}") from exc
    finally:
        module.train()
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"{what}'s output is not a tensor: {type(out).__name__}")
    check_classes(tuple(out.shape[1:]), loss, labels, what)
    return out


def check_classes(output_shape: tuple[int, ...], loss: str | None,
                  labels: Sequence[torch.Tensor | None], what: str) -> None:
    """Refuse a cross-entropy ``what`` whose outputs (dimension 1: the classes) are fewer than
    the classes of its datasets' integer labels. Such a loss fails on every record whose label
    is past its width, and whether it fails is then a label oracle; the refusal names no
    label value."""
    if loss != "cross_entropy" or not output_shape:
        return
    classes = max((int(y.max()) + 1 for y in labels
                   if y is not None and y.numel() and not y.is_floating_point()), default=0)
    if output_shape[0] < classes:
        raise ConfigError(f"{what} ends in cross_entropy with {output_shape[0]} outputs: it "
                          "needs at least as many outputs as its datasets have classes")
