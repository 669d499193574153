"""CKKS-encrypted first server layer for split-learning training (the only tenseal user).

Public API: parameters (:class:`CKKSParams`), the agreement (:class:`LayerSpec`), keys
(:class:`KeyOwner`, :class:`ServerContext`), the two parties (:class:`HEClient`,
:class:`HEServer`), layouts (:func:`choose_layout`, :class:`Layout`), convolutions
(:class:`ConvAsLinear`), the validator (:func:`explain_unprotectable`), cost meters and
the traffic of an agreement (:func:`estimate_step_bytes`).
See ``he_layers/README.md`` for the protocol and what each party learns.
"""

from ._protocol import combine_shares
from .client import HEClient
from .conv import ConvAsLinear
from .costs import CostMeter, merge_costs
from .keys import KeyOwner, ServerContext
from .packing import Layout, choose_layout
from .params import CKKSParams
from .review import estimate_step_bytes
from .server import HEServer
from .spec import LayerSpec
from .validate import explain_unprotectable

__all__ = [
    "CKKSParams",
    "ConvAsLinear",
    "CostMeter",
    "HEClient",
    "HEServer",
    "KeyOwner",
    "LayerSpec",
    "Layout",
    "ServerContext",
    "choose_layout",
    "combine_shares",
    "estimate_step_bytes",
    "explain_unprotectable",
    "merge_costs",
]
