"""daemon.node.trainer_process: the training child reads the parameters from one shared-memory block, in
place, and the block is gone once the process is."""

from __future__ import annotations

from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest

from daemon.node.trainer_process import TrainerError, TrainerProcess, TrainerSpec, _fill_unmapped


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
