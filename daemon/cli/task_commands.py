"""``meshtrain task ...``: bring your own model. None of them needs a daemon.

``task options NAME`` lists the ``[task]`` options of a task (``training.describe_task_options``) and the
``[diloco]`` knobs (``training.describe_options(DilocoConfig)``); ``task new NAME`` writes a commented,
working plug-in to edit (``training.task_skeleton``); ``task check NAME`` tries one the way the daemon
will use it and says in plain words what would break (``training.check_task``; exit 1 if anything
would). NAME is a built-in ("digits", "stdlib-lm"), ``package.module:Factory``, or
``path/to/file.py:Class`` relative to the working dir.

``validate_task_options`` is what ``meshtrain init --task-option`` checks its options with: the task's
own Config built by ``training.build_config``, without building the task (no data is loaded).

These import torch (through ``training``), so the module is imported only when a task command runs.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from daemon.cli.common import EXIT_FAILED, console, echo_json, fail, json_option, parse_options

__all__ = ["task_group", "validate_task_options"]

CLASS_LINE = re.compile(r"^class (\w+)\b", re.MULTILINE)  # the plug-in class task_skeleton writes


@click.group("task")
def task_group() -> None:
    """Bring your own model: a task's options, a new task to edit, a check of one."""


@task_group.command("options")
@click.argument("name")
@json_option
def task_options(name: str, as_json: bool) -> None:
    """List the [task] options of task NAME and the [diloco] knobs, with defaults and what they do."""
    import training

    try:
        rows = training.describe_task_options(name)
    except training.TaskNotFoundError as exc:
        fail(str(exc), as_json=as_json)
    diloco = training.describe_options(training.DilocoConfig)
    if as_json:
        echo_json({"task": name, "task_options": [dataclasses.asdict(r) for r in rows],
                   "diloco": [dataclasses.asdict(r) for r in diloco]})
        return
    if rows:
        console.print(_options_table(f"[task] options of {name}", rows))
    else:
        console.print(f"{name} has no Config: its factory takes the [task] table as keyword arguments")
    console.print(_options_table("[diloco] (the training loop; a task may tune the defaults)", diloco))


def _options_table(title: str, rows: list[Any]) -> Table:
    table = Table(title=escape(title), title_justify="left", show_lines=False)
    for column in ("key", "type", "default", "what it does"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.key, escape(row.type), escape(repr(row.default)), escape(row.doc))
    return table


@task_group.command("new")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Where to write NAME.py.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@json_option
def task_new(name: str, directory: Path, force: bool, as_json: bool) -> None:
    """Write DIR/NAME.py: a commented task plug-in that trains as written, to edit into your model."""
    import training

    try:
        source = training.task_skeleton(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from exc
    path = (directory / f"{name}.py").absolute()
    if path.exists() and not force:
        fail(f"{path} exists (use --force to overwrite)", as_json=as_json)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}", as_json=as_json)
    match = CLASS_LINE.search(source)
    task = f"{path}:{match[1] if match else name}"
    if as_json:
        echo_json({"path": str(path), "task": task})
        return
    console.print(f"wrote {path}")
    console.print(f"try it:  meshtrain task check {task}")
    console.print(f"use it:  meshtrain init --task {task}")


@task_group.command("check")
@click.argument("name")
@click.option("--task-option", "pairs", multiple=True, metavar="KEY=VALUE",
              help="A [task] option (repeatable); VALUE is read as TOML, else as a string.")
@click.option("--diloco-option", "diloco_pairs", multiple=True, metavar="KEY=VALUE",
              help="A [diloco] setting for the training check (repeatable).")
@json_option
def task_check(name: str, pairs: tuple[str, ...], diloco_pairs: tuple[str, ...], as_json: bool) -> None:
    """Try task NAME as the daemon will (load, build the model twice, stream batches, a loss, two
    training steps, evaluate) and say what would break; exit 1 if anything would."""
    import training

    options = parse_options(pairs, flag="--task-option")
    diloco = parse_options(diloco_pairs, flag="--diloco-option")
    if not as_json:
        console.print(f"checking {name} ...")
    problems = training.check_task(name, options, diloco=diloco)
    if as_json:
        echo_json({"task": name, "ok": not problems, "problems": [dataclasses.asdict(p) for p in problems]})
    elif problems:
        console.print(f"[red]{len(problems)} problem(s)[/] with {name}:", highlight=False)
        for problem in problems:
            click.echo(str(problem))
    else:
        console.print(f"[green]no problem found[/]: {name} is ready to train", highlight=False)
    if problems:
        sys.exit(EXIT_FAILED)


def validate_task_options(task: str, options: dict[str, Any]) -> None:
    """Check ``options`` against the Config of ``task`` without building the task.

    Raises:
        click.BadParameter: the task cannot be loaded, or an option is unknown, of the wrong type or
            out of range (the message names the key, ``task.<key>``).
    """
    import training

    try:
        checked = training.check_task_options(task, options)
    except (training.TaskNotFoundError, training.ConfigError) as exc:
        raise click.BadParameter(str(exc), param_hint="--task-option") from exc
    if not checked:
        raise click.BadParameter(
            f"task {task!r} has no Config to check its options against; write them into [task] of "
            "config.toml instead (the task validates them when it starts)",
            param_hint="--task-option",
        )
