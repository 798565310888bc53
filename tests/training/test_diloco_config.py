import pytest
import torch

import training
from training import ConfigError, DilocoConfig


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"inner_optimizer": "lion"}, r"diloco\.inner_optimizer must be one of \('adamw', 'sgd'\)"),
        ({"warmup_steps": -1}, r"diloco\.warmup_steps must be >= 0"),
        ({"warmup_steps": 10, "total_steps": 10}, r"diloco\.total_steps must be 0 \(no decay\) or > "),
        ({"min_lr_ratio": 1.5}, r"diloco\.min_lr_ratio must be in \[0, 1\]"),
        ({"grad_accum": 0}, r"diloco\.grad_accum must be >= 1"),
        ({"inner_betas": (0.9, 1.0)}, r"diloco\.inner_betas must be two numbers in \[0, 1\)"),
        ({"inner_momentum": -0.1}, r"diloco\.inner_momentum must be in \[0, 1\)"),
        ({"seed": -1}, r"diloco\.seed must be >= 0"),
        ({"device": "cuda:x"}, r"diloco\.device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ({"device": "gpu"}, r"diloco\.device must be"),
        ({"residual_decay": 1.5}, r"diloco\.residual_decay must be in \[0, 1\]"),
    ],
)
def test_new_fields_are_validated_by_name(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DilocoConfig(**options)  # type: ignore[arg-type]


def test_from_dict_converts_toml_values() -> None:
    toml = {"inner_lr": 1, "inner_betas": [0.9, 0.95], "device": "cuda:1", "total_steps": 100}
    c = DilocoConfig.from_dict(toml)
    assert c.inner_lr == 1.0 and isinstance(c.inner_lr, float) and c.inner_betas == (0.9, 0.95)
    assert c.device == "cuda:1" and c.total_steps == 100
    with pytest.raises(ConfigError, match=r"diloco\.inner_steps must be an integer, got '5' \(str\)"):
        DilocoConfig.from_dict({"inner_steps": "5"})
    with pytest.raises(ConfigError, match=r"diloco\.amp must be true or false"):
        DilocoConfig.from_dict({"amp": 1})


def test_resolve_device_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training.resolve_device("auto") == torch.device("cpu")
    assert training.resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        message = rf"diloco\.device is '{name}' but torch sees no CUDA device.*'auto'"
        with pytest.raises(ConfigError, match=message):
            training.resolve_device(name)


def test_resolve_device_index_out_of_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert training.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert training.resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"'cuda:2' but this machine has 2 CUDA device\(s\)"):
        training.resolve_device("cuda:2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_trains(digits: training.Task) -> None:
    peer = training.PeerTrainer(digits, DilocoConfig(device="cuda:0", inner_steps=3))
    assert peer.device == torch.device("cuda", 0)
    result = peer.run_round(training.flatten_params(digits.build_model()), fragment=0)
    assert result.payload_bytes > 0 and result.train_loss > 0
