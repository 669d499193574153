"""Shared fixtures: every behaviour test runs on each deployment kind in DEPLOY_KINDS."""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import pytest
import torch

from syft_split import DataOwnerHost, InProcessTransport, deploy, wire
from syft_split.deploy import Deployment, PartyDatasets
from syft_split.errors import TransportError
from syft_split.transport.base import CallPolicy, TransportWrapper

os.environ.setdefault("TQDM_DISABLE", "1")

torch.set_num_threads(1)  # 2 shared cores: tiny ops are far slower with 2 threads under load

#: every behaviour test runs on these: the in-process transport and real (embedded) PySyft
#: datasites; ``make_deployment_http`` adds uvicorn HTTP datasites on loopback.
DEPLOY_KINDS = ["inprocess", "datasite"]
#: the data owner's attack-suite budget (``HostLimits.review_budget_s``) for hosts whose reviews
#: are read for their text only (warnings, layers, options): the default 30 s, spent in full
#: at every review, was most of those tests' time; no figure they assert on depends on it
TEXT_REVIEW_S = 2.0
HTTP_KINDS = [*DEPLOY_KINDS, "http"]


class RewriteAnswers(TransportWrapper):
    """A malicious data owner: ``party``'s answers to ``op`` are decoded, passed to
    ``fn(request, answer) -> answer`` and re-encoded (its error answers pass unchanged)."""

    def __init__(self, inner, party: str, op: str, fn: Callable[[dict, dict], dict]) -> None:
        super().__init__(inner)
        self.party, self.op, self.fn = party, op, fn
        self.rewritten = 0

    def request(self, party: str, data: bytes) -> bytes:
        raw = self.inner.request(party, data)
        req = wire.decode(data)
        if party != self.party or req.get("op") != self.op:
            return raw
        answer = wire.decode(raw)
        if "error" in answer:
            return raw
        self.rewritten += 1
        return wire.encode(self.fn(req, answer))


#: quick retries for in-process crash tests
FAST = CallPolicy(timeout=30.0, retries=3, backoff=0.0)


class Crash(BaseException):
    """The model owner's process dies here (not an error anything may catch)."""


class ChaosTransport(InProcessTransport):
    """In-process data owners that crash and restart (``start(party)`` builds one again from
    its state directory) at chosen requests: the n-th request (key ``n``) or the k-th request
    of an op (key ``(op, k)``). Modes: ``"before"`` (the request never arrives), ``"after"``
    (applied, its response lost), ``"model_owner"`` (applied, then the model owner's process
    dies) or ``"model_owner_before"`` (the model owner's process dies before it sends the
    request). A failed request is sent again only if that is safe (:data:`FAST` retries)."""

    def __init__(self, start: Callable[[str], DataOwnerHost], parties: Iterable[str],
                 crashes: dict[int | tuple[str, int], str]) -> None:
        self.start = start
        super().__init__([start(p) for p in parties], policy=FAST)
        self.crashes = crashes
        self.n = 0
        self.per_op: Counter[str] = Counter()
        self._count = threading.Lock()
        self.restarts = 0

    def host(self, party: str) -> DataOwnerHost:
        return self._hosts[party]

    def restart(self, party: str) -> None:
        self.restarts += 1
        self.add_host(self.start(party), replace=True)

    def request(self, party: str, data: bytes) -> bytes:
        op = str(wire.decode(data).get("op"))
        with self._count:  # data owners may be called from several threads at once
            self.n += 1
            self.per_op[op] += 1
            mode = (self.crashes.pop(self.n, None)
                    or self.crashes.pop((op, self.per_op[op]), None))
        if mode == "model_owner_before":
            raise Crash
        if mode == "before":
            self.restart(party)
            raise TransportError(f"{party}: connection refused")
        raw = super().request(party, data)
        if mode == "after":
            self.restart(party)
            raise TransportError(f"{party}: connection reset, response lost")
        if mode == "model_owner":
            raise Crash
        return raw


def deployment_of(kind: str, parties: PartyDatasets, **kwargs: object) -> Deployment:
    """A deployment of ``kind`` (one of HTTP_KINDS)."""
    if kind == "inprocess":
        return deploy.inprocess(parties, **kwargs)  # type: ignore[arg-type]
    return deploy.datasites(parties, http=kind == "http", **kwargs)


def close_checked(dep: Deployment) -> None:
    """Close ``dep``; its datasites' data folders must be gone afterwards."""
    dirs = [s.data_dir for s in getattr(dep.transport, "datasites", {}).values()]
    dep.close()
    assert not any(os.path.exists(d) for d in dirs if d), "datasite data left behind"


@contextmanager
def deployed(kind: str, parties: PartyDatasets, **kwargs: object) -> Iterator[Deployment]:
    """:func:`deployment_of`, closed (checked) on exit: for module-scoped fixtures."""
    dep = deployment_of(kind, parties, **kwargs)
    try:
        yield dep
    finally:
        close_checked(dep)


def _factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Deployment]]:
    made: list[Deployment] = []

    def factory(parties: PartyDatasets, **kwargs: object) -> Deployment:
        dep = deployment_of(request.param, parties, **kwargs)
        made.append(dep)
        return dep

    level = logging.getLogger().level
    yield factory
    for dep in made:
        close_checked(dep)
    logging.getLogger().setLevel(level)


@pytest.fixture(params=DEPLOY_KINDS)
def make_deployment(request: pytest.FixtureRequest) -> Iterator[Callable[..., Deployment]]:
    """Factory: ``make_deployment(parties) -> Deployment`` on the parametrised kind; closed
    (datasites landed, data folders removed) at the end of the test."""
    yield from _factory(request)


@pytest.fixture(params=HTTP_KINDS)
def make_deployment_http(request: pytest.FixtureRequest) -> Iterator[Callable[..., Deployment]]:
    """As ``make_deployment``, plus real HTTP datasites (for the key behaviour tests)."""
    yield from _factory(request)


def toy_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """96 random 1x8x8 images and labels, always the same (seed 0)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g)


@pytest.fixture
def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    return toy_tensors()


#: the data owners of :func:`three_peers`
PEER_NAMES = ["a", "b", "c"]


@pytest.fixture
def three_peers():
    """Three data owners (in process) with one shared (peer) input segment each, trusting each
    other; the segments trained differently so that their weights differ. Returns the
    deployment, the session and each owner's remote segment."""
    import copy

    from torch import nn

    from syft_split import SplitPlan, SplitSession

    g = torch.Generator().manual_seed(0)
    parties = {n: {"train": (torch.randn(20, 1, 4, 4, generator=g),
                             torch.randint(0, 3, (20,), generator=g))} for n in PEER_NAMES}
    dep = deploy.inprocess(parties)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3))
    plan = SplitPlan.vanilla([copy.deepcopy(model[:2]), copy.deepcopy(model[2:])], PEER_NAMES,
                             share_weights="peer", datasets=["train"])
    session = SplitSession(plan, dep.transport)
    dep.approve_all(session.propose())
    dep.trust_each_other()
    for k, n in enumerate(PEER_NAMES):
        for _ in range(k + 1):
            session.zero_grad()  # one backward per step (no accumulation across segments)
            loss, _ = session.loss(n, torch.arange(8), parties[n]["train"][1][:8],
                                   dataset="train")
            loss.backward()
    session.flush()
    return dep, session, {n: session.remote[(n, 0)] for n in PEER_NAMES}
