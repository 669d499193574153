"""PySyft transport: the model owner reaches data-owner hosts running inside PySyft datasites.

Each data-owner party is a datasite on which the data owner ran
:func:`syft_split.datasite.install`. :class:`PySyftTransport` holds one logged-in (non-admin)
client per party and calls the endpoint inline with ``client.api.services.api.call`` (the
documented ``client.api.services.<path>(...)`` goes through PySyft's job queue: seconds per
call, or a 60 s hang without consumers). Requests and responses are wire bytes only.

:func:`launch_datasite` starts a datasite for tests and demos — embedded in this process, or a
real uvicorn HTTP server on loopback — and :meth:`LaunchedDatasite.close` lands it and removes
its data folder. With ``data_dir=`` a datasite keeps its identity and database across
launches (:meth:`LaunchedDatasite.restart`): see :func:`launch_datasite`.

Timeouts: PySyft's HTTP client posts without a timeout (``HTTPConnection.make_call`` calls
``requests.post`` bare). :class:`PySyftTransport` gives each HTTP client's connection a
``make_call`` that posts with the current call's timeout, and a default timeout on its
``requests`` session (blob transfers); embedded datasites (``PythonConnection``) run in this
process and are bounded by a watchdog thread instead.

This module and :mod:`.pysyft_launch` (launching and restarting datasites, re-exported here)
are the only modules of syft-split that import ``syft`` at import time.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import syft as sy

from .. import wire
from ..datasite import ENDPOINT_PATH, DatasiteConsole, call_endpoint, install, publish_dataset
from ..datasite_serve import PRINCIPAL
from ..errors import CallTimeoutError, ConfigError, TransportError
from ..logs import quiet
from .base import CallPolicy, Transport, run_with_timeout, timeout_error
from .pysyft_launch import DEFAULT_ADMIN, LaunchedDatasite, free_port, launch_datasite

__all__ = [
    "PySyftTransport",
    "deployment",
    "LaunchedDatasite",
    "launch_datasite",
    "free_port",
    "connect",
    "restart",
    "DEFAULT_ADMIN",
]

class PySyftTransport(Transport):
    """Deliver requests to the syft-split endpoint of each party's datasite.

    ``clients`` maps a party name to a logged-in syft client of the model owner on that
    datasite. The datasite answers as the user the client is logged in as; the data owner
    approved segments for that user only.

    With ``cleanup=True`` (default) each call tells the endpoint to delete the action object
    PySyft stored for the previous call to the same party, so a datasite holds at most one
    result per transport and party (the last one stays).

    ``direct=True`` (default): segments whose data owner allowed a direct channel run over one
    (see :mod:`syft_split.channel`; ``self.router`` holds the channels). ``direct=False``:
    PySyft carries everything. A channel's socket waits at most the call policy's timeout. A
    channel connects only to the datasite's host (its URL's host; loopback for a datasite
    embedded in this process), by name or an address that name resolves to, any port;
    ``channel_hosts={party: host}`` allows that party's channels one other host (a data owner
    whose channel listens on another interface, its ``advertise`` setting). A ticket naming any
    other address is refused without connecting; the steps go through PySyft.

    Calls to different parties may run concurrently from several threads (each party has
    its own client); calls to one party are serialised here, and so are all calls to
    datasites embedded in this process (PySyft's in-process servers are not safe to enter
    from several threads at once: concurrent calls failed inside PySyft, measured).
    """

    def __init__(
        self,
        clients: Mapping[str, Any],
        *,
        path: str = ENDPOINT_PATH,
        cleanup: bool = True,
        max_response_bytes: int = wire.DEFAULT_MAX_BYTES,
        datasites: Mapping[str, LaunchedDatasite] | None = None,
        policy: CallPolicy | None = None,
        direct: bool = True,
        channel_timeout: float | None = None,
        channel_hosts: Mapping[str, str] | None = None,
    ) -> None:
        from ..channel.client import ChannelRouter

        super().__init__(max_response_bytes=max_response_bytes, policy=policy)
        if not clients:
            raise ConfigError("PySyftTransport needs at least one client (party name -> client)")
        self._clients: dict[str, Any] = {}
        self._bounded: dict[str, bool] = {}
        self._call = threading.local()  # this thread's call timeout (calls run concurrently)
        self.path = path
        self.cleanup = cleanup
        self._done: dict[str, str] = {}
        self._users: dict[str, str] = {}
        self._principals: dict[str, str] = {}
        self._embedded_lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        for party, client in clients.items():
            self.set_client(party, client)
        #: the datasites behind the parties, when this process launched them (not closed here)
        self.datasites: dict[str, LaunchedDatasite] = dict(datasites or {})
        self.direct = direct
        wait = channel_timeout if channel_timeout is not None else (self.policy.timeout or 600.0)
        self.router = ChannelRouter(self._pysyft_request, self.principal_on, timeout=wait,
                                    max_response_bytes=max_response_bytes,
                                    home=self.datasite_host, channel_hosts=channel_hosts)

    def set_client(self, party: str, client: Any) -> None:
        """Reach ``party`` through ``client`` (e.g. a new login after an embedded restart)."""
        self._clients[party] = client
        self._users[party] = str(getattr(client, "logged_in_user", "") or "")
        self._principals.pop(party, None)
        self._locks[party] = (self._embedded_lock if _embedded(client)
                              else self._locks.get(party) or threading.Lock())
        self._bounded[party] = _bound_http(client, self._call_timeout)
        self._done.pop(party, None)

    @property
    def user(self) -> str:
        """The model owner's e-mail (of the first party's client; see :meth:`user_on`)."""
        return next(iter(self._users.values()))

    def user_on(self, party: str) -> str:
        """The e-mail this transport is logged in as on ``party``'s datasite."""
        self._client(party)
        return self._users[party]

    def principal_on(self, party: str) -> str:
        """Who ``party``'s datasite knows this transport's user as: ``syft-user:<its PySyft
        user id>`` (what a direct channel is bound to; one PySyft call, then cached)."""
        if party not in self._principals:
            account = self._client(party).account
            if account is None:
                raise TransportError(f"{party}: the client is not logged in as a user")
            self._principals[party] = f"{PRINCIPAL}{account.id}"
        return self._principals[party]

    def parties(self) -> list[str]:
        return list(self._clients)

    def datasite_host(self, party: str) -> str:
        """The host of ``party``'s datasite URL (HTTP); ``localhost`` for one embedded here."""
        url = getattr(getattr(self._client(party), "connection", None), "url", None)
        host = getattr(url, "host_or_ip", None)
        return str(host) if host and not _embedded(self._client(party)) else "localhost"

    def _client(self, party: str) -> Any:
        client = self._clients.get(party)
        if client is None:
            raise TransportError(f"unknown party {party!r}; connected: {sorted(self._clients)}")
        return client

    def request_within(self, party: str, data: bytes, timeout: float | None,
                       op: str = "?") -> bytes:
        """HTTP datasites: the connection posts with ``timeout`` itself; embedded ones run on
        a watchdog thread (see the module docstring)."""
        if not self._bounded.get(party):
            return super().request_within(party, data, timeout, op)
        self._call.timeout = timeout
        try:
            return self.request(party, data)
        except CallTimeoutError as exc:
            raise timeout_error(party, op, timeout or 0.0) from exc
        finally:
            self._call.timeout = None

    def _call_timeout(self) -> float | None:
        """The timeout of the call this thread is making (read when its HTTP post is sent)."""
        return getattr(self._call, "timeout", None)

    def request(self, party: str, data: bytes) -> bytes:
        if self.direct:
            self._client(party)
            raw = self.router.route(party, data)
            if raw is not None:
                return raw
        return self._pysyft_request(party, data)

    def _pysyft_request(self, party: str, data: bytes) -> bytes:
        client = self._client(party)
        kwargs: dict[str, Any] = {"request": bytes(data)}
        with self._locks[party]:  # one call per party at a time (cleanup bookkeeping per party)
            done = self._done.pop(party, "")
            if done:
                kwargs["done"] = done
            raw, result_id = call_endpoint(client, self.path, **kwargs)
            if self.cleanup:
                self._done[party] = result_id
        return raw


    def close(self) -> None:
        """Close the direct channels (the datasites free them at once)."""
        self.router.close()


