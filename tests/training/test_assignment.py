import itertools

import torch

import training


def test_data_seed_is_stable_distinct_and_salted() -> None:
    ids = [bytes([i]) * 32 for i in range(200)]
    seeds = [training.data_seed(i) for i in ids]
    assert len(set(seeds)) == 200 and all(0 <= s < 2**64 for s in seeds)
    assert training.data_seed(ids[0]) == seeds[0] == 576801455626778370  # pinned: a restart keeps its order
    assert training.data_seed(ids[0], 7) != seeds[0]
    assert training.data_seed("12D3KooW") == training.data_seed(b"12D3KooW")


def test_whole_set_streams_differ_by_seed_and_cover_the_same_rows(digits: training.Task) -> None:
    """Rule (a): shard 0 of 1 with each peer's seed: different orders of one training set."""
    a, b = (training.data_seed(bytes([i]) * 32) for i in (1, 2))
    per_epoch = len(digits._train_idx) // 32  # type: ignore[attr-defined]
    epoch = [list(itertools.islice(digits.batches(0, 1, seed=s, batch_size=32), per_epoch)) for s in (a, b)]
    assert not torch.equal(epoch[0][0][0], epoch[1][0][0])
    seen = [{x.numpy().tobytes() for xb, _ in e for x in xb} for e in epoch]
    n_train = len(digits._train_idx)  # type: ignore[attr-defined]
    dropped = n_train - per_epoch * 32  # each epoch leaves out its last, partial batch
    assert len(seen[0] & seen[1]) >= n_train - 2 * dropped - 10  # (-10: duplicate images collapse in a set)
