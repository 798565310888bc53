"""The three contenders of the convergence benchmark, each a function returning a curve and totals.

* meshtrain (sim): N PeerTrainers in one process, in lockstep rounds. Each round every peer trains from
  the same materialized crdt state, its RoundResult becomes a real signed crdt.Contribution, and all of
  them are applied to one crdt.ModelState (every replica would hold exactly that state). Bytes are
  len(contribution.encode()) x (N - 1) recipients: the payload a peer must ship to everyone else,
  without gossip/anti-entropy/transport overhead (the cluster mode measures that).
* meshtrain (cluster): the real thing, N daemons on loopback via daemon.cluster.Cluster; bytes_sent
  is the sum of the daemons' TCP bytes as the kernel counts them (payloads, gossip, sync, Noise/yamux
  framing), broken down by _overhead.py.
* single: one process, one AdamW, the same total samples (N x R x H batches of B) in sequence.
* ddp: N processes (torch.distributed, gloo), each on its own shard, gradients averaged by one
  all_reduce of the flat gradient per step, R x H steps of batch B per rank (the same total samples).
  Bytes are what a ring all-reduce sends: 2 (N - 1) / N x gradient bytes per step per rank.

All three use the same task config, init, inner AdamW (lr and its schedule, weight decay, clipping) and
data shards; the schedule (warm-up, cosine decay to total_steps) is stretched to each contender's steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import torch

import crdt
import training

Curve = list[dict[str, float]]  # points {"samples", "bytes_sent", "val_loss"}


def _point(samples: int, bytes_sent: int, val_loss: float) -> dict[str, float]:
    return {"samples": samples, "bytes_sent": bytes_sent, "val_loss": round(val_loss, 5)}


def _evaluate(task: training.Task, model: torch.nn.Module) -> float:
    model.eval()
    try:
        return task.evaluate(model)["val_loss"]
    finally:
        model.train()


# ------------------------------------------------------------------------------------ meshtrain (sim)


def meshtrain_sim(
    task_spec: str,
    task_options: dict[str, Any],
    diloco: training.DilocoConfig,
    *,
    peers: int,
    rounds: int,
    eval_every: int,
) -> dict[str, Any]:
    task = training.load_task(task_spec, **task_options)
    trainers = [training.PeerTrainer(task, diloco, shard=i, num_shards=peers) for i in range(peers)]
    genesis = crdt.Genesis(
        training.flatten_params(task.build_model()),
        trainers[0].fragments,
        {"task": task_spec, "run": "bench"},
    )
    state = crdt.ModelState(genesis)
    signers = [crdt.Signer.from_seed(hashlib.sha256(b"bench-peer-%d" % i).digest()) for i in range(peers)]
    samples_per_round = peers * diloco.inner_steps * diloco.batch_size
    started, sent, payload = time.perf_counter(), 0, 0
    curve = [_point(0, 0, trainers[0].evaluate(state.materialize())["val_loss"])]
    for r in range(rounds):
        theta, base = state.materialize(), state.version_vector.digest()
        contributions = []
        for signer, trainer in zip(signers, trainers, strict=True):
            res = trainer.run_round(theta, fragment=r % len(genesis.fragments))
            contributions.append(
                crdt.make_contribution(
                    signer,
                    genesis_id=genesis.id,
                    seq=r + 1,
                    fragment=res.fragment,
                    codec=res.codec,
                    payload=res.payload,
                    weight=res.weight,
                    base_version=base,
                )
            )
        for c in contributions:
            state.apply(c)
            sent += len(c.encode()) * (peers - 1)
            payload += len(c.payload) * (peers - 1)
        if (r + 1) % eval_every == 0 or r + 1 == rounds:
            val = trainers[0].evaluate(state.materialize())["val_loss"]
            curve.append(_point((r + 1) * samples_per_round, sent, val))
            print(f"  meshtrain round {r + 1}/{rounds} val_loss={val:.4f} bytes={sent}", flush=True)
    return {
        "mode": "sim",
        "val_loss": curve[-1]["val_loss"],
        "bytes_sent": sent,
        "payload_bytes": payload,
        "wall_s": round(time.perf_counter() - started, 1),
        "curve": curve,
    }


# -------------------------------------------------------------------------------- meshtrain (cluster)


def meshtrain_cluster(
    task_spec: str,
    diloco: dict[str, Any],
    *,
    peers: int,
    rounds: int,
    eval_every: int,
    workdir: Path,
    sync: dict[str, Any],
    node: dict[str, Any],
    prototype: str,
    netns: bool,
) -> dict[str, Any]:
    """Real daemons (see `start_cluster`); `netns`: this process runs in its own network namespace
    (_overhead.enter_private_netns), so the loopback counters are the daemons' wire bytes."""
    from bench.convergence import _overhead
    from daemon.cli.cluster import Cluster, converged

    group = Cluster(workdir / "cluster")
    started = time.perf_counter()
    lo_start = _overhead.loopback_sent()  # meaningful when netns: nothing else uses this loopback
    start_cluster(
        group,
        peers,
        node=node,
        prototype=prototype,
        task=task_spec,
        run="bench",
        diloco=diloco,
        sync=sync,
        training={"enabled": False, "eval_every": eval_every, "threads": 1},
    )
    # All start together, as DDP's ranks and the simulation's peers do: started with its daemon, the
    # founder could train rounds alone while the others were still starting (10-15 s here).
    try:
        for info in group.nodes():
            group.client(info.index).post("/v1/train/start", {"rounds": rounds})
        target = peers * rounds
        statuses = group.wait_until(
            lambda st: (
                converged(st, contributions=target)
                and all(s["eval"].get("contributions") == target for s in st)
            ),
            timeout_s=3600,
            what=f"{target} contributions everywhere, evaluated",
        )
        wall = time.perf_counter() - started
        histories = [group.client(s["index"]).get("/v1/history")["rounds"] for s in statuses]
        statuses = group.status()  # counters now, with the wire bytes of the same moment
        if netns:
            lo_end = _overhead.loopback_sent()
            ip_bytes, packets = lo_end[0] - lo_start[0], lo_end[1] - lo_start[1]
            wire_total = _overhead.tcp_payload(ip_bytes, packets)
        else:
            ip_bytes = None
            wire_total = sum(_overhead.tcp_bytes_sent({int(s["pid"]) for s in statuses}).values())
    finally:
        group.down()
    # Curve: node 0's evaluations against the cluster's total bytes at that time (sum over nodes of
    # the bytes each had sent by its round of the same number).
    samples_per_round = peers * diloco["inner_steps"] * diloco["batch_size"]
    by_round = [{r["round"]: r for r in h} for h in histories]
    initial = statuses[0].get("initial_eval", {}).get("val_loss")
    curve = [_point(0, 0, initial)] if initial is not None else []
    for r in histories[0]:
        if r.get("val_loss") is not None:
            total = sum(h.get(r["round"], {}).get("bytes_sent", 0) for h in by_round)
            curve.append(_point(r["round"] * samples_per_round, total, r["val_loss"]))
    final = statuses[0]["eval"]["val_loss"]
    overhead = _overhead.breakdown(statuses, histories, wire_total, codec=diloco["codec"])
    overhead.update(wire_method="netns loopback" if netns else "ss established sockets", ip_bytes=ip_bytes)
    total_bytes = overhead["wire_bytes"]
    # Curve points between evaluations only know the daemons' own counters: scale them to the wire.
    to_wire = total_bytes / max(1, overhead["app_bytes"])
    for point in curve:
        point["bytes_sent"] = round(point["bytes_sent"] * to_wire)
    curve.append(_point(rounds * samples_per_round, total_bytes, final))
    return {
        "mode": "cluster",
        "val_loss": round(final, 5),
        "bytes_sent": total_bytes,
        "payload_bytes": overhead["payload_bytes"],
        "overhead": overhead,
        "sync": sync,
        "node": node,
        "prototype": prototype,
        # How far from lockstep the free-running daemons were: lockstep is staleness N - 1, weight 1.
        "mean_staleness": round(float(np.mean([r["staleness"] for h in histories for r in h])), 2),
        "mean_weight": round(float(np.mean([r["weight"] for h in histories for r in h])), 4),
        "wall_s": round(wall, 1),
        "curve": curve,
    }


