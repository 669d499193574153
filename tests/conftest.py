"""Shared fixtures: every behaviour test runs on each deployment kind in DEPLOY_KINDS."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

import pytest
import torch

from syft_split import deploy
from syft_split.deploy import Deployment, PartyDatasets

os.environ.setdefault("TQDM_DISABLE", "1")

DEPLOY_KINDS = ["inprocess"]


def _make(kind: str, parties: PartyDatasets, **kwargs: object) -> Deployment:
    if kind == "inprocess":
        return deploy.inprocess(parties, **kwargs)  # type: ignore[arg-type]
    raise ValueError(kind)


@pytest.fixture(params=DEPLOY_KINDS)
def make_deployment(request: pytest.FixtureRequest) -> Iterator[Callable[..., Deployment]]:
    """Factory: ``make_deployment(parties) -> Deployment`` on the parametrised kind; closed
    (datasites landed, data folders removed) at the end of the test."""
    made: list[Deployment] = []

    def factory(parties: PartyDatasets, **kwargs: object) -> Deployment:
        dep = _make(request.param, parties, **kwargs)
        made.append(dep)
        return dep

    level = logging.getLogger().level
    yield factory
    for dep in made:
        dep.close()
    logging.getLogger().setLevel(level)


@pytest.fixture
def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g)
