import io
import itertools
import pickle

import numpy as np
import pytest
import torch

import crdt
import training
from training._digits import DigitsTask


def _apply(
    theta: np.ndarray, results: list[training.RoundResult], ranges: tuple[tuple[int, int], ...]
) -> np.ndarray:
    """What the daemon does via the CRDT: θ[start:stop][indices] += weight * values, per contribution."""
    theta = theta.copy()
    for r in results:
        start, stop = ranges[r.fragment]
        idx, vals = crdt.decode_payload(r.codec, stop - start, r.payload)
        theta[start + idx.astype(np.int64)] += r.weight * vals
    return theta


def _cfg(**kw: object) -> training.DilocoConfig:
    base: dict[str, object] = {"inner_steps": 10, "inner_lr": 3e-3, "batch_size": 32, "device": "cpu"}
    return training.DilocoConfig(**(base | kw))  # type: ignore[arg-type]


def _peers(task: training.Task, cfg: training.DilocoConfig, n: int) -> list[training.PeerTrainer]:
    return [training.PeerTrainer(task, cfg, shard=i, num_shards=n) for i in range(n)]


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("field", "value"),
    [("inner_steps", 0), ("inner_lr", -1.0), ("outer_momentum", 1.0), ("codec", "gzip"),
     ("topk_density", 0.0), ("num_fragments", 0), ("expected_peers", 0), ("device", "tpu"),
     ("torch_threads", 0), ("grad_clip", -1.0)],
)
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(training.ConfigError, match=rf"diloco\.{field} "):
        training.DilocoConfig(**{field: value})  # type: ignore[arg-type]


def test_config_from_dict() -> None:
    assert training.DilocoConfig.from_dict({"inner_steps": 7}).inner_steps == 7
    with pytest.raises(training.ConfigError, match="inner_stpes"):
        training.DilocoConfig.from_dict({"inner_stpes": 7})


# -------------------------------------------------------------------------------------------- training


def test_digits_two_peers_learn(digits: training.Task) -> None:
    """2 peers, dense sync: well above chance (10%) within a few rounds, and the loss goes down."""
    peers = _peers(digits, _cfg(inner_steps=20, codec="dense-f32", expected_peers=2), 2)
    theta = training.flatten_params(digits.build_model())
    ranges = peers[0].fragments
    before = peers[0].evaluate(theta)
    losses = []
    for _ in range(4):
        results = [p.run_round(theta, fragment=0) for p in peers]
        losses.append(results[0].train_loss)
        theta = _apply(theta, results, ranges)
    after = peers[0].evaluate(theta)
    assert after["val_loss"] < before["val_loss"] and losses[-1] < losses[0]
    assert after["val_accuracy"] > 0.85, after


def test_sparse_q8_two_peers_learn(digits: training.Task) -> None:
    peers = _peers(digits, _cfg(inner_steps=20, codec="sparse-q8", topk_density=0.03, expected_peers=2), 2)
    theta = training.flatten_params(digits.build_model())
    for _ in range(6):
        results = [p.run_round(theta, fragment=0) for p in peers]
        assert results[0].density == pytest.approx(0.03, abs=1e-4)
        theta = _apply(theta, results, peers[0].fragments)
    assert peers[0].evaluate(theta)["val_accuracy"] > 0.7


def test_matches_centralized_diloco(digits: training.Task) -> None:
    """Summing N lockstep peers' dense updates == Nesterov SGD on the mean pseudo-gradient."""
    n, rounds = 2, 3
    cfg = _cfg(inner_steps=5, codec="dense-f32", expected_peers=n, num_fragments=1)
    peers = _peers(digits, cfg, n)
    theta0 = training.flatten_params(digits.build_model())

    # Centralized reference: N local models + AdamWs, one global tensor with torch's own Nesterov SGD.
    models = [digits.build_model() for _ in range(n)]
    inner = [training.build_inner_optimizer(m, cfg) for m in models]
    data = [digits.batches(i, n, seed=cfg.seed, batch_size=cfg.batch_size) for i in range(n)]
    global_p = torch.nn.Parameter(torch.from_numpy(theta0.copy()))
    outer = torch.optim.SGD([global_p], lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=True)

    theta = theta0
    for _ in range(rounds):
        theta = _apply(theta, [p.run_round(theta, fragment=0) for p in peers], peers[0].fragments)
        deltas = []
        for m, opt, it in zip(models, inner, data, strict=True):
            training.load_flat_params(m, global_p.detach().numpy())
            training.inner_loop(m, digits, opt, it, steps=cfg.inner_steps, grad_clip=cfg.grad_clip)
            deltas.append(global_p.detach().numpy() - training.flatten_params(m))
        global_p.grad = torch.from_numpy(np.mean(deltas, axis=0))
        outer.step()
    np.testing.assert_allclose(theta, global_p.detach().numpy(), rtol=0, atol=2e-5)
    assert np.abs(theta - theta0).max() > 1e-2  # the test moved something


