"""The trained model in one piece: the model owner's segments plus the segments a data owner
released (``approve(pid, release_weights=True)`` or ``release_weights(pid)``)."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

from torch import nn

from .errors import ConfigError
from .spec import load_spec_state
from .topology import MODEL_OWNER

__all__ = ["export_model"]


def export_model(session: Any, source: str | None = None) -> nn.Sequential:
    """The trained model of ``session`` (a :class:`~syft_split.session.SplitSession`) in one
    ``nn.Sequential``: the model owner's segments and the segments ``source`` (a data owner;
    default: the only one) runs, fetched with op ``export``. Each data owner must have
    released its weights first (weights reveal training data), else
    :class:`~syft_split.errors.AccessError`.

    Chain plans only (vanilla, U-shaped, multi-hop); vertical, multi-task and HE-protected
    plans raise :class:`ConfigError` (their parts do not compose into one chain, or a weight
    is shared under encryption).
    """
    plan = session.plan
    if (plan.encrypted is not None or len(plan.tasks) != 1 or plan.is_vertical
            or any(n.inputs != ((i - 1,) if i else ()) for i, n in enumerate(plan.nodes))):
        raise ConfigError("export_model supports chain plans (vanilla, U-shaped, multi-hop); "
                          "this plan is vertical, multi-task or HE-protected: fetch each "
                          "released segment with session.remote[(party, i)].export()")
    if source is None:
        if len(plan.sources) != 1:
            raise ConfigError(f"each data owner trains its own copy of the input segment: "
                              f"pass source= one of {plan.sources}")
        source = plan.sources[0]
    if source not in plan.sources:
        raise ConfigError(f"source must be one of {plan.sources}, got {source!r}")
    parts: dict[str, nn.Module] = {}
    for i, node in enumerate(plan.nodes):
        module = copy.deepcopy(node.module)
        if node.owner != MODEL_OWNER:
            load_spec_state(module, session._seg(source, i).export())
        parts[node.name or f"seg{i}"] = module
    return nn.Sequential(OrderedDict(parts))
