"""A second core: a worker process computes part of every product (real CKKS, real process)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from he_layers import LayerSpec
from he_layers._seal_io import to_bytes
from he_layers.workers import parallel_matmul, pool

pytestmark = pytest.mark.he

SHAPE = (32, 128, 64)  # the digits CNN's encrypted fc1 at batch 32


def test_the_agreement_splits_the_products_into_chunks() -> None:
    from he_layers import CKKSParams

    one = LayerSpec(*SHAPE).layouts(CKKSParams())
    two = LayerSpec(*SHAPE, workers=2).layouts(CKKSParams())
    assert all(layout.out_chunks == 1 for layout in one.values())
    assert all(layout.out_chunks >= 2 for layout in two.values())
    assert two["forward"].chunk_owner(0, 2) == 0 and two["forward"].chunk_owner(1, 2) == 1
    with pytest.raises(Exception, match="workers"):
        LayerSpec(*SHAPE, workers=0).validate(CKKSParams())


@pytest.mark.parametrize("level", ["A", "B"])
def test_a_step_over_two_processes_equals_autograd(level: str, kit: SimpleNamespace) -> None:
    client, server, linear = kit.make_parties(*SHAPE, level=level, lr=0.1, workers=2)
    assert all(layout.out_chunks >= 2 for layout in server.context.layouts.values())
    kit.check_step(client, server, linear, level)
    assert any(w.proc.poll() is None for w in pool()._workers)


def _inputs(kit: SimpleNamespace) -> tuple[object, list[object], list[bytes], object]:
    client, server, _ = kit.make_parties(*SHAPE, workers=2)
    ctx = server.context
    layout = ctx.layouts["forward"]
    x = np.random.default_rng(0).standard_normal((SHAPE[0], SHAPE[1]))
    blobs = client.keys.encrypt_matrix(x, layout)
    return ctx, ctx.load_inputs(blobs, layout, "test"), blobs, layout


def test_the_worker_returns_the_very_ciphertexts_of_a_serial_product(
        kit: SimpleNamespace) -> None:
    ctx, cts, blobs, layout = _inputs(kit)
    p = np.random.default_rng(1).standard_normal((SHAPE[1], SHAPE[2])) * 0.1
    serial = ctx.evaluator.matmul(cts, p, layout)
    before = ctx.evaluator.counts["rotations"]
    parallel = parallel_matmul(ctx, cts, blobs, p, layout, rescale=True, workers=2)
    assert [to_bytes(c) for c in parallel] == [to_bytes(c) for c in serial]
    # the worker's rotations are counted: each process rotates the input (baby steps)
    baby = layout.baby - 1
    assert ctx.evaluator.counts["rotations"] - before == layout.keyswitches() + baby


def test_a_failing_worker_is_dropped_and_its_chunks_computed_here(
        kit: SimpleNamespace) -> None:
    ctx, cts, blobs, layout = _inputs(kit)
    p = np.random.default_rng(2).standard_normal((SHAPE[1], SHAPE[2])) * 0.1
    serial = [to_bytes(c) for c in ctx.evaluator.matmul(cts, p, layout)]
    the_pool = pool()
    the_pool.close()
    [worker] = the_pool.workers(1)
    worker.hold(ctx.context_id)  # the model owner wrongly believes it has the keys
    failures = the_pool.failures
    got = parallel_matmul(ctx, cts, blobs, p, layout, rescale=True, workers=2)
    assert [to_bytes(c) for c in got] == serial
    assert the_pool.failures == failures + 1 and worker.proc.poll() is not None
    # a killed worker is replaced by a new process at the next product
    again = parallel_matmul(ctx, cts, blobs, p, layout, rescale=True, workers=2)
    [fresh] = the_pool.workers(1)
    assert fresh is not worker and ctx.context_id in fresh.contexts
    fresh.proc.kill()
    fresh.proc.wait()
    third = parallel_matmul(ctx, cts, blobs, p, layout, rescale=True, workers=2)
    assert [to_bytes(c) for c in again] == [to_bytes(c) for c in third] == serial
    assert the_pool.workers(1)[0] is not fresh


def test_the_worker_forgets_old_contexts_as_the_model_owner_expects(
        kit: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    import he_layers.workers as workers

    monkeypatch.setattr(workers, "MAX_CONTEXTS", 1)
    pool().close()
    runs = [_inputs(kit) for _ in range(2)]
    p = np.random.default_rng(3).standard_normal((SHAPE[1], SHAPE[2])) * 0.1
    failures = pool().failures
    for ctx, cts, blobs, layout in [*runs, *runs]:  # each run evicts the other's context
        got = parallel_matmul(ctx, cts, blobs, p, layout, rescale=True, workers=2)
        serial = ctx.evaluator.matmul(cts, p, layout)
        assert [to_bytes(c) for c in got] == [to_bytes(c) for c in serial]
        assert pool().workers(1)[0].contexts == [ctx.context_id]
    assert pool().failures == failures
    # the worker dropped the other context too: a product it was not sent fails there
    worker = pool().workers(1)[0]
    other = runs[0] if ctx is runs[1][0] else runs[1]
    worker.hold(other[0].context_id)
    parallel_matmul(*other[:3], p, other[3], rescale=True, workers=2)
    assert pool().failures == failures + 1


def test_an_error_here_leaves_no_stale_reply_behind(kit: SimpleNamespace) -> None:
    """The model owner's own chunks fail (a matrix of the wrong shape): the worker that was
    already sent the product is dropped, so its reply cannot answer the next product."""
    ctx, cts, blobs, layout = _inputs(kit)
    p = np.random.default_rng(4).standard_normal((SHAPE[1], SHAPE[2])) * 0.1
    parallel_matmul(ctx, cts, blobs, p, layout, rescale=True, workers=2)
    [worker] = pool().workers(1)
    with pytest.raises(Exception, match="plain matrix"):
        parallel_matmul(ctx, cts, blobs, p[:-1], layout, rescale=True, workers=2)
    assert worker.proc.poll() is not None
    got = parallel_matmul(ctx, cts, blobs, p, layout, rescale=True, workers=2)
    assert [to_bytes(c) for c in got] == [to_bytes(c) for c in ctx.evaluator.matmul(cts, p, layout)]


def test_no_worker_can_start_so_one_core_computes_it(kit: SimpleNamespace,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    ctx, cts, blobs, layout = _inputs(kit)
    p = np.random.default_rng(5).standard_normal((SHAPE[1], SHAPE[2])) * 0.1
    pool().close()
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    failures = pool().failures
    got = parallel_matmul(ctx, cts, blobs, p, layout, rescale=True, workers=2)
    assert [to_bytes(c) for c in got] == [to_bytes(c) for c in ctx.evaluator.matmul(cts, p, layout)]
    assert pool().failures == failures + 1 and pool()._workers == []
