"""Inside the datasite: the syft-split endpoint and the data owner's host behind it.

PySyft re-executes :func:`syft_split_endpoint` on every call; it hands the request to
:func:`serve`, which keeps one :class:`~syft_split.host.DataOwnerHost` per installed endpoint in
a process-level registry: the private assets are read once (through ``context.admin_client``)
when the host is created, and model state lives in that host, never in ``context.state``.

With a ``state_dir`` in the endpoint's settings (:func:`syft_split.datasite.install`) the host
keeps its state there (:mod:`syft_split.host.store`): a datasite restarted with its database
(same server id and keys; see :func:`syft_split.transport.pysyft.launch_datasite`) rebuilds
the host from it on the first call and serves the approved segments again, without a new
approval. Hosts are saved on a clean shutdown (``uninstall``, or the process exiting).

The caller side (install, console, ``call_endpoint``) is :mod:`syft_split.datasite`.
"""

from __future__ import annotations

import atexit
import gc
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import wire
from .errors import AuthorizationError, ConfigError, StateSaveError, SyftSplitError
from .host import AuditEntry, DataOwnerHost, HostLimits
from .host.channel import close_channels, serving_lock

__all__ = ["ENDPOINT_PATH", "syft_split_endpoint", "serve", "as_result", "forget_hosts"]

#: default path of the endpoint on a datasite.
ENDPOINT_PATH = "syft_split.call"
#: how the host knows a datasite user: ``syft-user:<PySyft user id>``. An id never changes and
#: is never reused; an e-mail is the user's to change and free again once its account is
#: deleted: it is only displayed (:mod:`syft_split.host.users`)
PRINCIPAL = "syft-user:"

_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------- the endpoint
def syft_split_endpoint(
    context: object, request: bytes = b"", owner: str = "", done: str = ""
) -> object:
    """syft-split data-owner plugin: see the ``syft_split.datasite`` module on this datasite."""
    # PySyft re-executes this source with globals {"print"}: everything is imported here.
    try:
        from syft_split import datasite_serve as plugin
    except Exception as exc:
        return f"syft_split is not importable on this datasite: {type(exc).__name__}: {exc}"
    return plugin.as_result(plugin.serve(context, request, owner=owner, done=done))


def as_result(raw: bytes) -> np.ndarray:
    """The response bytes as a 1-D uint8 array, the form the endpoint returns them in.

    Same bytes, different container: PySyft walks a returned ``bytes`` object element by
    element (``attach_attribute_to_syft_object`` treats it as a Sequence), ~110 ms per MiB;
    an array is one object to it and travels through Arrow (no pickle).
    """
    return np.frombuffer(raw, dtype=np.uint8)


@dataclass
class _Entry:
    instance: str
    host: DataOwnerHost
    lock: threading.Lock


_ENTRIES: dict[tuple[str, str], _Entry] = {}
_ENTRIES_LOCK = threading.Lock()


def serve(context: Any, request: bytes, *, owner: str = "", done: str = "") -> bytes:
    """Answer one endpoint call inside the datasite (called by :func:`syft_split_endpoint`).

    Never raises: every failure goes back as wire error bytes, because PySyft replaces an
    exception's message with "please contact your admin" for non-admin callers.
    """
    try:
        if done:
            _delete_result(context, done)
        entry = _entry(context)
        caller = f"{PRINCIPAL}{context.user.id}"
        entry.host.names[caller] = str(context.user.email)  # for display, never checked
        if owner:
            return _owner_call(context, entry, caller, owner, bytes(request))
        with entry.lock:
            return entry.host.handle(caller, bytes(request))
    except SyftSplitError as exc:
        return wire.encode({"error": type(exc).__name__, "message": str(exc)})
    except Exception as exc:  # a syft failure (e.g. an asset that cannot be read)
        return wire.encode({"error": "RemoteError", "message": f"{type(exc).__name__}: {exc}"})
    finally:
        _unregister_call_clients(context)


def _entry(context: Any) -> _Entry:
    settings = context.settings or {}
    key = (str(context.server.id), str(settings.get("path", ENDPOINT_PATH)))
    instance = str(settings.get("instance", ""))
    entry = _ENTRIES.get(key)
    if entry is not None and entry.instance == instance:
        return entry
    with _ENTRIES_LOCK:
        entry = _ENTRIES.get(key)
        if entry is None or entry.instance != instance:  # first call, or re-installed
            if entry is not None:  # the old host's channels first: no frame reaches it after
                with entry.lock:
                    close_channels(entry.host)
                    entry.host.close()
            host = _build_host(context, settings)
            entry = _Entry(instance, host, serving_lock(host))
            _ENTRIES[key] = entry
            # PySyft builds two throw-away clients per call; their garbage made the cyclic GC
            # scan the whole server heap every few calls (1-2 s stalls, measured). In a server
            # process of its own, what exists now (server, imports, host) is long-lived:
            # exempt it from collection. Never in a process that runs other code too.
            # SYFT_SPLIT_GC_FREEZE=1/0 forces it (e.g. 1 in a datasite container).
            freeze = os.environ.get("SYFT_SPLIT_GC_FREEZE", "")
            if freeze == "1" or (freeze != "0" and multiprocessing.parent_process() is not None):
                gc.freeze()
    return entry


