"""One configuration model: who holds which segment, the data, and the labels.

A :class:`SplitPlan` is an ordered list of segments, each owned by :data:`DATA_OWNER` (every
data owner runs its own copy, on its own records) or :data:`MODEL_OWNER`, plus where the labels
live. :meth:`SplitPlan.validate` raises one :class:`~syft_split.errors.ConfigError` listing every
problem, before anything is sent anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from .errors import ConfigError
from .host import LOSSES
from .spec import module_to_spec
from .transport.base import MODEL_OWNER

__all__ = ["DATA_OWNER", "MODEL_OWNER", "SplitPlan"]

#: owner placeholder: "the data owner whose records this step uses".
DATA_OWNER = "data_owner"


@dataclass
class SplitPlan:
    """Segments in forward order, their owners, the data owners and where labels are.

    An owner is :data:`DATA_OWNER` (each data owner runs its own copy), :data:`MODEL_OWNER`,
    or the name of a relay party that runs that segment for everyone (multi-hop).

    ``labels`` is :data:`MODEL_OWNER` (the model owner passes label tensors to the trainer),
    or :data:`DATA_OWNER`: then either the last segment is the data owner's (U-shaped: labels
    and outputs never leave) or ``release_labels=True`` (the data owner sends each batch's
    labels with its activations, as in the original SplitNN).
    """

    segments: list[nn.Module]
    owners: list[str]
    data_owners: list[str]
    labels: str = MODEL_OWNER
    loss: str = "cross_entropy"
    release_labels: bool = False
    datasets: list[str] = field(default_factory=lambda: ["train", "test"])
    max_batch: int = 1024

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def vanilla(cls, segments: Sequence[nn.Module], data_owners: str | Sequence[str], *,
                labels: str = MODEL_OWNER, **kwargs: object) -> SplitPlan:
        """Data owners run the first segment; the model owner runs the rest (and the loss)."""
        owners = [DATA_OWNER] + [MODEL_OWNER] * (len(segments) - 1)
        return cls(list(segments), owners, _names(data_owners), labels=labels,
                   release_labels=labels == DATA_OWNER, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def u_shaped(cls, segments: Sequence[nn.Module], data_owners: str | Sequence[str],
                 **kwargs: object) -> SplitPlan:
        """Data owners run the first and last segments and hold the labels; the model owner
        runs the middle and never sees labels or outputs."""
        owners = [DATA_OWNER] + [MODEL_OWNER] * (len(segments) - 2) + [DATA_OWNER]
        return cls(list(segments), owners, _names(data_owners), labels=DATA_OWNER,
                   **kwargs)  # type: ignore[arg-type]

    @classmethod
    def multi_hop(cls, segments: Sequence[nn.Module], data_owners: str | Sequence[str],
                  hops: Sequence[str], **kwargs: object) -> SplitPlan:
        """Data owners run segment 0; relay party ``hops[k]`` runs segment ``k + 1``; the model
        owner runs the rest. Activations relay through the parties in order, gradients back."""
        rest = len(segments) - 1 - len(hops)
        owners = [DATA_OWNER, *hops] + [MODEL_OWNER] * rest
        return cls(list(segments), owners, _names(data_owners), **kwargs)  # type: ignore[arg-type]

    @property
    def relays(self) -> list[str]:
        """Named parties that run a segment for every data owner."""
        return [o for o in dict.fromkeys(self.owners) if o not in (DATA_OWNER, MODEL_OWNER)]

    @property
    def label_location(self) -> str:
        """``"model_owner"``, ``"released"`` (sent by the data owner) or ``"data_owner"``."""
        if self.labels == MODEL_OWNER:
            return MODEL_OWNER
        return "released" if self.release_labels else DATA_OWNER

    def validate(self) -> None:
        problems: list[str] = []
        if len(self.segments) < 2:
            problems.append(f"a split needs at least 2 segments, got {len(self.segments)}")
        if len(self.owners) != len(self.segments):
            problems.append(f"{len(self.segments)} segments but {len(self.owners)} owners")
        bad = [o for o in self.owners if not isinstance(o, str) or not o]
        if bad:
            problems.append(f"owners must be {DATA_OWNER!r}, {MODEL_OWNER!r} or a party name, "
                            f"got {bad}")
        both = set(self.relays) & set(self.data_owners)
        if both:
            problems.append(f"{sorted(both)} cannot be both a data owner and a relay party")
        if self.owners and self.owners[-1] in self.relays:
            problems.append("the last segment cannot be a relay party's (it would need the labels)")
        if self.owners and self.owners[0] != DATA_OWNER:
            problems.append("the first segment must be a data owner's (it reads the data)")
        if MODEL_OWNER not in self.owners:
            problems.append("the model owner must hold at least one segment")
        if not self.data_owners or len(set(self.data_owners)) != len(self.data_owners):
            problems.append(f"data_owners must be distinct names, got {self.data_owners}")
        if MODEL_OWNER in self.data_owners or DATA_OWNER in self.data_owners:
            problems.append(f"{MODEL_OWNER!r}/{DATA_OWNER!r} are reserved party names")
        if self.labels not in (MODEL_OWNER, DATA_OWNER):
            problems.append(f"labels must be at {MODEL_OWNER!r} or {DATA_OWNER!r}, "
                            f"got {self.labels!r}")
        last_at_do = bool(self.owners) and self.owners[-1] == DATA_OWNER
        if last_at_do and self.labels != DATA_OWNER:
            problems.append("the last segment is the data owner's, so the labels must be too")
        if self.labels == DATA_OWNER and not last_at_do and not self.release_labels:
            problems.append("labels at the data owner need a U-shaped plan (last segment at the "
                            "data owner) or release_labels=True")
        if last_at_do and self.release_labels:
            problems.append("release_labels makes no sense in a U-shaped plan")
        if self.loss not in LOSSES:
            problems.append(f"loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        if not 0 < self.max_batch:
            problems.append(f"max_batch must be positive, got {self.max_batch}")
        for i, (seg, owner) in enumerate(zip(self.segments, self.owners)):
            if owner != MODEL_OWNER:
                try:
                    module_to_spec(seg)
                except ConfigError as exc:
                    problems.append(f"segment {i} cannot be placed on {owner}: {exc}")
        if problems:
            raise ConfigError("invalid split plan:\n  - " + "\n  - ".join(problems))


def _names(data_owners: str | Sequence[str]) -> list[str]:
    return [data_owners] if isinstance(data_owners, str) else list(data_owners)
