"""Leakage measured at the data owner, on its own side: only scalars leave.

Model-owner op ``leakage``: the data owner measures what its input segment's activations leak
about held-out records of a dataset (distance correlation, and a model-inversion attack trained
on the dataset's mock data) and returns the figures.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ValidationError
from .dispatch import OpFamily, op, register_family
from .guard import SCALAR, Call

__all__ = ["LeakageOps"]

_FIGURES = {"dcor": SCALAR, "records": SCALAR, "inversion_mse": SCALAR,
            "inversion_baseline_mse": SCALAR, "inversion_ratio": SCALAR}


@register_family
class LeakageOps(OpFamily):
    """The ``leakage`` op (see the module docstring)."""

    name = "leakage"

    @op("leakage", roles=("input",), egress=_FIGURES)
    def leakage(self, call: Call) -> dict[str, Any]:
        from ..leakage import dcor_leakage, inversion_attack

        rt = call.rt
        assert rt is not None
        ds = self.host.dataset(rt, call.req)
        n = call.req.get("records", 256)
        if not isinstance(n, int) or isinstance(n, bool) or not 4 <= n <= rt.proposal.max_batch:
            raise ValidationError(f"records must be in 4..{rt.proposal.max_batch}, got {n!r}")
        epochs = call.req.get("epochs", 40)
        if not isinstance(epochs, int) or isinstance(epochs, bool) or not 1 <= epochs <= 200:
            raise ValidationError(f"epochs must be in 1..200, got {epochs!r}")
        raw = ds.features[:n].to(torch.float32)
        rt.module.eval()
        try:
            with torch.no_grad():
                act = rt.module(raw)
            out: dict[str, Any] = {"dcor": dcor_leakage(raw, act), "records": int(raw.shape[0])}
            if ds.mock is not None:
                attack = inversion_attack(rt.module, ds.mock.to(torch.float32), raw,
                                          epochs=epochs, seed=0)
                out.update({f"inversion_{k}": float(attack[k])
                            for k in ("mse", "baseline_mse", "ratio")})
        finally:
            rt.module.train()
        return out
