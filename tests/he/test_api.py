"""The public surface is pinned, and syft_split never imports he_layers/tenseal on import."""

from __future__ import annotations

import subprocess
import sys

import pytest

import he_layers

pytestmark = pytest.mark.he


def test_all_is_the_public_surface() -> None:
    public = {n for n in dir(he_layers) if not n.startswith("_")}
    modules = {"client", "conv", "costs", "evaluator", "keys", "packing", "params", "review",
               "server", "spec", "validate", "wire", "workers"}
    assert set(he_layers.__all__) == public - modules


def test_import_syft_split_does_not_load_tenseal_or_he_layers() -> None:
    code = (
        "import sys, syft_split, syft_split.errors; "
        "bad = [m for m in ('he_layers', 'tenseal') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("level", ["A", "B"])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv2d"])
def test_estimate_step_bytes_matches_the_messages(level: str, conv: bool) -> None:
    """The review's per-step traffic is within 5% of the bytes that actually leave."""
    import torch

    from he_layers import ConvAsLinear, HEClient, HEServer, KeyOwner, ServerContext
    from he_layers.review import spec_from_agreement

    if conv:
        layer = torch.nn.Conv2d(4, 6, 3, padding=1)
        geo = ConvAsLinear.from_module(layer)
        agreement = {"batch_size": 8, "d_in": 4 * 36, "d_out": 6 * 36, "level": level,
                     "lr": 0.1, "bias": True, "options": {"conv": geo.to_dict((6, 6))}}
    else:
        layer = torch.nn.Linear(128, 64)
        agreement = {"batch_size": 32, "d_in": 128, "d_out": 64, "level": level, "lr": 0.1,
                     "bias": True}
    est = he_layers.estimate_step_bytes(agreement)
    spec, params = spec_from_agreement(agreement)
    owner = KeyOwner(spec, params)
    client = HEClient(owner)
    server = HEServer.from_linear(ServerContext.from_bytes(owner.public_context_bytes()), layer)
    x = torch.rand(spec.batch_size, spec.d_in)
    z = server.receive_output(client.decrypt_output(server.forward(client.encrypt_input(x))))
    client.decrypt_gradients(server.backward(torch.ones_like(z)))
    sent, got = client.costs.total["bytes_sent"], client.costs.total["bytes_received"]
    assert abs(est["bytes_up"] - sent) / sent < 0.05
    assert abs(est["bytes_down"] - got) / got < 0.05
    assert est["ciphertexts_up"] == client.costs.total["ciphertexts_sent"]
    ctx = len(owner.public_context_bytes())
    assert abs(est["public_context_bytes"] - ctx) / ctx < 0.1
    assert est["bytes_up"] > 10 * est["plain_split_bytes_up"]
