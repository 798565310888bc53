"""daemon.node.trainer_process: the training child reads the parameters from one shared-memory block, in
place, and the block is gone once the process is."""

from __future__ import annotations

from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest
from node_testlib import HIST, G, state_of

from daemon.node.trainer_process import TrainerError, TrainerProcess, TrainerSpec, _fill_unmapped, fill_from


async def test_rounds_and_evaluations_read_the_shared_parameters(tmp_path: Path) -> None:
    spec = TrainerSpec(
        task="digits", task_options={}, diloco={"inner_steps": 2, "codec": "dense-f32"}, shard=0,
        num_shards=1, threads=1, state_file=tmp_path / "trainer.pt",
    )
    trainer = TrainerProcess(spec)
    await trainer.start()
    try:
        params = await trainer.initial_params()
        fills: list[int] = []

        def fill(out: np.ndarray) -> None:
            fills.append(out.size)
            out[:] = params

        ranges = await trainer.fragment_ranges()
        result = await trainer.run_round(fill, params.size, 0, peers=2)
        assert result.fragment == 0 and result.codec == "dense-f32"
        assert result.staleness_policy.expected_peers == 2
        assert len(result.payload) == 4 * (ranges[0][1] - ranges[0][0])
        metrics = await trainer.evaluate(fill, params.size)
        assert np.isfinite(metrics["val_loss"]) and fills == [params.size, params.size]
        block = Path("/dev/shm") / trainer._shm.name.lstrip("/")  # type: ignore[union-attr]
        assert block.exists()
    finally:
        await trainer.aclose()
    assert not block.exists()  # unlinked with the process: nothing left in /dev/shm


def _shmem_resident() -> int:
    """This process's resident shared-memory bytes (RssShmem of /proc/self/status)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssShmem:"))
    return int(line.split()[1]) * 1024


def test_the_handoff_delivers_the_parameters_without_keeping_them_resident() -> None:
    size = 8 * 2**20  # 32 MiB of float32
    params = np.random.default_rng(0).standard_normal(size, dtype=np.float32)
    owner = shared_memory.SharedMemory(create=True, size=4 * size)
    try:
        before = _shmem_resident()
        _fill_unmapped(owner.name, lambda out: out.__setitem__(slice(None), params), size)
        assert _shmem_resident() - before < 2**20  # unmapped: resident in whoever reads them, not here
        child = shared_memory.SharedMemory(name=owner.name)  # what the training process attaches
        try:
            assert bytes(child.buf[: 4 * size]) == params.tobytes()
        finally:
            child.close()
    finally:
        owner.close()
        owner.unlink()


async def test_a_checkpoint_round_trips_and_a_wrong_one_is_named(tmp_path: Path) -> None:
    """`meshtrain checkpoint` writes what `model.load_state_dict(load_file(...))` reads back, and a founder's
    `init_from` takes exactly those parameters; a file of another model is refused, naming the tensor."""
    import torch
    from safetensors.torch import load_file, save_file

    import training

    spec = TrainerSpec(task="digits", task_options={}, diloco={}, shard=0, num_shards=1, threads=1,
                       state_file=tmp_path / "trainer.pt")
    trainer = TrainerProcess(spec)
    await trainer.start()
    try:
        params = await trainer.initial_params() + np.float32(0.25)
        path = tmp_path / "model.safetensors"
        await trainer.export(lambda out: out.__setitem__(slice(None), params), params.size, path)
        model = training.load_task("digits").build_model()
        model.load_state_dict(load_file(str(path)))  # what a user does with the file
        assert np.array_equal(training.flatten_params(model), params)
        assert np.array_equal(await trainer.params_from_checkpoint(path), params)
        wrong = load_file(str(path))
        name = next(iter(wrong))
        wrong[name] = torch.zeros(3, dtype=torch.float32)
        save_file(wrong, str(tmp_path / "wrong.safetensors"))
        with pytest.raises(TrainerError, match=f"{name} is torch.float32 \\(3,\\)"):
            await trainer.params_from_checkpoint(tmp_path / "wrong.safetensors")
    finally:
        await trainer.aclose()


_ORPHAN_SCRIPT = """
import asyncio, sys
from pathlib import Path
from daemon.node.trainer_process import TrainerProcess, TrainerSpec

async def main():
    spec = TrainerSpec(task="digits", task_options={}, diloco={"inner_steps": 10**6}, shard=0,
                       num_shards=1, threads=1, state_file=Path(sys.argv[1]))
    trainer = TrainerProcess(spec)
    await trainer.start()
    params = await trainer.initial_params()
    print(trainer.info["pid"], flush=True)
    await trainer.run_round(lambda out: out.__setitem__(slice(None), params), params.size, 0, peers=1)

