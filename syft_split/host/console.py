"""The data owner's console on its own host: the :class:`~syft_split.deployment.OwnerConsole`
methods of :class:`~syft_split.host.DataOwnerHost` (the in-process console).

Each is a thin call of a data-owner op through :meth:`DataOwnerHost.owner` (audited as
``owner.<op>``, saved at once with a state directory), or a read of the host's own state.
:class:`syft_split.datasite.DatasiteConsole` offers the same methods on a datasite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .records import AuditEntry, Dataset, Proposal, Runtime

__all__ = ["HostConsole"]


class HostConsole:
    """The console methods :class:`~syft_split.host.DataOwnerHost` inherits."""

    if TYPE_CHECKING:  # provided by DataOwnerHost
        datasets: dict[str, Dataset]
        proposals_by_id: dict[str, Proposal]
        audit: list[AuditEntry]

        def owner(self, op: str, **fields: Any) -> dict[str, Any]: ...
        def owned_runtime(self, proposal_id: str) -> Runtime: ...

    def add_dataset(self, name: str, features: torch.Tensor, labels: torch.Tensor | None = None,
                    *, ids: list[str | int] | None = None,
                    mock: torch.Tensor | None = None) -> None:
        """Hold ``features`` (and ``labels``, record ``ids``) under ``name``; they never leave
        this host. ``mock`` is public look-alike data (leakage measurement only)."""
        self.datasets[name] = Dataset(features, labels, ids, mock)

    def proposals(self, status: str | None = None) -> list[Proposal]:
        """Proposals on this host (optionally only ``"pending"``/``"approved"``/...)."""
        return [p for p in self.proposals_by_id.values() if status is None or p.status == status]

    def review(self, proposal_id: str) -> str:
        """What the data owner reads before approving: layers, parameters, what leaves."""
        return str(self.owner("review", segment=proposal_id)["text"])

    def approve(self, proposal_id: str, **options: Any) -> None:
        """Approve once: installs the segment's runtime; only the proposal's driver may use it."""
        self.owner("approve", segment=proposal_id, **options)

    def reject(self, proposal_id: str) -> None:
        """Reject a proposal (also stops an approved segment)."""
        self.owner("reject", segment=proposal_id)

    def release_weights(self, proposal_id: str) -> None:
        """Let the driver fetch this segment's weights (op ``export``) from now on."""
        self.owner("release_weights", segment=proposal_id)

    def export_weights(self, proposal_id: str) -> dict[str, torch.Tensor]:
        """The segment's current weights, for the data owner (never sent unless released)."""
        rt = self.owned_runtime(proposal_id)
        return {k: v.detach().clone() for k, v in rt.module.state_dict().items()}

    def optimizer_state(self, proposal_id: str) -> dict[str, Any]:
        opt = self.owned_runtime(proposal_id).optimizer
        return {} if opt is None else opt.state_dict()

    def audit_log(self) -> list[dict[str, Any]]:
        """The calls answered, newest last, as plain dicts (who, op, segment, shapes, bytes,
        time): those held in memory (:attr:`audit`; the whole log is on disk)."""
        return [dict(vars(e)) for e in self.audit]

    def public_key(self) -> bytes:
        """This host's public key for peer weight exchange (give it to trusted peers)."""
        return bytes(self.owner("public_key")["key"])

    def trust_peer(self, name: str, public_key: bytes) -> None:
        """Pin a peer data owner's public key: only pinned peers can send or receive weights."""
        self.owner("trust_peer", name=name, key=public_key)

    def allow_alignment(self, dataset: str, user: str) -> None:
        """Let ``user`` align ``dataset``'s records by PSI (record ids never leave in clear)."""
        self.owner("allow_alignment", dataset=dataset, user=user)

    def revoke_alignment(self, dataset: str, user: str) -> dict[str, Any]:
        """Withdraw ``user``'s permission to align ``dataset`` (its PSI ops on it are refused
        from now on); ``aligned``: the aligned datasets it made from it, which stay."""
        return dict(self.owner("revoke_alignment", dataset=dataset, user=user))

    def drop_aligned(self, dataset: str) -> None:
        """Delete an aligned dataset a user's PSI made here (its segments halt)."""
        self.owner("drop_aligned", dataset=dataset)
