"""An independent attacker for checking the suite's figures (bench/leakage.py, the attack
tests): unregularised L-BFGS input optimisation, not the suite's own white-box inversion."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["lbfgs_inversion"]


def lbfgs_inversion(seg: nn.Module, z: torch.Tensor, mock: torch.Tensor,
                    restarts: int = 6) -> torch.Tensor:
    """Records in [0, 1] whose ``seg`` output best matches ``z``: L-BFGS from the mock mean and
    from random mock records; per record, the restart that best explains ``z`` wins."""
    gen = torch.Generator().manual_seed(123)
    best, best_res = torch.empty(0), torch.full((z.shape[0],), math.inf)
    for r in range(restarts):
        start = mock.mean(0, keepdim=True).expand(z.shape[0], -1, -1, -1) if r == 0 else \
            mock[torch.randint(0, mock.shape[0], (z.shape[0],), generator=gen)]
        u = torch.logit(start.clamp(0.02, 0.98)).clone().requires_grad_(True)
        opt = torch.optim.LBFGS([u], max_iter=200, line_search_fn="strong_wolfe")

        def closure(u: torch.Tensor = u, opt: torch.optim.LBFGS = opt) -> torch.Tensor:
            opt.zero_grad()
            loss = (seg(torch.sigmoid(u)) - z).pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            x = torch.sigmoid(u)
            res = (seg(x) - z).flatten(1).pow(2).sum(1)
        best = x.clone() if r == 0 else torch.where((res < best_res)[:, None, None, None], x, best)
        best_res = torch.minimum(res, best_res)
    return best
