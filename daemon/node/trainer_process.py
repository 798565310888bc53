"""Local training in a child process, driven from the daemon's event loop.

Why a process: the daemon's asyncio loop and the libp2p trio thread share one GIL; a training step that
holds it for tens of milliseconds would stall networking. The child owns torch, the model, the inner
optimizer and the error-feedback residuals; the parent hands it the merged global parameters and gets
back an encoded update. Commands and updates go over a ``multiprocessing`` pipe; the parameters do not:
the parent materializes the merged model straight into one shared-memory block (``fill``, e.g.
:func:`fill_from` a state, block by block) and the child reads it in place, read-only. The fill runs in
a worker thread, from the state frozen copy-on-write when the command was issued (crdt.FrozenState), so
that the loop goes on applying records meanwhile (it took 1.1 s of the loop at 100M parameters).
The parent writes through a mapping it unmaps right after (``_fill_unmapped``): the model's 4 bytes per
parameter are resident once, in the child that reads them, not in the daemon too (at 101M parameters
the daemon's resident set was 4.0 bytes per parameter larger while it kept the block mapped).
Rejected: pickling the parameters through the pipe each round (at 85M parameters that was a 340 MB
float32 array plus float64 temporaries of twice that in the parent, and another 340 MB in the child, every
round and every evaluation).

The protocol is strictly request/response, one request in flight, so the parent needs no correlation ids.
Blocking pipe calls run on a single worker thread so the event loop never blocks.

Persistence: after the parent has made a round's contribution durable in its log, it sends ``commit``
and the child saves its momentum and residual state atomically. A crash between the two only replays
a little error feedback; it never loses or duplicates a contribution.

A daemon killed outright (SIGKILL, the OOM killer) takes its child along: on Linux the child asks the
kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``). Before that an orphan went on with its
round (minutes at 100M parameters, holding its memory and the cores) beside the restarted daemon's new
child, and then printed a BrokenPipeError traceback into the service's log. Elsewhere, a broken pipe ends
the child quietly at its next answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

import crdt
from daemon.node import heap

__all__ = ["Fill", "TrainerError", "TrainerProcess", "TrainerSpec", "fill_from"]

log = logging.getLogger(__name__)

#: Writes the merged model's float32 parameters into the buffer it is given; runs in a worker thread.
Fill = Callable[[np.ndarray], object]
START_TIMEOUT_S = 120.0  # importing torch and building a task on a loaded 2-core box
STOP_TIMEOUT_S = 10.0


def fill_from(state: crdt.ModelState) -> Fill:
    """A :data:`Fill` of ``state`` as it is now, for a worker thread while the loop goes on applying
    records: frozen here, closed once written (or once dropped, if it never runs)."""
    frozen = state.freeze()

    def fill(out: np.ndarray) -> np.ndarray:
        with frozen:
            return frozen.materialize(out)

    return fill


class TrainerError(RuntimeError):
    """The training process failed; the message carries its traceback."""


@dataclass(frozen=True, kw_only=True)
class TrainerSpec:
    """Everything the child needs to build its trainer (picklable)."""

    task: str
    task_options: dict[str, Any]
    """The ``[task]`` table: options of the task's Config."""
    diloco: dict[str, Any]
    shard: int
    num_shards: int
    data_key: bytes | None = None
    """Set: stream the whole training set in an order seeded from this key (training.data_seed), the
    default; None: the configured shard."""
    threads: int
    state_file: Path