def _build_host(context: Any, settings: Mapping[str, Any]) -> DataOwnerHost:
    limits = settings.get("limits")
    host = DataOwnerHost(
        str(settings.get("host_name") or context.server.name),
        max_request_bytes=int(settings.get("max_request_bytes", 64 * 1024 * 1024)),
        max_batch=int(settings.get("max_batch", 4096)),
        limits=HostLimits(**limits) if limits else None,
        state_dir=settings.get("state_dir") or None,
        checkpoint_every=int(settings.get("checkpoint_every", 1)),
    )
    for name, ids in dict(settings.get("datasets", {})).items():
        features = _load_asset(context, ids["features"], f"{name}.features")
        mock = _load_asset(context, ids["features"], f"{name}.features (mock)", mock=True)
        labels = ids.get("labels")
        labels_t = _load_asset(context, labels, f"{name}.labels") if labels else None
        record_ids = _load_ids(context, ids["ids"], name) if ids.get("ids") else None
        if features.is_floating_point():
            features = features.to(torch.float32)
            mock = mock.to(torch.float32)
        if labels_t is not None and not labels_t.is_floating_point():
            labels_t = labels_t.to(torch.int64)
        host.add_dataset(name, features, labels_t, ids=record_ids,
                         mock=mock if mock.shape[1:] == features.shape[1:] else None)
    if host.restore_state():
        _log.info("syft_split: host %s restored from %s", host.name, settings.get("state_dir"))
        _halt_by_email(host)
        _withdraw_email_permissions(host)
    return host


def _halt_by_email(host: DataOwnerHost) -> list[str]:
    """Halt the proposals an older syft-split recorded for a user's e-mail (not a principal):
    an e-mail can pass to another account, so none is bound to whoever has it now. The data
    owner keeps their weights (``export_weights``); their model owners propose again."""
    legacy = [p.id for p in host.proposals() if p.status in ("pending", "approved")
              and not p.driver.startswith(PRINCIPAL)]
    for pid in legacy:
        host.halt(pid, f"proposed by {host.proposal(pid).driver!r}, a user named by its e-mail "
                  "(state of an older syft-split): an e-mail can pass to another account, so "
                  "it drives nothing here; the model owner proposes again")
    return legacy


def _withdraw_email_permissions(host: DataOwnerHost) -> list[tuple[str, str]]:
    """Withdraw the alignment permissions an older syft-split saved for e-mails (audited:
    "grant again for <e-mail>"): moved to the account that has the e-mail now, one could
    reach another user than the data owner allowed. Saved at once (if that fails, they are
    withdrawn again at the next restore)."""
    alignment: Any = host.families.get("alignment")
    gone: list[tuple[str, str]] = [] if alignment is None else alignment.withdraw_legacy(PRINCIPAL)
    if gone and host.store is not None:
        try:
            host.store.save_host(host)
        except Exception as exc:  # in effect here; the next save (or restore) saves it
            _log.warning("syft_split: %s could not save the withdrawn e-mail permissions: %s",
                         host.name, exc)
    return gone


def _load_ids(context: Any, action_id: str, name: str) -> list[str | int]:
    """Record ids (for PSI alignment): an asset of strings or integers, one per record."""
    from syft.types.uid import UID

    data = getattr(context.admin_client.api.services.action.get(UID(action_id)),
                   "syft_action_data", None)
    values = np.asarray(data).reshape(-1).tolist()
    if not all(isinstance(v, (str, int)) for v in values):
        raise ConfigError(f"dataset {name!r}: record ids must be strings or integers")
    return values


def _load_asset(context: Any, action_id: str, what: str, *, mock: bool = False) -> torch.Tensor:
    from syft.service.action.action_object import TwinMode
    from syft.types.uid import UID

    if mock:
        obj = context.admin_client.api.services.action.get(UID(action_id),
                                                           twin_mode=TwinMode.MOCK)
    else:
        obj = context.admin_client.api.services.action.get(UID(action_id))
    data = getattr(obj, "syft_action_data", obj)
    if hasattr(data, "to_numpy"):  # pandas
        data = data.to_numpy()
    try:
        tensor = torch.as_tensor(data).detach().clone()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"asset {what} ({action_id}) is not array data: {type(data).__name__}"
                          ) from exc
    return tensor