def _embedded(client: Any) -> bool:
    """Whether ``client`` reaches a datasite running inside this process."""
    return type(getattr(client, "connection", None)).__name__ == "PythonConnection"


def _bound_http(client: Any, timeout: Callable[[], float | None]) -> bool:
    """Give ``client``'s HTTP connection a ``make_call`` that posts with ``timeout()`` seconds
    and a session that defaults to it; False for connections that are not HTTP (embedded)."""
    import requests  # type: ignore[import-untyped]
    from syft.client.client import HTTPConnection
    from syft.serde.deserialize import _deserialize
    from syft.serde.serialize import _serialize

    conn = getattr(client, "connection", None)
    if not isinstance(conn, HTTPConnection) or conn.rtunnel_token:
        return False

    def make_call(signed_call: Any) -> Any:  # HTTPConnection.make_call, with a timeout
        msg = _serialize(obj=signed_call, to_bytes=True)
        response = requests.post(url=conn.api_url, data=msg, headers=conn.headers,
                                 timeout=timeout())
        if response.status_code != 200:
            raise requests.ConnectionError(
                f"Failed to fetch metadata. Response returned with code {response.status_code}")
        return _deserialize(response.content, from_bytes=True)

    session = conn.session
    plain = session.request

    def request(method: str, url: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", timeout())
        return plain(method, url, **kwargs)

    object.__setattr__(conn, "make_call", make_call)
    session.request = request
    api = getattr(client, "_api", None)  # the API holds the same connection; check it does
    return getattr(api, "connection", conn) is conn


def _dataset_parts(value: Any) -> tuple[Any, Any, Any, Any]:
    """(features, labels, ids, mock) from a tuple of 1-4 items or a host ``Dataset``."""
    from ..host import Dataset

    if isinstance(value, Dataset):
        return value.features, value.labels, value.ids, value.mock
    parts = (tuple(value) + (None, None, None))[:4]
    return parts[0], parts[1], parts[2], parts[3]


def deployment(
    parties: Mapping[str, Mapping[str, tuple[Any, Any]]],
    *,
    http: bool = False,
    user: str = "model-owner@example.org",
    name_prefix: str = "syft-split",
    state_dir: str | Path | None = None,
    policy: CallPolicy | None = None,
    **install_kwargs: Any,
) -> Any:
    """One fresh datasite per data-owner party, as a :class:`syft_split.deploy.Deployment`.

    ``parties`` is ``{party: {dataset: (features, labels or None)}}``. For each party: launch a
    datasite (embedded, or HTTP with ``http=True``), upload each dataset as a PySyft dataset
    with mock assets, :func:`~syft_split.datasite.install` the endpoint (``install_kwargs``:
    ``max_batch``, ``max_request_bytes``, ``checkpoint_every``, ``limits``), register ``user`` as a
    non-admin model owner. The transport logs in as ``user`` (calls bounded by ``policy``);
    each console uses the datasite's admin client; ``Deployment.close()`` lands every datasite.

    ``state_dir``: every party's datasite is persistent under ``<state_dir>/<party>/``
    (``syft/``: PySyft's identity and database; ``host/``: the syft-split host's state), so it
    can be restarted (:func:`restart`); ``close()`` then leaves the directory in place.
    Without it, ``close()`` also removes each datasite's data folder.
    """
    from ..deployment import Deployment

    password = secrets.token_hex(12)
    sites: dict[str, LaunchedDatasite] = {}
    clients: dict[str, Any] = {}
    consoles: dict[str, Any] = {}
    try:
        for party, datasets in parties.items():
            where = None if state_dir is None else Path(state_dir) / party
            site = launch_datasite(f"{name_prefix}-{party}-{secrets.token_hex(4)}", http=http,
                                   data_dir=None if where is None else where / "syft")
            sites[party] = site
            refs: dict[str, Any] = {}
            for ds_name, value in datasets.items():
                features, labels, ids, mock = _dataset_parts(value)
                assets = publish_dataset(site.root, ds_name, features, labels, ids=ids,
                                         mock_features=mock)
                refs[ds_name] = {k: assets[k] for k in ("features", "labels", "ids")
                                 if k in assets}
            install(site.root, refs, host_name=party,
                    state_dir=None if where is None else where / "host", **install_kwargs)
            clients[party] = site.register(user, password)
            consoles[party] = DatasiteConsole(site.root)
    except BaseException:
        for site in reversed(list(sites.values())):
            site.close()
        raise
    transport = PySyftTransport(clients, datasites=sites, policy=policy)
    return Deployment(transport, consoles, closers=[s.close for s in sites.values()])


def restart(dep: Any, party: str, *, crash: bool = False) -> float:
    """Restart ``party``'s datasite of a persistent :func:`deployment` (``crash``: SIGKILL
    it first instead of a clean stop); the transport and the console reach it again (an
    embedded datasite needs new logins; an HTTP one keeps its clients). Returns seconds."""
    transport = dep.transport
    site: LaunchedDatasite = transport.datasites[party]
    seconds = site.restart(crash=crash)
    if not site.http:
        user = transport.user_on(party)
        transport.set_client(party, site.login(user, site.passwords[user]))
        dep.owners[party].client = site.root
    return seconds


def connect(urls: Mapping[str, str], email: str, password: str, *,
            policy: CallPolicy | None = None,
            channel_hosts: Mapping[str, str] | None = None) -> PySyftTransport:
    """Log in to existing datasites (``{party: "http://host:port"}``) as the model owner
    (``channel_hosts``: see :class:`PySyftTransport`).

    Each login and every call is bounded by ``policy``'s timeout; a datasite that refuses
    connections (e.g. restarting) is tried again like a failed call (``policy.retries``)."""
    from urllib.parse import urlparse

    policy = policy or CallPolicy()
    clients = {}
    for party, url in urls.items():
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"{party}: expected a URL like http://localhost:8081, got {url!r}")

        def login(p: Any = parsed) -> Any:
            with quiet():  # "Logged into ..." (SYFT_SPLIT_VERBOSE=1: shown)
                return sy.login(url=f"{p.scheme}://{p.hostname}", port=p.port or 80,
                                email=email, password=password)

        wait = policy.backoff
        for attempt in range(policy.retries + 1):
            last = attempt == policy.retries
            try:
                clients[party] = run_with_timeout(login, policy.timeout, party=party, op="login")
                break
            except CallTimeoutError:
                if last:
                    raise
            except Exception as exc:
                if last or not _refused(exc):
                    raise TransportError(f"could not log in to {party} at {url}: {exc}") from exc
            time.sleep(wait)
            wait = min(2 * wait, policy.max_backoff)
    return PySyftTransport(clients, policy=policy, channel_hosts=channel_hosts)


def _refused(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) is a connection that could not be made."""
    import requests  # type: ignore[import-untyped]

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (requests.ConnectionError, ConnectionError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