class TrainerProcess:
    """Asyncio handle on the training child process."""

    def __init__(self, spec: TrainerSpec) -> None:
        self._spec = spec
        self._shm: shared_memory.SharedMemory | None = None  # the parameters handed to the child
        self._ctx = multiprocessing.get_context("spawn")
        self._conn: Connection | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer-pipe")
        self._lock = asyncio.Lock()
        self._running: str | None = None  # the command the child is busy with
        self.info: dict[str, Any] = {}

    async def start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(
            target=_child_main, args=(child, self._spec, os.getpid()), name="meshtrain-trainer", daemon=True
        )
        self._proc.start()
        child.close()
        self._conn = parent
        self.info = await asyncio.wait_for(self._call("info"), START_TIMEOUT_S)

    async def initial_params(self) -> np.ndarray:
        """The task's freshly initialized flat parameters (used once, by the node that founds a run)."""
        return await self._call("init_params")

    async def params_from_checkpoint(self, path: Path) -> np.ndarray:
        """The flat parameters of a safetensors checkpoint of the task's model (used once, by a founder).

        Raises:
            TrainerError: the file is not a checkpoint of this model (a tensor missing, extra, or of
                another shape or dtype: the message names it).
        """
        return await self._call("checkpoint_params", path)

    async def fragment_ranges(self) -> tuple[tuple[int, int], ...]:
        return await self._call("fragments")

    async def run_round(self, fill: Fill, size: int, fragment: int, peers: int | None = None) -> Any:
        """One DiLoCo round from the parameters ``fill`` writes (``size`` float32 values); ``peers``: how
        many peers train now (None: the configured expected_peers)."""
        return await self._call_with_params("round", fill, size, fragment, peers)

    async def evaluate(self, fill: Fill, size: int) -> dict[str, float]:
        return await self._call_with_params("evaluate", fill, size)

    async def commit(self) -> None:
        await self._call("commit")

    async def set_threads(self, threads: int) -> None:
        await self._call("threads", threads)

    async def export(self, fill: Fill, size: int, path: Path) -> None:
        """Write the parameters ``fill`` writes as a safetensors checkpoint with the model's own names."""
        await self._call_with_params("export", fill, size, path)

    async def _call(self, command: str, *args: Any) -> Any:
        async with self._lock:
            return await self._send(command, args)

    async def _call_with_params(self, command: str, fill: Fill, size: int, *args: Any) -> Any:
        """``command`` with the shared parameters block filled first; the lock keeps them unchanged until
        the child answers (a round reads them again at its end, for the pseudo-gradient)."""
        async with self._lock:
            if self._shm is None or self._shm.size < 4 * size:
                self._release_params()
                self._shm = shared_memory.SharedMemory(create=True, size=4 * size)  # never touched here
            loop = asyncio.get_running_loop()  # the pipe's thread: one thread (one malloc arena) for fills
            await loop.run_in_executor(self._executor, _fill_unmapped, self._shm.name, fill, size)
            return await self._send(command, (self._shm.name, size, *args))

    async def _send(self, command: str, args: tuple[Any, ...]) -> Any:
        if self._conn is None:
            raise TrainerError("training process is not running")
        loop = asyncio.get_running_loop()
        self._running = command
        try:
            status, value = await loop.run_in_executor(self._executor, _roundtrip, self._conn, command, args)
        finally:
            self._running = None
        if status != "ok":
            raise TrainerError(f"training process failed on {command!r}:\n{value}")
        return value

    def _release_params(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None

    async def aclose(self) -> None:
        """Ask the child to exit, then make sure it has. A child busy with anything but ``commit`` (the
        one command whose result is kept: its error-feedback state) is killed at once: a round or an
        evaluation in progress is thrown away on stop anyway, and waiting for one held a shutdown for
        STOP_TIMEOUT_S (a 100M-parameter round takes minutes on a CPU)."""
        proc, conn = self._proc, self._conn
        self._conn = None
        if proc is None or conn is None:
            return
        if self._running not in (None, "commit"):
            log.info("stopping the training process in the middle of %s", self._running)
            proc.kill()
        with contextlib.suppress(BrokenPipeError, OSError):
            conn.send(("stop", ()))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, proc.join, STOP_TIMEOUT_S)
        if proc.is_alive():
            log.warning("training process did not stop in %.0f s; killing it", STOP_TIMEOUT_S)
            proc.kill()
            await loop.run_in_executor(None, proc.join)
        conn.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._release_params()


def _fill_unmapped(name: str, fill: Fill, size: int) -> None:
    """``fill`` the shared block ``name`` through a mapping of its own, unmapped as soon as it is written:
    the pages stay in the shared-memory object, resident in the child that reads them, not in the daemon.
    (Attaching registers the name with the resource tracker again: it keeps a set, the unlink clears it.)"""
    block = shared_memory.SharedMemory(name=name)
    try:
        view = np.ndarray((size,), dtype=np.float32, buffer=block.buf)
        fill(view)
        del view  # the mapping cannot close while an array still points into it
    finally:
        block.close()
        heap.trim()


def _roundtrip(conn: Connection, command: str, args: tuple[Any, ...]) -> tuple[str, Any]:
    try:
        conn.send((command, args))
        return conn.recv()
    except (EOFError, BrokenPipeError, ConnectionResetError, OSError) as exc:
        return "error", f"training process is gone ({exc.__class__.__name__})"


