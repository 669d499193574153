"""The data owner's host: proposals, one-time approval, segment runtimes, one guard, audit.

:class:`DataOwnerHost` (in :mod:`.core`) dispatches each model-owner op to the op family that
declares it; importing this package registers the built-in families (proposals and review,
segment steps, weights, leakage, federated training). Alignment (:mod:`syft_split.alignment`)
and encryption (:mod:`syft_split.he_host`) register themselves from their own modules when ``syft_split`` is
imported.
"""

from __future__ import annotations

from . import (  # noqa: F401  (register the families)
    channel,
    federated,
    latency,
    proposals,
    segments,
    users,
    watch,
    weights,
)
from .core import DataOwnerHost
from .dispatch import OpFamily, op, owner_op, register_family
from .guard import Call, Guard
from .records import AuditEntry, Dataset, HostLimits, Proposal, Runtime

__all__ = [
    "AuditEntry",
    "Call",
    "DataOwnerHost",
    "Dataset",
    "Guard",
    "HostLimits",
    "OpFamily",
    "Proposal",
    "Runtime",
    "op",
    "owner_op",
    "register_family",
]