asyncio.run(main())
"""


def test_the_training_process_dies_with_a_killed_daemon(tmp_path: Path) -> None:
    """A daemon SIGKILLed (OOM killer, `kill -9`) in the middle of a round must not leave its child
    training beside the restarted daemon's new one: the kernel kills the child with its parent
    (PR_SET_PDEATHSIG). Without it the child went on with its million inner steps."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    daemon = subprocess.Popen([sys.executable, "-c", _ORPHAN_SCRIPT, str(tmp_path / "trainer.pt")],
                              stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert daemon.stdout is not None
        child = int(daemon.stdout.readline())
        os.kill(child, 0)  # alive while its parent is
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=30)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
            with open(f"/proc/{child}/stat") as f:  # a zombie waiting for init to reap it is dead too
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.05)
        else:
            assert not Path(f"/proc/{child}").exists(), "the training process outlived its daemon"
    finally:
        daemon.kill()
        if child:  # never leave a million-step orphan behind a failed assertion
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


async def test_stopping_in_the_middle_of_a_round_does_not_wait_for_it(tmp_path: Path) -> None:
    """A round in progress is thrown away on stop: the child is killed at once instead of holding the
    daemon's shutdown for STOP_TIMEOUT_S (here the round would run a million inner steps)."""
    import asyncio
    import time

    from daemon.node.trainer_process import STOP_TIMEOUT_S

    spec = TrainerSpec(task="digits", task_options={}, diloco={"inner_steps": 10**6}, shard=0, num_shards=1,
                       threads=1, state_file=tmp_path / "trainer.pt")
    trainer = TrainerProcess(spec)
    await trainer.start()
    params = await trainer.initial_params()
    round_task = asyncio.create_task(
        trainer.run_round(lambda out: out.__setitem__(slice(None), params), params.size, 0, peers=1))
    while trainer._running != "round":
        await asyncio.sleep(0.01)
    started = time.monotonic()
    await trainer.aclose()
    assert time.monotonic() - started < STOP_TIMEOUT_S / 2
    with pytest.raises(TrainerError, match="gone"):
        await round_task
    assert not (tmp_path / "trainer.pt").exists()  # nothing committed


def test_the_daemon_side_never_imports_torch() -> None:
    """The daemon unpickles each round's RoundResult; it must not pull torch in with it (2 B/param of
    daemon memory at 100M parameters, bench/probe_memory.py): ``training`` imports its submodules lazily
    and RoundResult lives in a torch-free one."""
    import subprocess
    import sys

    script = (
        "import pickle, sys\n"
        "import daemon.cli.main, daemon.service.service, daemon.node.node\n"
        "from training._result import RoundResult\n"
        "from training._staleness import StalenessPolicy\n"
        "result = RoundResult(fragment=0, codec='dense-f32', payload=b'', weight=1.0, train_loss=0.0,\n"
        "    update_norm=0.0, residual_norm=0.0, density=1.0, payload_bytes=0,\n"
        "    staleness_policy=StalenessPolicy(expected_peers=1, max_staleness=4))\n"
        "pickle.loads(pickle.dumps(result))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_a_fill_writes_the_state_as_it_was_when_made_and_releases_it() -> None:
    """The fill runs in a worker thread while the loop applies records: it writes the state frozen when
    the command was issued, and the frozen view is gone once written (or dropped unwritten)."""
    state = state_of(HIST[:3])
    fill = fill_from(state)
    state.apply(HIST[3])
    out = np.empty(G.length, dtype=np.float32)
    fill(out)
    assert out.tobytes() == state_of(HIST[:3]).materialize().tobytes()
    assert not state._acc.values._views
    unused = fill_from(state)
    assert state._acc.values._views
    del unused
    assert not state._acc.values._views


async def test_a_stopped_child_exits_without_the_interpreters_teardown(tmp_path: Path) -> None:
    """On stop the child leaves at once (os._exit): nothing is left to save, and the teardown of a large
    model's interpreter held shutdowns past STOP_TIMEOUT_S. Here a plug-in leaves a thread that never ends,
    which a normal interpreter exit waits for forever: the child must still exit by itself, code 0, not be
    killed (-9) after the timeout."""
    plugin = tmp_path / "lingering.py"
    plugin.write_text(
        "import threading\n"
        "from training import load_task\n"
        "threading.Thread(target=threading.Event().wait, daemon=False).start()\n"
        "def Task():\n"
        "    return load_task('digits')\n"
    )
    spec = TrainerSpec(task=f"{plugin}:Task", task_options={}, diloco={}, shard=0, num_shards=1, threads=1,
                       state_file=tmp_path / "trainer.pt")
    trainer = TrainerProcess(spec)
    await trainer.start()
    proc = trainer._proc
    assert proc is not None
    await trainer.aclose()
    assert proc.exitcode == 0