@pytest.mark.parametrize("codec", [c for c in training.CODECS if c != "dense-f32"])  # dense-f32 is exact
def test_error_feedback_tracks_true_sum(codec: str) -> None:
    """Σ sent + residual == Σ true updates exactly, and Σ sent converges to Σ true (relative error)."""
    rng = np.random.default_rng(0)
    n, rounds, density = 4000, 60, 2 / 64  # 2 per 64 entries: the same kept count for chunked codecs
    bias = rng.normal(size=n).astype(np.float32)  # a persistent direction, like a real pseudo-gradient
    residual = np.zeros(n, dtype=np.float32)
    true_sum = np.zeros(n, dtype=np.float64)
    sent_sum = np.zeros(n, dtype=np.float64)
    for _ in range(rounds):
        update = (bias + rng.normal(size=n)).astype(np.float32) * 1e-3
        u = update + residual
        sent = training.compress(u, codec=codec, density=density).dense(n)
        residual = u - sent
        true_sum += update
        sent_sum += sent
    np.testing.assert_allclose(sent_sum + residual, true_sum, atol=1e-5)
    rel = np.linalg.norm(sent_sum - true_sum) / np.linalg.norm(true_sum)
    assert rel < 0.35, rel  # without feedback, 3% top-k keeps only a small fraction of the mass


def test_fragments_touch_only_their_slice(digits: training.Task) -> None:
    (peer,) = _peers(digits, _cfg(num_fragments=3, codec="sparse-q8", topk_density=0.05), 1)
    theta = training.flatten_params(digits.build_model())
    result = peer.run_round(theta, fragment=1)
    (a, b), (c, d) = peer.fragments[1], peer.fragments[2]
    idx, _ = crdt.decode_payload(result.codec, b - a, result.payload)
    assert idx.max() < b - a and result.fragment == 1
    assert not peer.momentum[:a].any() and not peer.momentum[c:d].any() and peer.momentum[a:b].any()
    assert not peer.residual[:a].any() and peer.residual[a:b].any()
    with pytest.raises(training.ConfigError, match="fragment"):
        peer.run_round(theta, fragment=3)
    with pytest.raises(training.ConfigError, match="float32"):
        peer.run_round(theta.astype(np.float64), fragment=0)


def test_state_dict_round_trip(digits: training.Task) -> None:
    cfg = _cfg(inner_steps=5, codec="sparse-q4", topk_density=0.05)
    a = training.PeerTrainer(digits, cfg, shard=0, num_shards=2)
    theta = training.flatten_params(digits.build_model())
    for _ in range(2):
        theta = _apply(theta, [a.run_round(theta, fragment=0)], a.fragments)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = training.PeerTrainer(digits, cfg, shard=0, num_shards=2)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    ra, rb = a.run_round(theta, fragment=0), b.run_round(theta, fragment=0)
    assert ra.payload == rb.payload and ra.train_loss == rb.train_loss
    with pytest.raises(training.ConfigError, match="num_fragments"):
        other = training.PeerTrainer(digits, _cfg(num_fragments=2), shard=0, num_shards=2)
        other.load_state_dict(a.state_dict())


class _NanTask(DigitsTask):
    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return super().loss(model, batch) * float("nan")


