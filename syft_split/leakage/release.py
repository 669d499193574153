"""What leaves a data owner per record, so leakage is measured on the released values.

The host's defences (``defences`` of a proposal) shape what leaves: Gaussian noise on the
activations (``noise_sigma``) and, when labels are released, randomized response
(``label_epsilon`` over ``num_classes``). :class:`Release` mirrors them for the attacks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..defences import gaussian_noise, keep_probability, randomized_response
from ..errors import ConfigError

__all__ = ["Release"]


@dataclass(frozen=True)
class Release:
    """The release transform: what the model owner receives for one record.

    Attributes:
        noise_sigma: std of the Gaussian noise added to each activation before it leaves
            (``0``: activations leave exactly).
        labels: whether the batch's labels leave with the activations.
        label_epsilon: randomized-response ε for released labels (``0``: exact labels).
        num_classes: ``K`` for randomized response (needed when ``label_epsilon > 0``).
    """

    noise_sigma: float = 0.0
    labels: bool = False
    label_epsilon: float = 0.0
    num_classes: int | None = None

    def __post_init__(self) -> None:
        for name in ("noise_sigma", "label_epsilon"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"Expected argument `{name}` to be a finite float >= 0 but got {v!r}")
        if not isinstance(self.labels, bool):
            raise ConfigError(f"Expected argument `labels` to be a bool but got {self.labels!r}")
        if self.label_epsilon > 0 and (isinstance(self.num_classes, bool) or not isinstance(
                self.num_classes, int) or self.num_classes < 2):
            raise ConfigError(f"Expected argument `num_classes` to be an int >= 2 with label_epsilon > 0 "
                              f"but got {self.num_classes!r}")

    @classmethod
    def from_defences(cls, defences: Mapping[str, float], *, release_labels: bool = False) -> Release:
        """The release a proposal's ``defences`` dict and ``release_labels`` flag configure
        (keys ``noise_sigma``, ``label_epsilon``, ``num_classes``; others are ignored)."""
        k = defences.get("num_classes")
        return cls(noise_sigma=float(defences.get("noise_sigma", 0.0)), labels=bool(release_labels),
                   label_epsilon=float(defences.get("label_epsilon", 0.0)) if release_labels else 0.0,
                   num_classes=None if k is None else int(k))

    def activations(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``z`` as it leaves: ``z + N(0, noise_sigma²)`` (``z`` itself when no noise)."""
        return gaussian_noise(z, self.noise_sigma, generator) if self.noise_sigma > 0 else z

    def released_labels(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``y`` as it leaves (randomized response when ``label_epsilon > 0``)."""
        if self.label_epsilon > 0:
            assert self.num_classes is not None
            return randomized_response(y, self.num_classes, self.label_epsilon, generator)
        return y.clone()

    def label_keep_probability(self) -> float:
        """Probability that a released label is the true one (1 without randomized response)."""
        if self.label_epsilon > 0:
            assert self.num_classes is not None
            return keep_probability(self.num_classes, self.label_epsilon)
        return 1.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-able description (for the run report: which defences were on)."""
        return asdict(self)
