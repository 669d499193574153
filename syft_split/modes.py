"""Training flags of a module and its submodules: kept exactly, never reset wholesale.

A model fine-tuned with a frozen layer (``model.train(); model.bn.eval()``) trains with that
layer in evaluation mode; ``module.train(flag)`` would flip it. These helpers set and restore
every submodule's own flag.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode", "mixed_modes", "restore_modes", "save_modes"]


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
