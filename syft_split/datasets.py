"""Small datasets that ship with scikit-learn (no downloads), split across data owners."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["PartyData", "digits_parties"]


@dataclass
class PartyData:
    """One data owner's records: train/test features and labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mock: torch.Tensor | None = None


def digits_parties(n_parties: int = 1, *, test_fraction: float = 0.25, seed: int = 0,
                   limit: int | None = None, mock_records: int = 0) -> list[PartyData]:
    """scikit-learn's 8x8 digits as (N, 1, 8, 8) float32 in [0, 1], shuffled and dealt to
    ``n_parties`` disjoint data owners (each with its own train/test split).

    ``mock_records`` are first set aside as a public look-alike pool every party gets as its
    ``mock`` (the role of a PySyft mock asset; used for leakage measurement)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    mock = torch.from_numpy(x[order[:mock_records]]) if mock_records else None
    order = order[mock_records:]
    if limit is not None:
        order = order[:limit]
    out = []
    for part in np.array_split(order, n_parties):
        n_test = int(round(len(part) * test_fraction))
        test, train = part[:n_test], part[n_test:]
        out.append(PartyData(torch.from_numpy(x[train]), torch.from_numpy(y[train]),
                             torch.from_numpy(x[test]), torch.from_numpy(y[test]), mock))
    return out
