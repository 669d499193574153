"""Real PySyft datasites for the PySyft tests (no mocks).

``split_site`` is module-scoped and parametrised over ``SITE_KINDS``: one embedded datasite
and one uvicorn HTTP datasite on loopback, each launched once per test module, landed and
its data folder removed at the end of the module. Each test proposes its own segments, so
tests do not depend on each other's state.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

os.environ.setdefault("TQDM_DISABLE", "1")

from syft_split.datasite import DatasiteConsole
from syft_split.deploy import Deployment
from syft_split.host import HostLimits
from syft_split.spec import OptimizerSpec, module_to_spec, spec_state
from syft_split.transport.pysyft import (
    LaunchedDatasite,
    PySyftTransport,
    deployment,
)

from ..conftest import TEXT_REVIEW_S

SITE_KINDS = ["inprocess-datasite", "http-datasite"]
PARTY = "hospital"
MODEL_OWNER = "model-owner@example.org"
INTRUDER = "intruder@example.org"


def pytest_configure(config: pytest.Config) -> None:
    # PySyft's imports emit hundreds of deprecation warnings (matplotlib, pyparsing, pydantic)
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore::PendingDeprecationWarning")


@dataclass
class SplitSite:
    """One data owner on a real datasite, its console, the model owner and an intruder."""

    kind: str
    deployment: Deployment
    features: torch.Tensor  # the private data, to compare against local references
    labels: torch.Tensor
    intruder: PySyftTransport  # another registered non-admin user of the same datasite
    intruder_client: Any
    party: str = PARTY

    @property
    def transport(self) -> PySyftTransport:
        return self.deployment.transport  # type: ignore[return-value]

    @property
    def owner(self) -> DatasiteConsole:
        return self.deployment.owners[self.party]  # type: ignore[return-value]

    @property
    def datasite(self) -> LaunchedDatasite:
        return self.transport.datasites[self.party]

    def propose(self, segment: nn.Module, *, datasets: tuple[str, ...] = ("digits",),
                lr: float = 0.1, transport: PySyftTransport | None = None, **fields: Any) -> str:
        """Propose ``segment`` as an input segment on the party; return its proposal id."""
        state = {f"state/{k}": v for k, v in spec_state(segment).items()}
        response = (transport or self.transport).call(
            self.party, "propose", role="input", spec=module_to_spec(segment),
            optimizer=OptimizerSpec("sgd", lr=lr).to_json(), datasets=list(datasets),
            **state, **fields,
        )
        return str(response["segment"])

    def approve_pending(self) -> list[str]:
        """The data owner reviews and approves every pending proposal."""
        ids = [p.id for p in self.owner.proposals("pending")]
        for pid in ids:
            assert self.owner.review(pid)
            self.owner.approve(pid)
        return ids


#: the data owner's limits on the shared datasites (a narrow max_width: test_datasite checks
#: that limits given to install reach the host in the datasite's process)
LIMITS = HostLimits(max_batch=256, max_width=4096, review_budget_s=TEXT_REVIEW_S)


def make_split_site(kind: str) -> SplitSite:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(256, 1, 8, 8, generator=g)
    labels = torch.randint(0, 10, (256,), generator=g)
    other = torch.randn(64, 1, 8, 8, generator=g)
    dep = deployment(
        {PARTY: {"digits": (features, labels), "other": (other, None)}},
        http=(kind == "http-datasite"), user=MODEL_OWNER, name_prefix=f"t-{kind}",
        limits=LIMITS,
    )
    try:
        site = dep.transport.datasites[PARTY]  # type: ignore[attr-defined]
        intruder_client = site.register(INTRUDER, "intruder-password")
        intruder = PySyftTransport({PARTY: intruder_client})
    except BaseException:
        dep.close()
        raise
    return SplitSite(kind, dep, features, labels, intruder, intruder_client)


@pytest.fixture(scope="module", params=SITE_KINDS)
def split_site(request: pytest.FixtureRequest) -> Iterator[SplitSite]:
    """A :class:`SplitSite` on each datasite kind; landed + data folder removed afterwards."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        site = make_split_site(request.param)
    data_dir = site.datasite.data_dir
    try:
        yield site
    finally:
        site.deployment.close()
        assert not data_dir.exists(), f"{data_dir} was not removed"
