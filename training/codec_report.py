"""Bytes per round vs reconstruction error for each crdt payload codec, on a real DiLoCo update.

Run `python -m training.codec_report [--task digits|stdlib-lm] [--density 0.02]` for a markdown table;
tests/training/test_codecs.py checks the orderings it shows (fewer bytes <-> more error).

Columns: `bytes` per round for the whole model (one fragment = whole model here), `bits/param` over the
full fragment, `bits/entry` per kept entry (index + value + its share of a scale), `quant err` =
||topk(u) - sent|| / ||topk(u)|| (the codec's own error on the entries it keeps), `total err` =
||u - sent|| / ||u|| (top-k + quantization, one shot), `EF err` = relative error of the *sum* of sent
updates vs the sum of true updates after `rounds` rounds with error feedback (the number that matters for
training; the update stream is the real u plus noise, see `_stream`).

For dct-q8 (top-k of 64-point DCT-II coefficients, DeMo) `quant err` is measured on the coefficients:
the same k coefficients carry more of ||u|| than k entries do, so its `total err` is lower at equal bytes.
chunked-q2 keeps k entries of every 64 (6-bit indices instead of ~8-bit gaps), so its top-k cannot follow
an update whose mass sits in a few tensors: its `total err` is higher at equal density. rice-q2 sends
sparse-q2's update (global top-k) with Rice-coded gaps: on stdlib-lm at density 1/64, 6.5 bits per kept
entry against chunked-q2's 8.5 and sparse-q2's 10.9, at sparse-q2's error.
"""

import argparse
from typing import Any

import numpy as np
import torch

import crdt
import training


def one_update(task_name: str, **task_options: Any) -> np.ndarray:
    """A real outer update (what a peer would send uncompressed) from one 2-peer round on `task_name`."""
    torch.manual_seed(0)
    task = training.load_task(task_name, **task_options)
    cfg = training.DilocoConfig(inner_steps=20, inner_lr=3e-3, batch_size=16, codec="dense-f32",
                                expected_peers=2, device="cpu")
    peer = training.PeerTrainer(task, cfg, shard=0, num_shards=2)
    theta = training.flatten_params(task.build_model())
    peer.run_round(theta, fragment=0)
    start, stop = peer.fragments[0]
    return -(cfg.outer_lr / cfg.expected_peers) * (1 + cfg.outer_momentum) * (
        theta[start:stop] - training.flatten_params(peer.model)[start:stop]
    )


def _stream(u: np.ndarray, rounds: int, seed: int) -> list[np.ndarray]:
    """Successive updates: the same direction u plus fresh noise of equal per-entry scale."""
    rng = np.random.default_rng(seed)
    return [(u + rng.normal(scale=float(np.std(u)), size=u.shape)).astype(np.float32) for _ in range(rounds)]


Row = dict[str, float | str]


def codec_table(u: np.ndarray, *, density: float, rounds: int = 20, seed: int = 0) -> list[Row]:
    """One row per codec (see module docstring for the columns)."""
    u = u.astype(np.float32)
    rows: list[Row] = []
    for codec in training.CODECS:
        c = training.compress(u, codec=codec, density=density)
        payload, sent = c.payload, c.dense(u.size)
        indices = c.kept
        domain = crdt.dct_coefficients if codec in crdt.TRANSFORM_CODECS else np.asarray
        x, sent_x = domain(u), domain(sent)
        topk = np.zeros_like(x)
        topk[indices] = x[indices]
        residual = np.zeros_like(u)
        true_sum, sent_sum = np.zeros(u.shape), np.zeros(u.shape)
        for update in _stream(u, rounds, seed):
            v = update + residual
            s = training.compress(v, codec=codec, density=density).dense(u.size)
            residual = v - s
            true_sum += update
            sent_sum += s
        rows.append({
            "codec": codec,
            "bytes": len(payload),
            "bits/param": 8 * len(payload) / u.size,
            "bits/entry": 8 * len(payload) / max(1, len(indices)),
            "quant err": float(np.linalg.norm(topk - sent_x) / max(np.linalg.norm(topk), 1e-30)),
            "total err": float(np.linalg.norm(u - sent) / np.linalg.norm(u)),
            "EF err": float(np.linalg.norm(sent_sum - true_sum) / np.linalg.norm(true_sum)),
        })
    return rows


def format_table(rows: list[Row]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = (f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values())
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--density", type=float, default=0.02)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    u = one_update(args.task)
    print(f"task={args.task} D={u.size} density={args.density} rounds={args.rounds}")
    print(format_table(codec_table(u, density=args.density, rounds=args.rounds)))


if __name__ == "__main__":
    main()
