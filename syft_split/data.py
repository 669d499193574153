"""A data owner's own ``torch.utils.data.Dataset`` as the tensors a datasite holds.

A host holds a dataset as one features tensor (and one labels tensor), indexed by record.
:func:`materialize` reads a map-style dataset once, item by item, into those tensors: each
item is ``(features, label)`` (or ``features`` alone), the way ``TensorDataset`` and most
torchvision-style datasets return them. Transforms run once, here, at the data owner (random
augmentation would be frozen: apply it in the model instead).

:func:`syft_split.datasite.publish_dataset` and :mod:`syft_split.deploy` accept such a
dataset wherever they accept a features tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import ConfigError

__all__ = ["is_torch_dataset", "materialize"]

#: items read at most (a larger dataset is refused: hold it as tensors instead)
MAX_ITEMS = 5_000_000


def is_torch_dataset(obj: Any) -> bool:
    """True for a ``torch.utils.data.Dataset`` (map-style or iterable), not for tensors."""
    return isinstance(obj, torch.utils.data.Dataset)


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (np.ndarray, np.generic, int, float, bool, list, tuple)):
        try:
            return torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{what}: cannot be read as an array: {exc}") from exc
    raise ConfigError(f"{what}: expected a tensor, an array or a number, got "
                      f"{type(value).__name__} (convert it in the dataset's __getitem__, e.g. "
                      "with torchvision.transforms.ToTensor())")


def materialize(dataset: Any, *, name: str = "dataset"
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read a map-style dataset into ``(features, labels or None)``, stacked by record.

    Items must all have one form: ``(features, label)``, ``(features,)`` or ``features``
    alone; features of one shape and dtype (tensor, numpy array or nested lists); labels
    numbers or tensors of one shape. float64 features become float32, integer labels int64.
    Raises :class:`ConfigError` naming the item and what was expected otherwise.
    """
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise ConfigError(f"{name}: expected a map-style torch Dataset (with __len__ and "
                          f"__getitem__), got {type(dataset).__name__}; an IterableDataset "
                          "cannot be indexed by record")
    n = len(dataset)
    if not 0 < n <= MAX_ITEMS:
        raise ConfigError(f"{name}: expected 1..{MAX_ITEMS} items, got {n}")
    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    paired: bool | None = None
    for i in range(n):
        item = dataset[i]
        if isinstance(item, (tuple, list)) and len(item) == 1:
            item = item[0]  # TensorDataset(features) gives (features,)
        is_pair = isinstance(item, (tuple, list)) and len(item) == 2
        if isinstance(item, (tuple, list)) and not is_pair:
            raise ConfigError(f"{name}[{i}]: expected (features, label) or features, got a "
                              f"{type(item).__name__} of {len(item)} items")
        if isinstance(item, dict):
            raise ConfigError(f"{name}[{i}]: expected (features, label) or features, got a dict "
                              f"with keys {sorted(item)}; return a tuple from __getitem__")
        if paired is None:
            paired = is_pair
        elif paired != is_pair:
            raise ConfigError(f"{name}[{i}]: items mix (features, label) pairs and bare features")
        x = _as_tensor(item[0] if is_pair else item, f"{name}[{i}] features")
        if features and (x.shape != features[0].shape or x.dtype != features[0].dtype):
            raise ConfigError(f"{name}[{i}] features: expected {tuple(features[0].shape)} "
                              f"{features[0].dtype} like item 0, got {tuple(x.shape)} {x.dtype}")
        features.append(x)
        if is_pair:
            y = _as_tensor(item[1], f"{name}[{i}] label")
            if labels and y.shape != labels[0].shape:
                raise ConfigError(f"{name}[{i}] label: expected shape {tuple(labels[0].shape)} "
                                  f"like item 0, got {tuple(y.shape)}")
            labels.append(y)
    x_all = torch.stack(features)
    if x_all.dtype == torch.float64:
        x_all = x_all.to(torch.float32)  # what the segments compute in
    if x_all.dim() < 2:
        x_all = x_all.unsqueeze(1)  # one scalar feature per record
    y_all = torch.stack(labels) if labels else None
    if y_all is not None and not y_all.is_floating_point():
        y_all = y_all.to(torch.int64)
    return x_all, y_all
