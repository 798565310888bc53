"""`meshtrain task options | new | check`: bring your own model without a daemon."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from daemon.cli.main import main


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout


def test_options_lists_the_tasks_and_the_diloco_knobs() -> None:
    code, output = _run("task", "options", "digits", "--json")
    assert code == 0
    data = json.loads(output)
    hidden = next(row for row in data["task_options"] if row["key"] == "hidden")
    assert hidden["type"] == "int" and hidden["default"] == 128 and "hidden" in hidden["doc"]
    assert {"inner_steps", "codec", "outer_lr"} <= {row["key"] for row in data["diloco"]}
    code, output = _run("task", "options", "digits")
    assert code == 0 and "[task] options of digits" in output and "[diloco]" in output
    code, output = _run("task", "options", "no-such-task", "--json")
    assert code == 1 and "unknown task" in json.loads(output)["error"]


def test_new_writes_a_task_that_checks_clean(tmp_path: Path) -> None:
    code, output = _run("task", "new", "my-model", "--dir", str(tmp_path / "tasks"), "--json")
    assert code == 0
    data = json.loads(output)
    assert data == {"path": str(tmp_path / "tasks" / "my-model.py"),
                    "task": f"{tmp_path / 'tasks' / 'my-model.py'}:MyModelTask"}
    code, output = _run("task", "new", "my-model", "--dir", str(tmp_path / "tasks"), "--json")
    assert code == 1 and "exists" in json.loads(output)["error"]
    code, output = _run("task", "new", "../escape", "--dir", str(tmp_path))
    assert code == 2 and not (tmp_path.parent / "escape.py").exists()
    code, output = _run("task", "check", data["task"], "--task-option", "hidden=16")
    assert code == 0 and "no problem found" in output


def test_check_says_what_would_break_and_exits_1(tmp_path: Path) -> None:
    _run("task", "new", "broken", "--dir", str(tmp_path))
    path = tmp_path / "broken.py"
    # Every peer would stream the same examples in the same order: the seed is ignored.
    source = path.read_text().replace("default_rng([seed, shard, epoch])", "default_rng([0, shard, epoch])")
    path.write_text(source)
    code, output = _run("task", "check", f"{path}:BrokenTask")
    assert code == 1
    assert "[batches] seeds 0 and 1 give the same batches" in output
    assert "fix: shuffle with the seed" in output
    code, output = _run("task", "check", f"{path}:BrokenTask", "--task-option", "hidden=0", "--json")
    assert code == 1
    (problem,) = json.loads(output)["problems"]
    assert problem["check"] == "load" and "task.hidden must be >= 1" in problem["what"]
