"""The two-role tutorials run together against one HTTP datasite on loopback.

The data owner's notebook (07) launches the datasite, uploads its data with ``sy.Dataset`` /
``sy.Asset``, installs the plugin, checks the contract and registers the model owner; the
model owner's notebook (08) connects by URL, checks the contract, proposes; the data owner
reviews and approves from its own client; the model owner trains, evaluates, exports and
plots; the data owner reads the audit and the leakage watch, then lands the datasite. Each
notebook runs in its own kernel, interleaved at the cells tagged ``sync:*``. The executed
copies go to ``runs/notebooks/`` for the docs site.
"""

from __future__ import annotations

import os
import re

import pytest

from syft_split.transport.pysyft import free_port

from ..notebook_runner import runner

pytestmark = [pytest.mark.pysyft, pytest.mark.slow]


def _text(nb, tag_or_index) -> str:
    cells = nb.cells if isinstance(tag_or_index, str) else [nb.cells[tag_or_index]]
    out = []
    for cell in cells:
        if isinstance(tag_or_index, str) and tag_or_index not in cell.metadata.get("tags", []):
            continue
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def test_data_owner_and_model_owner_notebooks_together() -> None:
    nbr = runner()
    os.environ.setdefault("TQDM_DISABLE", "1")
    owner_params, model_params = nbr.two_role_parameters(free_port())
    owner_nb, model_nb = nbr.run_two_roles(owner_params, model_params)
    nbr.write(owner_nb, nbr.DATA_OWNER)
    nbr.write(model_nb, nbr.MODEL_OWNER)

    problems = nbr.plot_problems(owner_nb, nbr.DATA_OWNER) + nbr.plot_problems(model_nb,
                                                                             nbr.MODEL_OWNER)
    assert problems == []
    model_text = "\n".join(_text(model_nb, i) for i in range(len(model_nb.cells)))
    owner_text = "\n".join(_text(owner_nb, i) for i in range(len(owner_nb.cells)))
    # the model owner trained through the datasite and exported the released model
    accuracy = float(re.search(r"test accuracy on the hospital's test split: ([0-9.]+)",
                               model_text).group(1))
    assert accuracy > model_params["MIN_ACCURACY"]
    assert "exported model on the 200 public mock digits" in model_text
    # the data owner reviewed, approved for that user only, and saw the training in its audit
    assert "ALSO RELEASES LABELS" in owner_text and "leakage measured here" in owner_text
    assert "'model-owner@example.org', 'approved'" in owner_text
    assert "halted: False" in owner_text
    assert "this datasite fits the plan" in owner_text