# ---------------------------------------------------------------------------------------------------
# Child side


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux for SIGKILL when the parent dies (see the module docstring); exit now if it already has
    (we were reparented before asking). A no-op where prctl does not exist."""
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(0)


def _child_main(conn: Connection, spec: TrainerSpec, parent_pid: int) -> None:
    import signal

    _die_with_parent(parent_pid)
    # The parent drives shutdown: a Ctrl-C sent to the whole process group must not kill a round midway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    import torch

    import training

    torch.set_num_threads(spec.threads)
    try:
        task = training.load_task(spec.task, **spec.task_options)
        diloco = dict(spec.diloco)
        if spec.data_key is not None:
            diloco["seed"] = training.data_seed(spec.data_key, diloco.get("seed", 0))
        config = training.DilocoConfig.for_task(task, diloco)
        trainer = training.PeerTrainer(task, config, shard=spec.shard, num_shards=spec.num_shards)
        if spec.state_file.exists():
            trainer.load_state_dict(torch.load(spec.state_file, weights_only=False))
    except Exception:
        # Answer the parent's first request with the reason (a bad [diloco] key, an unknown task).
        failure = traceback.format_exc(limit=-3)
        with contextlib.suppress(EOFError, OSError):
            conn.recv()
            conn.send(("error", failure))
        return

    def save_state() -> None:
        tmp = spec.state_file.with_suffix(".tmp")
        torch.save(trainer.state_dict(), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, spec.state_file)

    handlers = {
        "info": lambda: {
            "task": task.name,
            "pid": os.getpid(),
            "threads": torch.get_num_threads(),
            "device": training.resolve_device(config.device).type,
        },
        "init_params": lambda: _fresh_params(task, config),
        "checkpoint_params": lambda path: _checkpoint_params(task, path),
        "fragments": lambda: training.fragment_ranges(task.build_model(), config.num_fragments),
        "round": lambda name, size, fragment, peers: trainer.run_round(
            params(name, size), fragment=fragment, peers=peers
        ),
        "evaluate": lambda name, size: trainer.evaluate(params(name, size)),
        "commit": save_state,
        "threads": torch.set_num_threads,
        "export": lambda name, size, path: _export(task, params(name, size), path),
    }
    attached: dict[str, shared_memory.SharedMemory] = {}

    def params(name: str, size: int) -> np.ndarray:
        """The parent's parameters block, read in place (never copied) and read-only."""
        if name not in attached:
            for shm in attached.values():
                shm.close()
            attached.clear()
            # No resource_tracker.unregister here: a spawned child shares the parent's tracker, whose set
            # holds the name once; unregistering it here made the parent's unlink log a KeyError.
            attached[name] = shared_memory.SharedMemory(name=name)
        view = np.ndarray((size,), dtype=np.float32, buffer=attached[name].buf)
        view.flags.writeable = False
        return view

    while True:
        try:
            command, args = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if command == "stop":
            # Nothing is left to save (`commit` is the parent's explicit call), so skip the interpreter's
            # teardown (1.2 s alone with a ~100M-parameter model and its optimizer state, 2026-12-02; a
            # lingering non-daemon thread would hold it forever). Three such nodes stopping at once on 2
            # cores still exceeded STOP_TIMEOUT_S after this change: that cause is not found yet.
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(0)
        try:
            answer = ("ok", handlers[command](*args))
        except Exception:
            answer = ("error", traceback.format_exc())
        try:
            conn.send(answer)
        except (BrokenPipeError, EOFError, OSError):
            return  # the parent is gone: nobody to answer or to train for


def _fresh_params(task: Any, config: Any) -> np.ndarray:
    import torch

    import training

    torch.manual_seed(config.seed)
    return training.flatten_params(task.build_model())


def _checkpoint_params(task: Any, path: Path) -> np.ndarray:
    from safetensors.torch import load_file

    import training

    model = task.build_model()
    expected = model.state_dict()
    tensors = load_file(str(path))
    problems = [f"missing {name}" for name in expected if name not in tensors]
    problems += [f"unexpected {name}" for name in tensors if name not in expected]
    for name, tensor in tensors.items():
        want = expected.get(name)
        if want is not None and (tensor.shape != want.shape or tensor.dtype != want.dtype):
            problems.append(f"{name} is {tensor.dtype} {tuple(tensor.shape)}, the model has "
                            f"{want.dtype} {tuple(want.shape)}")
    if problems:
        raise ValueError(f"{path} is not a checkpoint of this task's model: " + "; ".join(problems[:8]))
    model.load_state_dict(tensors, strict=True)
    return training.flatten_params(model)


def _export(task: Any, params: np.ndarray, path: Path) -> None:
    from safetensors.torch import save_file

    import training

    model = task.build_model()
    training.load_flat_params(model, params)
    tmp = Path(path).with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
