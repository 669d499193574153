"""The data owner's PySyft plugin: a :class:`~syft_split.host.DataOwnerHost` behind ONE endpoint.

The data owner keeps its data as an ordinary PySyft dataset (private + mock assets, uploaded
with ``sy.Dataset``/``sy.Asset`` or :func:`publish_dataset`) and registers one custom API
endpoint with :func:`install`. Registering it is the data owner's act of consent to run this
plugin; each segment a model owner proposes still needs :meth:`DatasiteConsole.approve`.
``install(..., state_dir=...)`` makes the host keep its state in a directory the data owner
controls, so a restarted datasite serves its approved segments again (see the README,
"Operating a datasite").

What runs inside the datasite (the endpoint function, the host registry) is
:mod:`syft_split.datasite_serve`; this module is the caller's side. Calls (keyword arguments
of ``client.api.services.api.call(path, ...)``)::

    request=<wire bytes>                 a model-owner op, answered by host.handle(the user's
                                         principal, syft-user:<PySyft user id>)
    request=<wire bytes>, owner=<op>     a data-owner op; refused unless the caller is ADMIN
    done=<uid>                           housekeeping: delete the caller's previous result

Data-owner ops are reached through :class:`DatasiteConsole` built on the admin's client::

    owner = DatasiteConsole(admin_client)
    print(owner.review(pid)); owner.approve(pid)      # also reject, export_weights, audit...

Responses leave the endpoint as a uint8 array of the wire bytes (see :func:`as_result`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import wire
from .datasite_serve import ENDPOINT_PATH, as_result, serve, syft_split_endpoint
from .errors import (
    CallTimeoutError,
    ConfigError,
    SyftSplitError,
    TransportError,
    error_from_wire,
)
from .host import AuditEntry, HostLimits
from .host.channel import ChannelConsole

__all__ = [
    "ENDPOINT_PATH",
    "DatasiteConsole",
    "ProposalInfo",
    "install",
    "uninstall",
    "publish_dataset",
    "call_endpoint",
    "syft_split_endpoint",
    "serve",
    "as_result",
]

_log = logging.getLogger(__name__)

# ------------------------------------------------------------------ caller-side helpers
def call_endpoint(client: Any, path: str = ENDPOINT_PATH, **kwargs: Any) -> tuple[bytes, str]:
    """Call the endpoint inline (``api.services.api.call``); return (response bytes, result id).

    The result id names the action object PySyft stored for this call (pass it back as
    ``done=`` on the next call, or delete it as an admin). Raises :class:`TransportError`.
    """
    try:
        result = client.api.services.api.call(path, **kwargs)
        data = result.syft_action_data
        result_id = str(result.id)
    except Exception as exc:
        if _timed_out(exc):
            raise CallTimeoutError(f"PySyft call to endpoint {path!r} timed out: {exc}") from exc
        raise TransportError(
            f"PySyft call to endpoint {path!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(data, str):
        raise TransportError(f"endpoint {path!r} failed on the datasite: {data}")
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1:
        data = data.tobytes()
    if not isinstance(data, bytes):
        raise TransportError(
            f"endpoint {path!r} returned {type(data).__name__}, expected bytes; is "
            "the syft-split endpoint installed at that path?"
        )
    return data, result_id


def _timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a socket/HTTP timeout."""
    import socket

    import requests  # type: ignore[import-untyped]

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (requests.exceptions.Timeout, socket.timeout, TimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _owner(admin_client: Any, op: str, path: str, **fields: Any) -> dict[str, Any]:
    raw, result_id = call_endpoint(admin_client, path, request=wire.encode(fields), owner=op)
    try:  # only an admin may delete (and only an admin's owner op succeeds anyway)
        if getattr(admin_client.user_role, "name", "") == "ADMIN":
            from syft.types.uid import UID

            admin_client.api.services.action.delete(UID(result_id))
    except Exception as exc:
        _log.debug("syft_split: could not delete result %s: %s", result_id, exc)
    response = wire.decode(raw)
    if "error" in response:
        raise error_from_wire(str(response["error"]), str(response.get("message", "")))
    return response


def _action_id(ref: Any, what: str) -> str:
    action_id = getattr(ref, "action_id", ref)
    if action_id is None:
        raise ConfigError(f"{what}: the asset has no action id; upload its dataset first")
    text = getattr(action_id, "no_dash", None) or str(action_id).replace("-", "")
    if len(text) != 32 or any(c not in "0123456789abcdef" for c in text.lower()):
        raise ConfigError(f"{what}: expected an uploaded sy.Asset or its action id, got {ref!r}")
    return text


def _dataset_ids(name: str, value: Any) -> dict[str, str | None]:
    if isinstance(value, Mapping):
        unknown = set(value) - {"features", "labels", "ids"}
        if "features" not in value or unknown:
            raise ConfigError(f"dataset {name!r}: expected keys 'features' and optional "
                              f"'labels', 'ids', got {sorted(value)}")
        features, labels = value["features"], value.get("labels")
        if value.get("ids") is not None:
            return {"features": _action_id(features, f"dataset {name!r} features"),
                    "labels": None if labels is None else
                    _action_id(labels, f"dataset {name!r} labels"),
                    "ids": _action_id(value["ids"], f"dataset {name!r} ids")}
    elif isinstance(value, tuple):
        if len(value) != 2:
            raise ConfigError(f"dataset {name!r}: expected (features, labels), got {value!r}")
        features, labels = value
    else:
        features, labels = value, None
    return {"features": _action_id(features, f"dataset {name!r} features"),
            "labels": None if labels is None else _action_id(labels, f"dataset {name!r} labels")}


def install(
    admin_client: Any,
    datasets: Mapping[str, Any],
    *,
    host_name: str | None = None,
    path: str = ENDPOINT_PATH,
    max_request_bytes: int = 64 * 1024 * 1024,
    max_batch: int = 4096,
    replace: bool = False,
    state_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    limits: HostLimits | None = None,
) -> dict[str, Any]:
    """Register the syft-split endpoint on the datasite ``admin_client`` administers.

    ``datasets`` maps a name the model owner will use to uploaded assets: an ``sy.Asset``
    (features only), a ``(features, labels)`` tuple, or ``{"features": a, "labels": b}``
    (assets or their action ids; ``"ids"``: record ids for PSI alignment). No datasets: a
    relay party that only runs middle segments. The host reads the private data once.

    ``state_dir``: a directory on the datasite's machine where the host keeps proposals,
    approvals, segment weights, optimizer and RNG state, step records and the audit log
    (:mod:`syft_split.host.store`), saved after every ``checkpoint_every``-th change of a
    segment (1: every step; nothing is lost in a crash) and on a clean shutdown. A restarted
    datasite (same database) then serves the approved segments again. Without it, the host's
    state lives in the datasite process's memory only.
    ``limits``: what this data owner accepts at all (:class:`~syft_split.host.HostLimits`:
    sizes, rates, the record cap, the HE floors...); given, it replaces ``max_request_bytes``
    and ``max_batch``.
    Returns the public metadata the model owner will see (``describe``).
    """
    import syft as sy

    settings = {
        "path": path,
        "instance": uuid.uuid4().hex,
        "host_name": host_name or str(admin_client.name),
        "datasets": {str(k): _dataset_ids(str(k), v) for k, v in datasets.items()},
        "max_request_bytes": int(max_request_bytes),
        "max_batch": int(max_batch),
        "limits": None if limits is None else asdict(limits),
        "state_dir": "" if state_dir is None else str(Path(state_dir).resolve()),
        "checkpoint_every": int(checkpoint_every),
    }
    try:
        existing = [e.path for e in admin_client.api.services.api.api_endpoints()]
        if path in existing:
            if not replace:
                raise ConfigError(f"an endpoint already exists at {path!r}; pass replace=True")
            uninstall(admin_client, path=path)
        endpoint = sy.api_endpoint(
            path=path, settings=settings,
            description="syft-split: split-learning segments approved by the data owner",
        )(syft_split_endpoint)
        if isinstance(endpoint, sy.SyftError):
            raise ConfigError(f"cannot build the endpoint: {endpoint.message}")
        admin_client.api.services.api.add(endpoint=endpoint)
    except SyftSplitError:
        raise
    except Exception as exc:
        raise TransportError(f"could not register endpoint {path!r}: {exc}") from exc
    return _owner(admin_client, "describe", path)


def uninstall(admin_client: Any, *, path: str = ENDPOINT_PATH) -> None:
    """Forget the host behind ``path`` (its segments and audit log; saved first to its state
    directory, if it has one) and delete the endpoint."""
    try:
        _owner(admin_client, "shutdown", path)
    except SyftSplitError as exc:
        _log.debug("syft_split: shutdown of %s failed: %s", path, exc)
    try:
        admin_client.api.services.api.delete(endpoint_path=path)
    except Exception as exc:
        raise TransportError(f"could not delete endpoint {path!r}: {exc}") from exc


def publish_dataset(
    admin_client: Any,
    name: str,
    features: torch.Tensor | torch.utils.data.Dataset,
    labels: torch.Tensor | None = None,
    *,
    mock_features: torch.Tensor | None = None,
    mock_labels: torch.Tensor | None = None,
    ids: list[str | int] | None = None,
    description: str = "",
) -> dict[str, Any]:
    """Upload ``features`` (and ``labels``) as an ordinary PySyft dataset with mock assets.

    Default mocks are random values of the same shape and dtype (features: standard normal;
    integer labels: uniform over the observed range). Returns ``{"features": asset,
    "labels": asset}`` ready for :func:`install` (and ``"ids"``: record ids, private, with
    a mock of placeholder ids). ``features`` may be a map-style ``torch.utils.data.Dataset``
    of ``(features, label)`` items (read once: :func:`syft_split.data.materialize`).
    """
    import syft as sy

    from .data import is_torch_dataset, materialize

    if is_torch_dataset(features):
        features, own_labels = materialize(features, name=f"dataset {name!r}")
        labels = own_labels if labels is None else labels
    assert isinstance(features, torch.Tensor)

    if mock_features is None:
        mock_features = (torch.randn(features.shape).to(features.dtype)
                         if features.is_floating_point() else torch.zeros_like(features))
    assets = [sy.Asset(name="features", data=features.detach().cpu().numpy(),
                       mock=mock_features.detach().cpu().numpy())]
    if labels is not None:
        if mock_labels is None:
            if labels.is_floating_point():
                mock_labels = torch.randn(labels.shape).to(labels.dtype)
            else:
                lo, hi = int(labels.min()), int(labels.max())
                mock_labels = torch.randint(lo, hi + 1, labels.shape, dtype=labels.dtype)
        assets.append(sy.Asset(name="labels", data=labels.detach().cpu().numpy(),
                               mock=mock_labels.detach().cpu().numpy()))
    if ids is not None:
        assets.append(sy.Asset(name="ids", data=np.asarray([str(i) for i in ids]),
                               mock=np.asarray([f"id-{k}" for k in range(len(ids))])))
    try:
        from .logs import quiet

        with quiet():  # PySyft's upload progress bar (SYFT_SPLIT_VERBOSE=1: shown)
            admin_client.upload_dataset(sy.Dataset(name=name, description=description,
                                                   asset_list=assets))
        uploaded = admin_client.datasets[name]
    except Exception as exc:
        raise TransportError(f"could not upload dataset {name!r}: {exc}") from exc
    return {a.name: a for a in uploaded.asset_list}


# ---------------------------------------------------------------- data-owner helpers
@dataclass(frozen=True)
class ProposalInfo:
    """A proposal as listed for the data owner (read :func:`review` before approving).
    ``driver`` is its user's e-mail as last seen (display); ``driver_id`` the principal the
    host checks (``syft-user:<PySyft user id>``), which no other account can take."""

    id: str
    driver: str
    role: str
    status: str
    datasets: list[str]
    input_shape: list[int]
    output_shape: list[int]
    max_batch: int
    driver_id: str = ""


class DatasiteConsole(ChannelConsole):
    """The data owner's console for the syft-split endpoint on its datasite (and its direct
    channels: :class:`~syft_split.host.channel.ChannelConsole`).

    ``DatasiteConsole(admin_client)`` is what :class:`syft_split.deploy.OwnerConsole` asks
    for. Every method is refused on the datasite (:class:`AuthorizationError`) unless the
    client is logged in as an admin; the role is checked there, not here.
    """

    def __init__(self, admin_client: Any, *, path: str = ENDPOINT_PATH) -> None:
        self.client = admin_client
        self.path = path

    def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        return _owner(self.client, op, self.path, **fields)

    def describe(self) -> dict[str, Any]:
        """The host name and the public metadata of its datasets."""
        return self._call("describe")

    def proposals(self, status: str | None = None) -> list[ProposalInfo]:
        """Proposals on this datasite (optionally only ``"pending"``/``"approved"``/...)."""
        fields = {} if status is None else {"status": status}
        names = self._call("users")["users"]
        return [ProposalInfo(**{**p, "driver": names.get(p["driver"], p["driver"]),
                                "driver_id": p["driver"]})
                for p in self._call("proposals", **fields)["proposals"]]

    def users(self) -> dict[str, str]:
        """Every user that called the endpoint: principal -> e-mail as last seen."""
        return dict(self._call("users")["users"])

    def forget_user(self, user: str) -> dict[str, Any]:
        """Halt every segment and pending proposal ``user`` drives and close its direct
        channels (``user``: a principal, or an e-mail only one known account had). Deleting
        its PySyft account alone revokes nothing here."""
        return dict(self._call("forget_user", user=user))

    def review(self, proposal_id: str) -> str:
        """What to read before approving: layers, parameters, what leaves per step."""
        return str(self._call("review", segment=proposal_id)["text"])

    def approve(self, proposal_id: str, **options: Any) -> None:
        """Approve once; from then on only the proposer may run the segment. ``options`` (JSON):
        the approval options the review mentions, e.g. ``channel=True`` (a direct data plane),
        ``leakage_bound={"relative": 0.5}`` (the live watch), ``release_weights=True``."""
        self._call("approve", segment=proposal_id, **options)

    def reject(self, proposal_id: str) -> None:
        """Reject a proposal (also stops an approved segment)."""
        self._call("reject", segment=proposal_id)

    def halt(self, proposal_id: str, reason: str = "halted by the data owner") -> None:
        """Stop an approved segment for good, at once: the model owner's op of it in progress
        is refused (nothing of its answer leaves) and every later one too; returns once the
        halt is saved and audited."""
        self._call("halt", segment=proposal_id, reason=reason)

    def watch(self, proposal_id: str) -> dict[str, Any]:
        """The live leakage watch of an approved input segment: ``bound``, ``history`` (the
        figures measured so far, by step), ``halted`` and ``reason``; ``{}``: no watch."""
        return self._call("watch", segment=proposal_id)

    def release_weights(self, proposal_id: str) -> None:
        """Let the proposer fetch the segment's trained weights (op ``export``)."""
        self._call("release_weights", segment=proposal_id)

    def export_weights(self, proposal_id: str) -> dict[str, torch.Tensor]:
        """The segment's current weights, for the data owner."""
        response = self._call("export_weights", segment=proposal_id)
        return {k[6:]: v for k, v in response.items() if k.startswith("state/")}

    def audit(self, since: int = 0) -> list[AuditEntry]:
        """The calls the host answered (model-owner and ``owner.*`` ops) from index ``since``
        on, fetched page by page; entries older than the host keeps in memory are in its
        state directory's ``audit*.jsonl`` only."""
        out: list[AuditEntry] = []
        while True:
            page = self._call("audit", since=since)
            out.extend(AuditEntry(**e) for e in page["entries"])
            since = int(page.get("next", since))
            if not page["entries"] or since >= int(page["total"]):
                return out

    def audit_log(self) -> list[dict[str, Any]]:
        """Every call answered so far, as plain dicts (like ``DataOwnerHost.audit_log``)."""
        return [asdict(e) for e in self.audit()]

    def public_key(self) -> bytes:
        """The host's public key for peer weight exchange."""
        return bytes(self._call("public_key")["key"])

    def trust_peer(self, name: str, public_key: bytes) -> None:
        """Pin a peer data owner's public key on this host."""
        self._call("trust_peer", name=name, key=public_key)

    def allow_alignment(self, dataset: str, user: str) -> None:
        """Let ``user`` align ``dataset``'s records by PSI (record ids never leave in clear)."""
        self._call("allow_alignment", dataset=dataset, user=user)

    def revoke_alignment(self, dataset: str, user: str) -> dict[str, Any]:
        """Withdraw ``user``'s permission to align ``dataset`` (``user``: an e-mail, or the
        principal it was allowed for); its PSI ops on it are refused from now on.
        ``aligned``: the aligned datasets it made from it, which stay (``drop_aligned``)."""
        return dict(self._call("revoke_alignment", dataset=dataset, user=user))

    def drop_aligned(self, dataset: str) -> None:
        """Delete an aligned dataset a user's PSI made here (its segments halt)."""
        self._call("drop_aligned", dataset=dataset)