def test_divergence_raises_and_leaves_state(digits: training.Task) -> None:
    peer = training.PeerTrainer(_NanTask(), _cfg(inner_steps=2), shard=0, num_shards=1)
    with pytest.raises(training.TrainingError, match="non-finite"):
        peer.run_round(training.flatten_params(digits.build_model()), fragment=0)
    assert peer.rounds == 0 and not peer.momentum.any() and not peer.residual.any()
    assert not peer.optimizer.state  # poisoned AdamW moments were dropped


def test_plugin_without_start_resumes_by_replay(digits: training.Task) -> None:
    """Also checks load_state_dict copies: `a` keeps training after `b` loaded its live state."""
    class NoStart(DigitsTask):
        def batches(self, shard, num_shards, *, seed, batch_size):  # type: ignore[no-untyped-def, override]
            return super().batches(shard, num_shards, seed=seed, batch_size=batch_size)

    cfg = _cfg(inner_steps=3)
    a = training.PeerTrainer(NoStart(), cfg, shard=0, num_shards=1)
    theta = training.flatten_params(digits.build_model())
    a.run_round(theta, fragment=0)
    b = training.PeerTrainer(NoStart(), cfg, shard=0, num_shards=1)
    b.load_state_dict(a.state_dict())
    assert a.run_round(theta, fragment=0).payload == b.run_round(theta, fragment=0).payload


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_matches_shapes(digits: training.Task) -> None:
    peer = training.PeerTrainer(digits, _cfg(device="auto", codec="sparse-q8"), shard=0, num_shards=1)
    assert peer.device.type == "cuda"
    theta = training.flatten_params(digits.build_model())
    result = peer.run_round(theta, fragment=0)
    assert np.isfinite(result.train_loss) and result.payload_bytes > 0
    assert peer.evaluate(theta)["val_accuracy"] >= 0.0


# ------------------------------------------------------------------------------------------- staleness


def test_staleness_weight_is_one_in_lockstep_then_decays_then_drops() -> None:
    policy = training.DilocoConfig(expected_peers=4).staleness_policy
    assert policy.max_staleness == 16  # auto: 4 x expected_peers
    assert [policy.weight(s) for s in (0, 3)] == [1.0, 1.0]  # the 3 others landing once is normal
    assert policy.weight(7) == 0.5  # one extra round (4 contributions) behind: half weight
    weights = [policy.weight(s) for s in range(3, 17)]
    assert all(a > b for a, b in itertools.pairwise(weights)) and weights[-1] > 0.0
    assert policy.weight(17) == 0.0  # beyond max_staleness: the daemon skips the round
    assert training.DilocoConfig(expected_peers=4, max_staleness=5).staleness_policy.weight(6) == 0.0
    with pytest.raises(training.ConfigError, match="max_staleness"):
        training.DilocoConfig(expected_peers=4, max_staleness=2)


def test_round_result_carries_the_authors_policy(digits: training.Task) -> None:
    cfg = _cfg(inner_steps=2, expected_peers=3, max_staleness=9)
    peer = training.PeerTrainer(digits, cfg, shard=0, num_shards=1)
    result = peer.run_round(training.flatten_params(digits.build_model()), fragment=0)
    assert result.weight == 1.0 and result.staleness_policy == cfg.staleness_policy
    assert pickle.loads(pickle.dumps(result)) == result  # crosses the trainer process pipe


def test_for_task_merges_task_defaults_under_options(digits: training.Task) -> None:
    lm = training.load_task("stdlib-lm", max_corpus_bytes=400_000, val_permille=200)
    tuned = training.DilocoConfig.for_task(lm, {})
    assert tuned == training.DilocoConfig.from_dict(lm.default_diloco())  # type: ignore[attr-defined]
    assert training.DilocoConfig.for_task(lm, {"inner_steps": 3}).inner_steps == 3
    assert training.DilocoConfig.for_task(digits, {}) == training.DilocoConfig()  # no default_diloco


# -------------------------------------------------------------------------------------------- restarts


