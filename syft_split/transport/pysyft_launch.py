"""Launching PySyft datasites for tests, demos and operators: embedded or HTTP, fresh or
persistent (same identity and database across launches), and restarting them.

Re-exported by :mod:`syft_split.transport.pysyft`; imports ``syft``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import syft as sy
import torch

from ..datasite_serve import forget_hosts
from ..errors import ConfigError, TransportError
from ..logs import log_path, quiet

__all__ = ["DEFAULT_ADMIN", "LaunchedDatasite", "launch_datasite", "free_port"]

#: PySyft's default root account of a freshly launched datasite.
DEFAULT_ADMIN = ("info@openmined.org", "changethis")


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LaunchedDatasite:
    """A datasite this process launched: its handle, root client, and how to reach it.

    ``persist_dir`` (``launch_datasite(data_dir=...)``): where its identity and database live
    across launches; then :meth:`restart` brings the same datasite back and :meth:`close`
    keeps the directory (it is the data owner's)."""

    name: str
    handle: Any
    root: Any
    http: bool
    port: int | None
    pid: int
    server_id: str
    admin: tuple[str, str] = DEFAULT_ADMIN
    persist_dir: Path | None = None
    #: passwords of the users registered through :meth:`register` (to log in again)
    passwords: dict[str, str] = field(default_factory=dict, repr=False)
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
        self.passwords[email] = password
        return self.login(email, password)

    @property
    def data_dir(self) -> Path:
        """Where PySyft keeps this datasite's database and blobs."""
        root = self.persist_dir or Path(tempfile.gettempdir(), os.getenv("SYFT_TEMP_ROOT", "syft"))
        return Path(root, self.server_id)

    def kill(self) -> None:
        """Crash it: SIGKILL the HTTP server process (an embedded datasite is landed and its
        hosts dropped from memory unsaved). Only what is on disk survives."""
        if self.http:
            os.kill(self.pid, signal.SIGKILL)
            _reap(self.pid)
        else:
            forget_hosts(self.server_id, save=False)
            self.handle.land()

    def stop(self) -> None:
        """Shut it down cleanly (its hosts save their state)."""
        if not self.http:
            forget_hosts(self.server_id, save=True)
        self.handle.land()
        if self.http:
            _reap(self.pid)

    def restart(self, *, crash: bool = False) -> float:
        """Stop it (``crash``: :meth:`kill` it) and launch it again with its identity and
        database; returns the seconds until its root admin is logged in again. Needs
        ``persist_dir`` (HTTP) — embedded datasites derive identity and database from their
        name. Clients of an HTTP datasite keep working; an embedded one needs new logins."""
        if self.http and self.persist_dir is None:
            raise ConfigError(f"{self.name} was launched without data_dir: a relaunch would be a "
                              "different, empty datasite")
        t0 = time.perf_counter()
        self.kill() if crash else self.stop()
        again = launch_datasite(self.name, http=self.http, port=self.port, admin=self.admin,
                                data_dir=self.persist_dir, reset=False)
        self.handle, self.root, self.pid = again.handle, again.root, again.pid
        if again.server_id != self.server_id:
            raise TransportError(f"{self.name} came back as {again.server_id}, not "
                                 f"{self.server_id}")
        return time.perf_counter() - t0

    def close(self) -> None:
        """Land the datasite and remove its data folder, unless it is persistent (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self.http and self.handle.python_server is not None and self.persist_dir is None:
                self.handle.python_server.cleanup()
        finally:
            try:
                with quiet(log_path(self.name)):  # "Stopping <name>"
                    self.handle.land()
            finally:
                if self.persist_dir is None:
                    shutil.rmtree(self.data_dir, ignore_errors=True)
                forget_hosts(self.server_id, save=self.persist_dir is not None)

    def __enter__(self) -> LaunchedDatasite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _first_login(site: LaunchedDatasite, admin: tuple[str, str], patience: float = 90.0) -> Any:
    """Log the root admin in; an HTTP server still starting (PySyft's launch gives up waiting
    after 20 s, a loaded machine can take longer) is given ``patience`` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return site.login(*admin)
        except TransportError:
            if not site.http or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _reap(pid: int) -> None:
    """Wait (up to 5 s) until a server process that was stopped or killed is gone."""
    for _ in range(100):
        if pid not in {p.pid for p in multiprocessing.active_children()}:  # joins the dead
            return
        time.sleep(0.05)


def _identity(data_dir: Path) -> dict[str, str]:
    """The datasite's server id and signing key, made once and kept in ``data_dir`` (0600)."""
    from nacl.signing import SigningKey

    path = data_dir / "identity.json"
    if path.exists():
        identity: dict[str, str] = json.loads(path.read_text())
        return identity
    identity = {"server_uid": secrets.token_hex(16),
                "signing_key": SigningKey.generate().encode().hex()}
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(identity, f)
    return identity


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a launch (a spawned server reads them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def launch_datasite(
    name: str,
    *,
    http: bool = False,
    port: int | None = None,
    admin: tuple[str, str] = DEFAULT_ADMIN,
    data_dir: str | Path | None = None,
    reset: bool = True,
) -> LaunchedDatasite:
    """Launch a datasite named ``name`` and log in as its root admin.

    ``http=False`` embeds the server in this process; ``http=True`` starts a uvicorn server
    process on ``127.0.0.1:port`` (a free port by default). Names must be unique per test
    run (PySyft derives the server id and data folder from it). The root logger level is
    restored after launch (PySyft sets it to CRITICAL).

    ``data_dir``: a persistent datasite. What PySyft keeps across launches is its server id,
    its signing key and its SQLite database + blob folder (``<data_dir>/<server id>/``). An
    embedded datasite derives id and key from ``name`` (``Datasite.named``); an HTTP server
    process reads them from the environment (``SERVER_UID``, ``SERVER_PRIVATE_KEY``), which is
    why a plain relaunch came up as a new, empty server: they are made once and kept in
    ``<data_dir>/identity.json`` (mode 0600), and the database folder is chosen with
    ``SYFT_TEMP_ROOT``. Launching again with the same ``name`` and ``data_dir`` (``reset`` is
    then ignored: nothing is wiped) brings back the same datasite: users, datasets, endpoints.
    """
    root_logger = logging.getLogger()
    level = root_logger.level
    before = {p.pid for p in multiprocessing.active_children()}
    port = (port or free_port()) if http else None
    env: dict[str, str] = {}
    persist = None if data_dir is None else Path(data_dir).resolve()
    if persist is not None:
        reset = False
        persist.mkdir(parents=True, exist_ok=True)
        env["SYFT_TEMP_ROOT"] = str(persist)
        if http:
            identity = _identity(persist)
            env.update(SERVER_UID=identity["server_uid"],
                       SERVER_PRIVATE_KEY=identity["signing_key"])
    try:
        if http:
            # spawn, not fork: a forked child inherits this process's torch/SEAL thread pools
            # in whatever state they are in and can deadlock on first use (seen here)
            multiprocessing.set_start_method("spawn", force=True)
            # the server computes with as many torch threads as this process (same numerics)
            env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
            # the server process writes to the log file for good (SYFT_SPLIT_VERBOSE=1: not)
            with _environment(env), quiet(log_path(name), fds=True):
                handle = sy.orchestra.launch(name=name, port=port, host="127.0.0.1", reset=reset)
        else:
            with _environment(env), quiet(log_path(name)):
                handle = sy.orchestra.launch(name=name, reset=reset)
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
                            server_id="", admin=admin, persist_dir=persist)
    try:
        site.root = _first_login(site, admin)
        site.server_id = str(site.root.id).replace("-", "")
    except BaseException:
        if handle.python_server is not None and persist is None:
            handle.python_server.cleanup()
        handle.land()
        raise
    finally:
        root_logger.setLevel(level)
    return site
