"""daemon.node.trainer_process: the training child reads the parameters from one shared-memory block, in
place, and the block is gone once the process is."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from daemon.node.trainer_process import TrainerProcess, TrainerSpec


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
