import numpy as np
import pytest
import torch

import training


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_flatten_load_round_trip() -> None:
    a, b = _model(), _model()
    vec = training.flatten_params(a)
    assert vec.dtype == np.float32 and vec.shape == (3 * 4 + 4 + 4 * 2 + 2,)
    training.load_flat_params(b, vec)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    vec[0] += 1.0  # flatten returns a copy, not a view into the model
    assert not np.array_equal(vec, training.flatten_params(a))


def test_load_rejects_wrong_length() -> None:
    with pytest.raises(training.ConfigError, match="length 26"):
        training.load_flat_params(_model(), np.zeros(25, dtype=np.float32))


@pytest.mark.parametrize("f", [1, 2, 3, 7, 26])
def test_fragment_ranges_cover_contiguously(f: int) -> None:
    ranges = training.fragment_ranges(_model(), f)
    assert len(ranges) == f and ranges[0][0] == 0 and ranges[-1][1] == 26
    assert all(a < b for a, b in ranges)
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(f - 1))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_fragment_ranges_rejects_too_many() -> None:
    with pytest.raises(training.ConfigError, match="num_fragments"):
        training.fragment_ranges(_model(), 27)
