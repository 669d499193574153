"""The model owner's router gives up a direct channel for good only when the data owner said no
(permission withdrawn, channel closed, segment halted); an open that failed otherwise is tried
again after a backoff, its steps going through the control plane meanwhile (in-process hosts,
real TLS on loopback, no PySyft)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from syft_split import wire
from syft_split.channel import DirectTransport
from syft_split.errors import AccessError, TransportError
from syft_split.host import DataOwnerHost
from syft_split.host.channel import close_channels
from syft_split.spec import OptimizerSpec, module_to_spec, spec_state
from syft_split.transport.inprocess import InProcessTransport

MO = "model-owner@example.org"


class Flaky(InProcessTransport):
    """The control plane: its next ``down`` open_channel calls fail (the datasite restarts)."""

    down = 0

    def request(self, party: str, data: bytes) -> bytes:
        if self.down and wire.decode(data).get("op") == "open_channel":
            self.down -= 1
            raise TransportError("datasite restarting: connection refused")
        return super().request(party, data)


@pytest.fixture
def setup() -> Iterator[tuple[DataOwnerHost, Flaky, DirectTransport, str]]:
    host = DataOwnerHost("h")
    host.add_dataset("d", torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    inner = Flaky([host], user=MO)
    seg = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten())
    pid = str(inner.call("h", "propose", role="input", spec=module_to_spec(seg),
                         optimizer=OptimizerSpec("sgd", lr=0.1).to_json(), datasets=["d"],
                         **{f"state/{k}": v for k, v in spec_state(seg).items()})["segment"])
    host.approve(pid, channel=True)
    direct = DirectTransport(inner)
    direct.router.retry_s = 0.2
    try:
        yield host, inner, direct, pid
    finally:
        direct.close()
        close_channels(host)


def test_a_failed_open_is_tried_again_after_a_backoff(
        setup: tuple[DataOwnerHost, Flaky, DirectTransport, str]) -> None:
    host, inner, direct, pid = setup
    router = direct.router
    step = {"segment": pid, "indices": torch.arange(4), "train": False}
    inner.down = 2
    direct.call("h", "forward", **step)  # the open fails: through the control plane
    direct.call("h", "forward", **step)  # within the backoff: not even tried
    assert router.direct_calls == 0 and inner.down == 1 and router.declined == {}
    time.sleep(0.25)
    direct.call("h", "forward", **step)  # tried again, fails again: the backoff doubles
    retry_at, failures, why = router.failed[("h", pid)]
    assert failures == 2 and "restarting" in why and retry_at - time.monotonic() > 0.3
    time.sleep(0.45)
    direct.call("h", "forward", **step)  # the datasite is back: steps go over a channel
    assert router.direct_calls == 1 and router.failed == {} and router.channels()
    # the data owner closing it is final: PySyft from then on, never asked again
    [cid] = router.channels().values()
    host.owner("close_channel", channel=cid, revoke=False)
    with pytest.raises(AccessError, match="closed by the data owner"):
        direct.call("h", "forward", **step)
    assert ("h", pid) in router.declined
    assert direct.call("h", "forward", **step)["activation"].shape == (4, 128)
    assert router.direct_calls == 1


def test_a_failed_lookup_of_the_model_owners_own_name_falls_back(
        setup: tuple[DataOwnerHost, Flaky, DirectTransport, str]) -> None:
    """The transport's lookup of its own principal (a PySyft call) ran after the data owner had
    opened the channel, and any error but TransportError escaped into the user's step; the
    open channel stayed unused. It runs first now, and any failure is a failed open."""
    host, _inner, direct, pid = setup
    router = direct.router
    real = router._user_on

    def broken(party: str) -> str:
        raise KeyError("no such user")

    router._user_on = broken
    step = {"segment": pid, "indices": torch.arange(4), "train": False}
    assert direct.call("h", "forward", **step)["activation"].shape == (4, 128)  # via PySyft
    assert router.direct_calls == 0 and "KeyError" in router.failed[("h", pid)][2]
    assert not router.channels()
    server = host.families["channel"].server  # type: ignore[attr-defined]
    assert server is None or not server.live()  # nothing opened there for nothing
    router._user_on = real
