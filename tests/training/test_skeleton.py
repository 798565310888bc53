from pathlib import Path

import pytest

import crdt
import training


def test_skeleton_passes_check_task_as_written(tmp_path: Path) -> None:
    path = tmp_path / "my_task.py"
    path.write_text(training.task_skeleton("my-task"))
    spec = f"{path}:MyTask"
    assert training.check_task(spec) == []
    task = training.load_task(spec, hidden=16)
    assert task.name == "my-task"
    assert training.num_params(task.build_model()) == 16 * 16 + 16 + 2 * 16 + 16 * 4 + 4
    rows = {r.key: r for r in training.describe_task_options(spec)}
    assert rows["hidden"].doc and rows["val_fraction"].default == 0.2
    with pytest.raises(training.ConfigError, match=r"task\.examples must be >= 1 \(got 0\)"):
        training.load_task(spec, examples=0)


def test_skeleton_trains(tmp_path: Path) -> None:
    path = tmp_path / "learns.py"
    path.write_text(training.task_skeleton("learns"))
    task = training.load_task(f"{path}:LearnsTask")
    peer = training.PeerTrainer(task, training.DilocoConfig.for_task(task, {"device": "cpu"}))
    theta = training.flatten_params(task.build_model())
    before = peer.evaluate(theta)
    for _ in range(10):
        result = peer.run_round(theta, fragment=0)
        idx, vals = crdt.decode_payload(result.codec, theta.size, result.payload)
        theta[idx] += vals
    after = peer.evaluate(theta)
    assert after["val_loss"] < before["val_loss"] - 0.5 and after["val_accuracy"] > 0.8, (before, after)


@pytest.mark.parametrize(
    ("name", "cls"), [("digits2", "Digits2Task"), ("x.y_z", "XYZTask"), ("5ive", "T5iveTask")]
)
def test_class_names(name: str, cls: str) -> None:
    assert f"class {cls}:" in training.task_skeleton(name)


@pytest.mark.parametrize("name", ["", "-x", 'a"b', "a b"])
def test_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="task name"):
        training.task_skeleton(name)
