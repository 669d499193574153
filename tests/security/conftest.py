"""Deployments shared by the security tests of this package (launched once, landed after it).

``inproc_world`` / ``site_world``: three data owners -- a clinic (image-like features and
labels) and two vertical parties with record ids (the bank also holds labels) -- in process,
and on embedded PySyft datasites. ``world`` runs a test on each. ``intruder`` is another
registered (non-admin, never approved) user of the clinic's datasite.
"""

from __future__ import annotations

import os
import secrets
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from syft_split.deploy import Deployment, datasites, inprocess
from syft_split.host import HostLimits

os.environ.setdefault("TQDM_DISABLE", "1")

INTRUDER = "intruder@example.org"
#: tests/conftest.py's TEXT_REVIEW_S (this package, tests/security, cannot import it)
TEXT_REVIEW_S = 2.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore::PendingDeprecationWarning")


def clinic_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(48, 1, 8, 8, generator=g), torch.randint(0, 10, (48,), generator=g)


def vertical_data() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 10, generator=g)
    y = (x[:, 0] + x[:, 7] > 0).to(torch.int64)
    return x, y, [f"patient-{i:04d}" for i in range(40)]


def _parties() -> dict[str, dict[str, Any]]:
    x, y = clinic_data()
    xv, yv, ids = vertical_data()
    return {"clinic": {"train": (x, y), "test": (x[:16], y[:16])},
            "bank": {"train": (xv[:, :5], yv, ids)},
            "insurer": {"train": (xv[:, 5:], None, ids)}}


@pytest.fixture(scope="package")
def inproc_world() -> Iterator[Deployment]:
    dep = inprocess(_parties())
    yield dep
    dep.close()


@pytest.fixture(scope="package")
def site_world() -> Iterator[Deployment]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dep = datasites(_parties(), name_prefix="t-sec",
                        limits=HostLimits(review_budget_s=TEXT_REVIEW_S))
    dirs = [s.data_dir for s in dep.transport.datasites.values()]  # type: ignore[attr-defined]
    yield dep
    dep.close()
    assert not any(d.exists() for d in dirs), "datasite data left behind"


@pytest.fixture(params=["inprocess", "datasite"])
def world(request: pytest.FixtureRequest) -> Deployment:
    """The in-process deployment, then the datasite one."""
    name = "inproc_world" if request.param == "inprocess" else "site_world"
    dep: Deployment = request.getfixturevalue(name)
    return dep


@pytest.fixture(scope="package")
def intruder(site_world: Deployment) -> Any:
    """A transport of another registered user of the clinic's datasite."""
    from syft_split.transport.pysyft import PySyftTransport

    site = site_world.transport.datasites["clinic"]  # type: ignore[attr-defined]
    return PySyftTransport({"clinic": site.register(INTRUDER, secrets.token_hex(12))})