def _delete_result(context: Any, done: str) -> None:
    """Delete the caller's previous result: with the CALLER's credentials, so PySyft's own
    permissions apply (read to find it, write to delete it: only the caller's own objects)."""
    from syft.service.context import AuthedServiceContext
    from syft.types.uid import UID

    server = context.server
    try:
        caller = AuthedServiceContext(server=server, credentials=context.credentials,
                                      role=context.role)
        server.services.action.delete(caller, UID(done))
    except Exception as exc:  # housekeeping only: never fail the call for it
        _log.debug("syft_split: %s could not delete %s: %s", context.user.email, done, exc)


def _unregister_call_clients(context: Any) -> None:
    """Drop the APIs of the two clients PySyft built for this call from its global registry."""
    try:
        from syft.client.api import APIRegistry

        apis = [getattr(c, "_api", None) for c in (context.user_client, context.admin_client)]
        apis = [a for a in apis if a is not None]
        registry = APIRegistry.__api_registry__
        for key in [k for k, v in list(registry.items()) if any(v is a for a in apis)]:
            registry.pop(key, None)
    except Exception as exc:
        _log.debug("syft_split: could not unregister per-call clients: %s", exc)


def _is_admin(context: Any) -> bool:
    return getattr(context.role, "name", None) == "ADMIN"


def _owner_call(context: Any, entry: _Entry, caller: str, op: str, request: bytes) -> bytes:
    """A data-owner op: only for an admin of this datasite; answered (and audited) by the host."""
    try:
        if not _is_admin(context):
            exc = AuthorizationError(f"{context.user.email} is not an admin of this datasite: "
                                     f"data-owner op {op!r} refused")
            entry.host.record(AuditEntry(time.time(), caller, f"owner.{op}", None, {},
                                         len(request), 0, 0.0, f"AuthorizationError: {exc}"))
            raise exc
        fields = wire.decode(request)
        if op in ("allow_alignment", "revoke_alignment") and isinstance(fields.get("user"), str):
            try:
                fields["user"] = _principal_of(context, fields["user"])
            except ConfigError:  # no account has that e-mail now: a revocation is matched
                if op == "allow_alignment":  # against the names of the users allowed
                    raise
        # a halt closes its segments' gate now, not once the model owner's op in progress
        # (which holds the lock) ends: that op's answer is refused, nothing of it leaves
        closed = entry.host.ask_halt(op, fields)
        with entry.lock:
            if op == "shutdown":  # save and forget the host (the endpoint is being removed)
                close_channels(entry.host)
                entry.host.close()
                with _ENTRIES_LOCK:
                    for key in [k for k, v in _ENTRIES.items() if v is entry]:
                        del _ENTRIES[key]
                return wire.encode({"shutdown": True})
            try:
                return wire.encode(entry.host.owner_call(caller, op, fields))
            except StateSaveError:
                raise  # it took effect, not durably: its gates stay closed
            except BaseException:
                entry.host.undo_halt(closed)  # the halt failed: its gates open again
                raise
    except SyftSplitError as exc:
        return wire.encode({"error": type(exc).__name__, "message": str(exc)})



def _principal_of(context: Any, email: str) -> str:
    """The principal of the account that goes by ``email`` now (the data owner names a user
    by e-mail; the host keeps that account's id)."""
    if email.startswith(PRINCIPAL):
        return email
    server = context.server
    try:
        user = server.services.user.stash.get_by_email(credentials=server.verify_key,
                                                       email=email).unwrap()
    except Exception as exc:
        raise ConfigError(f"no user {email!r} on this datasite") from exc
    return f"{PRINCIPAL}{user.id}"


def forget_hosts(server_id: str, *, save: bool = True) -> None:
    """Drop the hosts of datasite ``server_id`` from this process (saving their state first
    unless ``save=False``, e.g. to act out a crash)."""
    with _ENTRIES_LOCK:
        for key in [k for k in _ENTRIES if k[0].replace("-", "") == server_id.replace("-", "")]:
            entry = _ENTRIES.pop(key)
            close_channels(entry.host)
            if save:
                entry.host.close()


def _save_all() -> None:
    """Clean shutdown of this process: every host writes its state directory."""
    for entry in list(_ENTRIES.values()):
        try:
            entry.host.close()
        except Exception as exc:  # never fail the interpreter's exit
            _log.warning("syft_split: could not save host %s: %s", entry.host.name, exc)


atexit.register(_save_all)
