import itertools
import math

import numpy as np
import pytest
import torch

import crdt
import training
from training._stdlib_lm import StdlibLMTask

TINY = {"block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32}
TINY |= {"max_corpus_bytes": 300_000, "eval_bytes": 4096}


@pytest.fixture(scope="module")
def lm() -> StdlibLMTask:
    return training.load_task("stdlib-lm", **TINY)  # type: ignore[return-value]


def test_corpus_is_deterministic_and_sharded(lm: StdlibLMTask) -> None:
    again = StdlibLMTask(StdlibLMTask.Config(**TINY))
    assert again.corpus_digest == lm.corpus_digest and len(lm.files) > 5
    assert all(not rel.startswith("test/") for rel, _ in lm.files)
    shards = [lm.shard_data(s, 2).tobytes() for s in range(2)]
    assert min(map(len, shards)) > 1000 and shards[0] != shards[1]
    with pytest.raises(training.ConfigError, match="shard"):
        lm.shard_data(2, 2)


def test_batches_shape_and_resume(lm: StdlibLMTask) -> None:
    a = list(itertools.islice(lm.batches(0, 2, seed=1, batch_size=4), 5))
    resumed = next(lm.batches(0, 2, seed=1, batch_size=4, start=4))
    x, y = a[0]
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one byte
    assert torch.equal(a[4][0], resumed[0])


def test_trains_and_reports_bits_per_byte(lm: StdlibLMTask) -> None:
    cfg = training.DilocoConfig(
        inner_steps=40, inner_lr=3e-3, batch_size=16, outer_lr=1.0, outer_momentum=0.0,
        codec="dense-f32", device="cpu",
    )  # outer_lr=1, μ=0, one peer: θ_new = θ_local exactly, so this measures the inner loop
    peer = training.PeerTrainer(lm, cfg, shard=0, num_shards=1)
    theta = training.flatten_params(lm.build_model())
    before = peer.evaluate(theta)
    assert before["val_loss"] == pytest.approx(math.log(256), abs=0.1)  # untrained ~ uniform over bytes
    result = peer.run_round(theta, fragment=0)
    idx, vals = crdt.decode_payload(result.codec, len(theta), result.payload)
    theta = theta.copy()
    theta[idx] += vals
    after = peer.evaluate(theta)
    assert after["val_loss"] < before["val_loss"] - 1.0, (before, after)
    assert after["val_bpb"] == pytest.approx(after["val_loss"] / math.log(2))
    assert np.isfinite(result.train_loss) and result.train_loss < before["val_loss"]


def test_default_model_size() -> None:
    cfg = StdlibLMTask.Config()
    model = StdlibLMTask.build_model(type("T", (), {"config": cfg})())  # type: ignore[arg-type]
    assert 300_000 < training.num_params(model) < 1_200_000
    divisible = r"task\.n_embd must be divisible by task\.n_head \(got 100 and 6\)"
    with pytest.raises(training.ConfigError, match=divisible):
        training.load_task("stdlib-lm", n_embd=100, n_head=6)


@pytest.mark.parametrize(
    ("options", "low", "high"),
    [
        ({"n_layer": 12, "n_embd": 768, "n_head": 12, "block_size": 1024}, 85e6, 100e6),  # GPT-2-small-like
        ({"n_layer": 1, "n_embd": 2560, "n_head": 16, "block_size": 16}, 70e6, 90e6),  # genesis > 256 MiB
    ],
)
def test_scales_by_options_alone(options: dict[str, int], low: float, high: float) -> None:
    task = training.load_task("stdlib-lm", **options)
    with torch.device("meta"):  # shapes only: no 300 MB of init on a test box
        d = training.num_params(task.build_model())
    assert low < d < high, d
    assert 4 * d > 256 * 2**20 or options["n_layer"] > 1
