"""Training flags of a module and its submodules: kept exactly, never reset wholesale.

A model fine-tuned with a frozen layer (``model.train(); model.bn.eval()``) trains with that
layer in evaluation mode; ``module.train(flag)`` would flip it. These helpers set and restore
every submodule's own flag.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["eval_mode", "mixed_modes", "mode_dependent", "restore_modes", "save_modes"]


def save_modes(modules: Iterable[nn.Module]) -> list[tuple[nn.Module, bool]]:
    """Every (sub)module of ``modules`` with its training flag."""
    return [(sub, sub.training) for m in modules for sub in m.modules()]


def restore_modes(saved: list[tuple[nn.Module, bool]]) -> None:
    for sub, training in saved:
        sub.training = training


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """``modules`` in evaluation mode inside the block; each submodule's own flag after."""
    saved = save_modes(modules)
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        restore_modes(saved)


def mixed_modes(module: nn.Module) -> list[str]:
    """Names of the submodules whose training flag differs from ``module``'s (empty: one
    mode throughout)."""
    return [name for name, sub in module.named_modules() if sub.training != module.training]


def mode_dependent(module: Any) -> list[str]:
    """Type names of the layers of ``module`` whose output differs between train and eval
    mode (empty for anything else, e.g. a plain callable)."""
    if not isinstance(module, nn.Module):
        return []
    names = []
    for m in module.modules():
        if isinstance(m, (_BatchNorm, _InstanceNorm)) and m.track_running_stats:
            names.append(type(m).__name__)
        elif isinstance(m, _DropoutNd) and m.p > 0:
            names.append(type(m).__name__)
    return sorted(set(names))
