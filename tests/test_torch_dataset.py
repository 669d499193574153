"""A data owner backs a dataset with its own torch.utils.data.Dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from syft_split import OptimizerSpec, SplitPlan, SplitSession, Trainer, split_model
from syft_split.data import materialize
from syft_split.deploy import inprocess
from syft_split.errors import ConfigError
from syft_split.models import digits_cnn


class Digits(Dataset):
    """torchvision style: numpy images and python int labels, transformed on read."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i] / 16.0, int(self.y[i])


def _digits(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images[:n, None].astype(np.float64), d.target[:n]


def test_materialize_equals_the_tensors() -> None:
    x, y = torch.rand(12, 3), torch.randint(0, 2, (12,))
    got_x, got_y = materialize(TensorDataset(x, y))
    assert torch.equal(got_x, x) and torch.equal(got_y, y)
    images, labels = _digits(20)
    fx, fy = materialize(Digits(images, labels))
    assert fx.dtype == torch.float32 and fx.shape == (20, 1, 8, 8)
    assert torch.allclose(fx, torch.from_numpy(images / 16.0).float())
    assert fy.dtype == torch.int64 and fy.tolist() == labels.tolist()
    only_x, none = materialize(TensorDataset(x))
    assert none is None and torch.equal(only_x, x)  # TensorDataset(x) gives (x,)


class _Items(Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class _Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(2), 0


@pytest.mark.parametrize("items, match", [
    ([{"x": torch.zeros(2)}], r"\[0\]: expected \(features, label\) or features, got a dict"),
    ([(torch.zeros(2), 0), (torch.zeros(3), 1)], r"\[1\] features: expected \(2,\) .* got \(3,\)"),
    ([(torch.zeros(2), 0), torch.zeros(2)], r"\[1\]: items mix"),
    ([("a text", 0)], r"\[0\] features: cannot be read as an array|expected a tensor"),
    ([(torch.zeros(2), 0, 1)], r"got a tuple of 3 items"),
    ([(torch.zeros(2), object())], r"\[0\] label: expected a tensor, an array or a number"),
    ([], r"expected 1\.\.\d+ items, got 0"),
])
def test_unsupported_items_are_named(items, match) -> None:
    with pytest.raises(ConfigError, match=match):
        materialize(_Items(items), name="mine")


def test_iterable_dataset_is_refused() -> None:
    with pytest.raises(ConfigError, match="map-style"):
        materialize(_Stream())


def _fit(train, test, y: torch.Tensor) -> float:
    torch.manual_seed(0)
    dep = inprocess({"h": {"train": train, "test": test}})
    plan = SplitPlan.vanilla(split_model(digits_cnn(), "pool1"), "h")
    session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("adam", lr=1e-2))
    dep.approve_all(session.propose())
    report = Trainer(session, batch_size=32, progress=False, measure_leakage=False, watch=False,
                     labels={"h": {"train": y[:600], "test": y[600:]}}).fit(5, verbose=False)
    return float(report.final_test_accuracy or 0.0)


def test_inprocess_deployment_trains_on_a_torch_dataset() -> None:
    """The same run on the owner's torch Dataset and on the tensors it holds: same accuracy."""
    images, labels = _digits(800)
    y = torch.from_numpy(labels).long()
    acc = _fit(Digits(images[:600], labels[:600]), Digits(images[600:], labels[600:]), y)
    x = torch.from_numpy(images / 16.0).float()
    assert acc == _fit((x[:600], y[:600]), (x[600:], y[600:]), y)
    assert acc > 0.8


@pytest.mark.pysyft
def test_publish_dataset_reads_a_torch_dataset() -> None:
    from syft_split.datasite import publish_dataset
    from syft_split.transport.pysyft import launch_datasite

    images, labels = _digits(30)
    with launch_datasite("t-torchds-publish") as site:
        assets = publish_dataset(site.root, "train", Digits(images, labels))
        assert set(assets) == {"features", "labels"}
        data = site.root.datasets["train"].assets["features"].data
        assert np.allclose(np.asarray(data), images / 16.0)
        assert np.asarray(site.root.datasets["train"].assets["labels"].data).tolist() == \
            labels.tolist()