def test_reload_continues_bit_identically(digits: training.Task) -> None:
    """A peer restarted from state_dict (through torch.save, as the daemon does) produces the very same
    payloads as one that never stopped: momentum, residuals, AdamW moments and data position persist."""
    cfg = _cfg(inner_steps=3, codec="sparse-q8", topk_density=0.1, num_fragments=2, expected_peers=1)
    a = training.PeerTrainer(digits, cfg, shard=1, num_shards=2)
    theta = training.flatten_params(digits.build_model())
    for r in range(3):  # both fragments have momentum and residuals by now
        theta = _apply(theta, [a.run_round(theta, fragment=r % 2)], a.fragments)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = training.PeerTrainer(digits, cfg, shard=1, num_shards=2)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert b.residual.any() and np.array_equal(a.residual, b.residual)
    for r in range(3, 6):
        ra, rb = a.run_round(theta, fragment=r % 2), b.run_round(theta, fragment=r % 2)
        assert ra.payload == rb.payload and ra.train_loss == rb.train_loss
        theta = _apply(theta, [ra], a.fragments)
    assert np.array_equal(a.momentum, b.momentum) and np.array_equal(a.residual, b.residual)


def test_no_momentum_buffer_without_outer_momentum(digits: training.Task) -> None:
    """μ = 0 keeps no D-sized momentum (4 bytes per parameter); states cross between μ settings, and a
    state from before the schedule existed resumes at rounds x inner_steps."""
    flat = _cfg(inner_steps=2, outer_momentum=0.0)
    a = training.PeerTrainer(digits, flat)
    theta = training.flatten_params(digits.build_model())
    a.run_round(theta, fragment=0)
    assert a.momentum.size == 0 and a.residual.any()
    b = training.PeerTrainer(digits, _cfg(inner_steps=2, outer_momentum=0.9))
    b.load_state_dict(a.state_dict())
    assert b.momentum.shape == (b.dim,) and not b.momentum.any()
    old = {k: v for k, v in a.state_dict().items() if k != "inner_step"}
    c = training.PeerTrainer(digits, flat)
    c.load_state_dict(old)
    assert c.inner_step == 2 and c.batches_consumed == 2


def test_residual_decay_scales_the_carried_residual(digits: training.Task) -> None:
    """β < 1: the next round adds β x the residual it carries, nothing else changes (same data and θ)."""
    theta = training.flatten_params(digits.build_model())
    runs = {}
    for beta in (1.0, 0.5):
        peer = training.PeerTrainer(digits, _cfg(inner_steps=2, codec="sparse-f32", topk_density=0.1,
                                                residual_decay=beta, outer_momentum=0.0))
        peer.run_round(theta, fragment=0)
        carried = peer.residual.copy()
        result = peer.run_round(theta, fragment=0)
        idx, vals = crdt.decode_payload(result.codec, peer.dim, result.payload)
        sent = np.zeros(peer.dim, np.float32)
        sent[idx.astype(np.int64)] = vals
        runs[beta] = (carried, sent + peer.residual)  # u of the second round = update + β x carried
    (carried, u_one), (carried_half, u_half) = runs[1.0], runs[0.5]
    np.testing.assert_array_equal(carried, carried_half)
    np.testing.assert_allclose(u_one - u_half, 0.5 * carried, atol=1e-6)


def test_live_peer_count_sets_the_outer_step_and_the_staleness_rule(digits: training.Task) -> None:
    """`run_round(peers=N)` divides the outer step by the N the daemon counts now, whatever the config."""
    cfg = _cfg(codec="dense-f32", outer_momentum=0.0, expected_peers=1)
    theta = training.flatten_params(digits.build_model())
    results = {}
    for peers in (None, 4):
        torch.manual_seed(0)
        trainer = training.PeerTrainer(digits, cfg)
        results[peers] = trainer.run_round(theta, fragment=0, peers=peers)
    one, four = (crdt.decode_payload("dense-f32", len(theta), results[k].payload)[1] for k in (None, 4))
    np.testing.assert_allclose(four * 4, one, rtol=1e-5, atol=1e-8)
    assert results[None].staleness_policy.expected_peers == 1
    assert results[4].staleness_policy.expected_peers == 4 and results[4].staleness_policy.max_staleness == 16
    with pytest.raises(training.ConfigError, match="peers"):
        trainer.run_round(theta, fragment=0, peers=0)
