"""syft-split: split learning (SplitNN) on PySyft datasites.

Importing this package never imports ``syft`` or ``tenseal``: the PySyft transport
(:class:`PySyftTransport`) and the HE layers load on first use.
"""

from __future__ import annotations

from typing import Any

from . import alignment as _alignment  # noqa: F401  (registers the alignment op family)
from . import he_host as _he_host  # noqa: F401  (registers the encryption op family)
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .host import DataOwnerHost, Dataset, HostLimits
from .remote import ActivationPointer, RemoteSegment
from .report import RunReport
from .session import SplitSession, StepMetrics
from .spec import OptimizerSpec
from .split import compose, cut_points, split_model
from .topology import DATA_OWNER, MODEL_OWNER, SplitPlan
from .trainer import Trainer
from .transport.base import TrafficLog, Transport
from .transport.inprocess import InProcessTransport

__version__ = "0.1.0"

__all__ = [
    "ActivationPointer",
    "DATA_OWNER",
    "DataOwnerHost",
    "Dataset",
    "HostLimits",
    "InProcessTransport",
    "MODEL_OWNER",
    "OptimizerSpec",
    "PySyftTransport",  # noqa: F405 - lazy, see __getattr__
    "RemoteSegment",
    "RunReport",
    "SplitPlan",
    "SplitSession",
    "StepMetrics",
    "TrafficLog",
    "Trainer",
    "Transport",
    "compose",
    "cut_points",
    "split_model",
    *_errors_all,
]

_LAZY = {"PySyftTransport": ("syft_split.transport.pysyft", "PySyftTransport")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'syft_split' has no attribute {name!r}")
