import tracemalloc
import warnings

import numpy as np
import pytest

import crdt
import training
from training import _outer


def test_outer_update_is_nesterov_in_place() -> None:
    rng = np.random.default_rng(0)
    delta, momentum = rng.normal(size=100).astype(np.float32), rng.normal(size=100).astype(np.float32)
    want_m = 0.9 * momentum + delta
    want = -(0.7 / 2) * (delta + 0.9 * want_m)
    out = training.outer_update(delta, momentum, outer_lr=0.7, outer_momentum=0.9, expected_peers=2)
    assert out is delta  # computed in the caller's buffer
    np.testing.assert_allclose(momentum, want_m, rtol=1e-6)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-7)
    plain = np.ones(4, dtype=np.float32)
    np.testing.assert_array_equal(
        training.outer_update(plain, None, outer_lr=0.5, outer_momentum=0.0, expected_peers=1), -0.5
    )


@pytest.mark.parametrize("codec", ["sparse-q8", "sparse-f32", "dct-q8"])
def test_chunked_topk_keeps_exactly_k_and_each_chunk_its_share(
    codec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(1)
    u = rng.normal(size=1000).astype(np.float32)
    u[:256] *= 100  # the first chunk dominates: a global top-k would take all k from it
    whole = training.compress(u, codec=codec, density=0.1)
    monkeypatch.setattr(_outer, "TOPK_CHUNK", 256)
    chunked = training.compress(u, codec=codec, density=0.1)
    assert len(chunked.kept) == len(whole.kept) == 100
    # shares k*b//n - k*a//n: proportional to the chunk's length (the last has 232 entries)
    assert np.bincount(chunked.kept // 256, minlength=4).tolist() == [25, 26, 25, 24]
    idx, vals = crdt.decode_payload(codec, u.size, chunked.payload)  # receivers decode it as ever
    np.testing.assert_array_equal(idx, chunked.indices)
    np.testing.assert_array_equal(vals, chunked.values)
    if codec != "dct-q8":  # sparse codecs: the kept entries are the largest of their chunk
        last = np.sort(np.abs(u[768:]))[::-1]
        assert np.abs(u[chunked.kept[chunked.kept >= 768]]).min() == last[23]


def test_one_chunk_is_the_global_topk() -> None:
    u = np.random.default_rng(2).normal(size=5000).astype(np.float32)
    kept = training.compress(u, codec="sparse-f32", density=0.02).kept
    np.testing.assert_array_equal(kept, np.sort(np.argsort(-np.abs(u))[:100]))


def test_round_allocates_one_work_vector_and_reads_params_without_copying(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """numpy allocations during a round (tracemalloc sees them): the D-sized work vector plus one
    chunk's top-k temporaries; the old code peaked at 28 bytes per parameter. Evaluating from a
    read-only buffer (shared memory) copies nothing and warns nothing."""
    monkeypatch.setattr(_outer, "TOPK_CHUNK", 1 << 14)
    task = training.load_task("digits", hidden=512)  # D = 301,066
    cfg = training.DilocoConfig(inner_steps=2, device="cpu", codec="sparse-q8", topk_density=0.02)
    peer = training.PeerTrainer(task, cfg)
    theta = training.flatten_params(task.build_model())
    theta.flags.writeable = False
    peer.run_round(theta, fragment=0)  # AdamW's moments are torch's, allocated in the first round
    tracemalloc.start()
    try:
        peer.run_round(theta, fragment=0)
        round_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            peer.evaluate(theta)
        eval_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert round_peak / peer.dim < 6.0, round_peak / peer.dim  # measured 5.65
    assert eval_peak / peer.dim < 0.5, eval_peak / peer.dim


def test_chunk_bits_follow_the_density() -> None:
    assert [_outer.chunk_bits_for(d) for d in (0.5, 1 / 64, 0.01, 1 / 1000, 1e-9)] == [6, 6, 7, 10, 16]


@pytest.mark.parametrize(("density", "bits", "k"), [(1 / 64, 6, 1), (0.05, 6, 3), (0.004, 8, 1)])
def test_chunked_codec_keeps_the_top_k_of_every_chunk(
    density: float, bits: int, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """k = round(density x chunk) of every 2**bits entries, the largest of each; the last, partial chunk
    keeps min(k, its length); the top-k pass size (TOPK_CHUNK) changes nothing."""
    rng = np.random.default_rng(3)
    u = rng.normal(size=5000).astype(np.float32)
    c = training.compress(u, codec="chunked-q2", density=density)
    size = 1 << bits
    chunks = -(-u.size // size)
    assert len(c.kept) == (chunks - 1) * k + min(k, u.size - (chunks - 1) * size)
    for start in range(0, u.size, size):
        mine = c.kept[(c.kept >= start) & (c.kept < start + size)]
        want = np.sort(np.argsort(-np.abs(u[start : start + size]))[:k] + start)
        np.testing.assert_array_equal(mine, want)
    np.testing.assert_array_equal(c.indices, c.kept)
    idx, vals = crdt.decode_payload("chunked-q2", u.size, c.payload)
    np.testing.assert_array_equal(idx, c.kept)
    np.testing.assert_array_equal(vals, c.values)
    monkeypatch.setattr(_outer, "TOPK_CHUNK", 1024)
    assert training.compress(u, codec="chunked-q2", density=density).payload == c.payload


def test_chunked_codec_of_an_empty_fragment() -> None:
    c = training.compress(np.zeros(0, np.float32), codec="chunked-q2", density=0.1)
    assert len(c.kept) == 0 and crdt.decode_payload("chunked-q2", 0, c.payload)[0].size == 0
