"""PySyft transport: the model owner reaches data-owner hosts running inside PySyft datasites.

Each data-owner party is a datasite on which the data owner ran
:func:`syft_split.datasite.install`. :class:`PySyftTransport` holds one logged-in (non-admin)
client per party and calls the endpoint inline with ``client.api.services.api.call`` (the
documented ``client.api.services.<path>(...)`` goes through PySyft's job queue: seconds per
call, or a 60 s hang without consumers). Requests and responses are wire bytes only.

:func:`launch_datasite` starts a datasite for tests and demos — embedded in this process, or a
real uvicorn HTTP server on loopback — and :meth:`LaunchedDatasite.close` lands it and removes
its data folder.

This is the only module of syft-split that imports ``syft`` at import time.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import syft as sy
import torch

from .. import wire
from ..datasite import ENDPOINT_PATH, DatasiteConsole, call_endpoint, install, publish_dataset
from ..errors import ConfigError, TransportError
from ..logs import log_path, quiet
from .base import Transport

__all__ = [
    "PySyftTransport",
    "deployment",
    "LaunchedDatasite",
    "launch_datasite",
    "free_port",
    "connect",
    "DEFAULT_ADMIN",
]

#: PySyft's default root account of a freshly launched datasite.
DEFAULT_ADMIN = ("info@openmined.org", "changethis")


class PySyftTransport(Transport):
    """Deliver requests to the syft-split endpoint of each party's datasite.

    ``clients`` maps a party name to a logged-in syft client of the model owner on that
    datasite. The datasite answers as the user the client is logged in as; the data owner
    approved segments for that user only.

    With ``cleanup=True`` (default) each call tells the endpoint to delete the action object
    PySyft stored for the previous call to the same party, so a datasite holds at most one
    result per transport and party (the last one stays).
    """

    def __init__(
        self,
        clients: Mapping[str, Any],
        *,
        path: str = ENDPOINT_PATH,
        cleanup: bool = True,
        max_response_bytes: int = wire.DEFAULT_MAX_BYTES,
        datasites: Mapping[str, LaunchedDatasite] | None = None,
    ) -> None:
        super().__init__(max_response_bytes=max_response_bytes)
        if not clients:
            raise ConfigError("PySyftTransport needs at least one client (party name -> client)")
        self._clients = dict(clients)
        self.path = path
        self.cleanup = cleanup
        self._done: dict[str, str] = {}
        self._users = {p: str(getattr(c, "logged_in_user", "") or "") for p, c in clients.items()}
        #: the datasites behind the parties, when this process launched them (not closed here)
        self.datasites: dict[str, LaunchedDatasite] = dict(datasites or {})

    @property
    def user(self) -> str:
        """The model owner's e-mail (of the first party's client; see :meth:`user_on`)."""
        return next(iter(self._users.values()))

    def user_on(self, party: str) -> str:
        """The e-mail this transport is logged in as on ``party``'s datasite."""
        self._client(party)
        return self._users[party]

    def parties(self) -> list[str]:
        return list(self._clients)

    def _client(self, party: str) -> Any:
        client = self._clients.get(party)
        if client is None:
            raise TransportError(f"unknown party {party!r}; connected: {sorted(self._clients)}")
        return client

    def request(self, party: str, data: bytes) -> bytes:
        client = self._client(party)
        kwargs: dict[str, Any] = {"request": bytes(data)}
        done = self._done.pop(party, "")
        if done:
            kwargs["done"] = done
        raw, result_id = call_endpoint(client, self.path, **kwargs)
        if self.cleanup:
            self._done[party] = result_id
        return raw


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LaunchedDatasite:
    """A datasite this process launched: its handle, root client, and how to reach it."""

    name: str
    handle: Any
    root: Any
    http: bool
    port: int | None
    pid: int
    server_id: str
    _closed: bool = field(default=False, repr=False)

    def login(self, email: str, password: str) -> Any:
        """Log in as ``email`` (over HTTP for an HTTP datasite)."""
        try:
            with quiet(log_path(self.name)):  # "Logged into ...", default-password warning
                if self.http:
                    return sy.login(url="http://127.0.0.1", port=self.port, email=email,
                                    password=password)
                return self.handle.login(email=email, password=password)
        except Exception as exc:
            raise TransportError(f"login of {email} to {self.name} failed: {exc}") from exc

    def register(self, email: str, password: str, name: str | None = None) -> Any:
        """Register a non-admin user (as the root admin) and return its logged-in client."""
        try:
            self.root.register(name=name or email.split("@")[0], email=email, password=password,
                               password_verify=password, institution="syft-split",
                               website="https://example.org")
        except Exception as exc:
            raise TransportError(f"registering {email} on {self.name} failed: {exc}") from exc
        return self.login(email, password)

    @property
    def data_dir(self) -> Path:
        return Path(tempfile.gettempdir(), os.getenv("SYFT_TEMP_ROOT", "syft"), self.server_id)

    def close(self) -> None:
        """Land the datasite and remove its data folder (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self.http and self.handle.python_server is not None:
                self.handle.python_server.cleanup()
        finally:
            try:
                with quiet(log_path(self.name)):
                    self.handle.land()
            finally:
                shutil.rmtree(self.data_dir, ignore_errors=True)
                _forget_hosts(self.server_id)

    def __enter__(self) -> LaunchedDatasite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _forget_hosts(server_id: str) -> None:
    from .. import datasite

    with datasite._ENTRIES_LOCK:
        for key in [k for k in datasite._ENTRIES if k[0].replace("-", "") == server_id]:
            del datasite._ENTRIES[key]


def launch_datasite(
    name: str,
    *,
    http: bool = False,
    port: int | None = None,
    admin: tuple[str, str] = DEFAULT_ADMIN,
) -> LaunchedDatasite:
    """Launch a fresh datasite named ``name`` and log in as its root admin.

    ``http=False`` embeds the server in this process; ``http=True`` starts a uvicorn server
    process on ``127.0.0.1:port`` (a free port by default). Names must be unique per test
    run (PySyft derives the server id and data folder from it). The root logger level is
    restored after launch (PySyft sets it to CRITICAL). What PySyft and uvicorn print goes to
    :func:`syft_split.logs.log_path` ``(name)`` unless ``SYFT_SPLIT_VERBOSE=1``.
    """
    root_logger = logging.getLogger()
    level = root_logger.level
    before = {p.pid for p in multiprocessing.active_children()}
    port = (port or free_port()) if http else None
    try:
        if http:
            # spawn, not fork: a forked child inherits this process's torch/SEAL thread pools
            # in whatever state they are in and can deadlock on first use (seen here)
            multiprocessing.set_start_method("spawn", force=True)
            # the server computes with as many torch threads as this process (same numerics)
            threads = os.environ.get("OMP_NUM_THREADS")
            os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
            try:  # the server process writes to the log file for good (SYFT_SPLIT_VERBOSE=1: not)
                with quiet(log_path(name), fds=True):
                    handle = sy.orchestra.launch(name=name, port=port, host="127.0.0.1",
                                                 reset=True)
            finally:
                if threads is None:
                    os.environ.pop("OMP_NUM_THREADS", None)
                else:
                    os.environ["OMP_NUM_THREADS"] = threads
        else:
            with quiet(log_path(name)):
                handle = sy.orchestra.launch(name=name, reset=True)
    except Exception as exc:
        raise TransportError(f"could not launch datasite {name!r}: {exc}") from exc
    finally:
        root_logger.setLevel(level)
    pid = os.getpid()
    if http:  # the uvicorn server is a multiprocessing child of this process
        new = [p.pid for p in multiprocessing.active_children() if p.pid not in before]
        if new and new[0] is not None:
            pid = new[0]
    site = LaunchedDatasite(name=name, handle=handle, root=None, http=http, port=port, pid=pid,
                            server_id="")
    try:
        site.root = site.login(*admin)
        site.server_id = str(site.root.id).replace("-", "")
    except BaseException:
        if handle.python_server is not None:
            handle.python_server.cleanup()
        handle.land()
        raise
    finally:
        root_logger.setLevel(level)
    return site


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
    **install_kwargs: Any,
) -> Any:
    """One fresh datasite per data-owner party, as a :class:`syft_split.deploy.Deployment`.

    ``parties`` is ``{party: {dataset: (features, labels or None)}}``. For each party: launch a
    datasite (embedded, or HTTP with ``http=True``), upload each dataset as a PySyft dataset
    with mock assets, :func:`~syft_split.datasite.install` the endpoint (``install_kwargs``:
    ``max_batch``, ``max_request_bytes``), register ``user`` as a non-admin model owner.
    The transport logs in as ``user``; each console uses the datasite's admin client;
    ``Deployment.close()`` lands every datasite and removes its data folder.
    """
    from ..deployment import Deployment

    password = secrets.token_hex(12)
    sites: dict[str, LaunchedDatasite] = {}
    clients: dict[str, Any] = {}
    consoles: dict[str, Any] = {}
    try:
        for party, datasets in parties.items():
            site = launch_datasite(f"{name_prefix}-{party}-{secrets.token_hex(4)}", http=http)
            sites[party] = site
            refs: dict[str, Any] = {}
            for ds_name, value in datasets.items():
                features, labels, ids, mock = _dataset_parts(value)
                assets = publish_dataset(site.root, ds_name, features, labels, ids=ids,
                                         mock_features=mock)
                refs[ds_name] = {k: assets[k] for k in ("features", "labels", "ids")
                                 if k in assets}
            install(site.root, refs, host_name=party, **install_kwargs)
            clients[party] = site.register(user, password)
            consoles[party] = DatasiteConsole(site.root)
    except BaseException:
        for site in reversed(list(sites.values())):
            site.close()
        raise
    transport = PySyftTransport(clients, datasites=sites)
    return Deployment(transport, consoles, closers=[s.close for s in sites.values()])


def connect(urls: Mapping[str, str], email: str, password: str) -> PySyftTransport:
    """Log in to existing datasites (``{party: "http://host:port"}``) as the model owner."""
    from urllib.parse import urlparse

    clients = {}
    for party, url in urls.items():
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"{party}: expected a URL like http://localhost:8081, got {url!r}")
        try:
            with quiet():  # "Logged into ..." (SYFT_SPLIT_VERBOSE=1: shown)
                clients[party] = sy.login(url=f"{parsed.scheme}://{parsed.hostname}",
                                          port=parsed.port or 80, email=email, password=password)
        except Exception as exc:
            raise TransportError(f"could not log in to {party} at {url}: {exc}") from exc
    return PySyftTransport(clients)