def start_cluster(group: Any, peers: int, *, node: dict[str, Any], prototype: str, **create: Any) -> None:
    """`Cluster.up` with extra keys in every config ([node]'s, or "section.key") and, when `prototype` is
    set (e.g. "discovery_s=300"), the daemon changes of prototype/sitecustomize.py. The task plug-ins
    must be importable by the daemons: the repo goes on their PYTHONPATH."""
    from daemon.home import Home

    repo = Path(__file__).resolve().parents[2]
    paths = [str(repo / "bench" / "convergence" / "prototype")] if prototype else []
    paths += [str(repo), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    os.environ["MESHTRAIN_PROTOTYPE"] = prototype
    group.create(peers, **create)
    for info in group.nodes():
        config_file = Home(Path(info.home)).config_file
        config = tomllib.loads(config_file.read_text())
        for key, value in node.items():  # "mdns" is [node]'s, "nat.autonat" [nat]'s
            section, _, name = key.rpartition(".")
            config.setdefault(section or "node", {})[name] = value
        config_file.write_text(tomli_w.dumps(config))
    try:
        for info in group.nodes():
            group.start(info.index)
        group.wait_connected(timeout_s=180)
    except BaseException:
        group.down()
        raise


# --------------------------------------------------------------------------------------------- single


def single(
    task_spec: str,
    task_options: dict[str, Any],
    diloco: training.DilocoConfig,
    *,
    steps: int,
    eval_every_steps: int,
) -> dict[str, Any]:
    task = training.load_task(task_spec, **task_options)
    model = task.build_model()
    optimizer = training.build_inner_optimizer(model, diloco)
    batches = task.batches(0, 1, seed=diloco.seed, batch_size=diloco.batch_size)
    schedule = _stretched(diloco, steps)
    started, done = time.perf_counter(), 0
    curve = [_point(0, 0, _evaluate(task, model))]
    while done < steps:
        n = min(eval_every_steps, steps - done)
        factors = [training.lr_factor(done + i, schedule) for i in range(n)]
        training.inner_loop(
            model, task, optimizer, batches, steps=n, grad_clip=diloco.grad_clip, lr_factors=factors
        )
        done += n
        curve.append(_point(done * diloco.batch_size, 0, _evaluate(task, model)))
        print(f"  single step {done}/{steps} val_loss={curve[-1]['val_loss']:.4f}", flush=True)
    return {
        "val_loss": curve[-1]["val_loss"],
        "bytes_sent": 0,
        "wall_s": round(time.perf_counter() - started, 1),
        "curve": curve,
    }


# ------------------------------------------------------------------------------------------------ ddp


def ddp(
    task_spec: str,
    task_options: dict[str, Any],
    diloco: training.DilocoConfig,
    *,
    ranks: int,
    steps: int,
    eval_every_steps: int,
) -> dict[str, Any]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.pt"
        started = time.perf_counter()
        mp.spawn(
            _ddp_rank,
            args=(ranks, task_spec, task_options, diloco, steps, eval_every_steps, tmp, out),
            nprocs=ranks,
            join=True,
        )
        wall = time.perf_counter() - started
        curve = torch.load(out)
    return {
        "val_loss": curve[-1]["val_loss"],
        "bytes_sent": curve[-1]["bytes_sent"],
        "wall_s": round(wall, 1),
        "curve": curve,
    }


def _ddp_rank(
    rank: int,
    ranks: int,
    task_spec: str,
    task_options: dict[str, Any],
    diloco: training.DilocoConfig,
    steps: int,
    eval_every_steps: int,
    tmp: str,
    out: Path,
) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=ranks)
    try:
        task = training.load_task(task_spec, **task_options)
        model = task.build_model()  # seeded: identical on every rank
        params = [p for p in model.parameters()]
        optimizer = training.build_inner_optimizer(model, diloco)
        batches = task.batches(rank, ranks, seed=diloco.seed, batch_size=diloco.batch_size)
        grad_bytes = 4 * sum(p.numel() for p in params)
        per_step = 2 * (ranks - 1) * grad_bytes  # ring all-reduce, summed over all ranks
        schedule = _stretched(diloco, steps)
        curve = [_point(0, 0, _evaluate(task, model))] if rank == 0 else []
        for step in range(1, steps + 1):
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * training.lr_factor(step - 1, schedule)
            loss = task.loss(model, next(batches))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            flat = torch.cat([p.grad.reshape(-1) for p in params])  # (D,)
            dist.all_reduce(flat)
            flat /= ranks
            torch.nn.utils.vector_to_parameters(flat, [p.grad for p in params])
            if diloco.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, diloco.grad_clip)
            optimizer.step()
            if rank == 0 and (step % eval_every_steps == 0 or step == steps):
                curve.append(
                    _point(step * ranks * diloco.batch_size, step * per_step, _evaluate(task, model))
                )
                print(f"  ddp step {step}/{steps} val_loss={curve[-1]['val_loss']:.4f}", flush=True)
        if rank == 0:
            torch.save(curve, out)
    finally:
        dist.destroy_process_group()
        sys.stdout.flush()


def _stretched(diloco: training.DilocoConfig, steps: int) -> training.DilocoConfig:
    """The meshtrain peers' lr schedule (warm-up, cosine to total_steps) over another contender's `steps`:
    DDP takes as many steps as a peer, one process N times as many."""
    if not diloco.total_steps:
        return diloco
    stretch = steps / diloco.total_steps
    warmup, total = round(diloco.warmup_steps * stretch), round(diloco.total_steps * stretch)
    return dataclasses.replace(diloco, warmup_steps=warmup, total_steps=total)


def as_array(curve: Curve, key: str) -> np.ndarray:
    return np.array([p[key] for p in curve], dtype=np.float64)
