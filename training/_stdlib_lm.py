"""The "stdlib-lm" task (default): a byte-level nanoGPT trained on the Python standard library's source.

Data: every .py file under sysconfig's stdlib directory, minus tests and site-packages, as raw bytes
(vocabulary = 256 byte values, no tokenizer to ship or agree on). The file list is sorted, then ordered
by a hash of each relative path (a deterministic pseudo-random sample of the stdlib), and read until
`max_corpus_bytes`, which keeps loading to well under a second. A file goes to validation when
hash("split:" + path) falls in the first `val_permille` buckets, and otherwise to shard
hash("shard:" + path) % num_shards. Files are joined with a NUL byte (absent from source) as a
document separator. Caveat: the corpus is whatever stdlib the peer's Python ships, so peers on different
Python versions see slightly different files; `corpus_digest` lets the daemon detect it (put it in
genesis meta if validation numbers must be comparable across peers).

Model: nanoGPT (pre-LayerNorm blocks, causal SDPA attention, GELU MLP, learned positions), untied LM
head (tied weights would share storage, which safetensors export refuses; it costs 256 x n_embd params).
Defaults: 4 layers x 128 wide, context 128 -> ~0.87M parameters; options scale it (Config docstring).
"""

import dataclasses
import hashlib
import math
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training._errors import ConfigError
from training._task import task_config_error

SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})  # not "the stdlib"
SEPARATOR = b"\x00"  # between files; never occurs in Python source
EVAL_BATCH = 64  # validation windows per forward pass

Batch = tuple[torch.Tensor, torch.Tensor]  # x (B, T) int64 bytes, y (B, T) int64 next bytes


def _hash(salt: str, path: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{salt}:{path}".encode(), digest_size=8).digest(), "little")


# ------------------------------------------------------------------------------------------------ model


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GPTConfig:
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.n_head = c.n_head
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd, bias=False)
        self.proj = nn.Linear(c.n_embd, c.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_head
        q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(c.n_embd), CausalSelfAttention(c)
        self.ln2 = nn.LayerNorm(c.n_embd)
        d = c.n_embd
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ByteGPT(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(256, c.n_embd), nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f, self.head = nn.LayerNorm(c.n_embd), nn.Linear(c.n_embd, 256, bias=False)
        for name, p in self.named_parameters():  # nanoGPT init: N(0, 0.02), residual outputs / sqrt(2L)
            if name.endswith(("proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.n_layer))
            elif p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, 256)


# ------------------------------------------------------------------------------------------------- task


class StdlibLMTask:
    """Byte-level language modeling of the Python stdlib's own source."""

    @dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
    class Config:
        """Model shape and corpus. Scale by options alone: GPT-2-small-like is n_layer 12, n_embd 768,
        n_head 12, block_size 1024 (~86M parameters); wide and shallow for big-genesis tests is n_layer 1,
        n_embd 2560, block_size 16 (~80M parameters)."""

        block_size: int = 128
        """Context length in bytes."""
        n_layer: int = 4
        """Transformer blocks."""
        n_head: int = 4
        """Attention heads; must divide n_embd."""
        n_embd: int = 128
        """Model width; parameters grow as about 12 x n_layer x n_embd^2."""
        max_corpus_bytes: int = 4_000_000
        """Stop reading files once this many bytes are loaded (train + val); keeps startup ~0.1-0.5 s."""
        val_permille: int = 50
        """Files (per thousand, by path hash) held out for validation."""
        eval_bytes: int = 32_768
        """Validation bytes scored by `evaluate` (fixed prefix of the validation text)."""
        stdlib_dir: str = ""
        """Override the source directory (default: sysconfig.get_paths()["stdlib"])."""
        init_seed: int = 0
        """Seed for build_model's init (peers start from the genesis vector anyway)."""

        def __post_init__(self) -> None:
            for field in ("block_size", "n_layer", "n_head", "n_embd", "max_corpus_bytes", "eval_bytes"):
                if getattr(self, field) < 1:
                    raise task_config_error(field, "must be >= 1", getattr(self, field))
            if self.n_embd % self.n_head:
                raise ConfigError(
                    f"task.n_embd must be divisible by task.n_head (got {self.n_embd} and {self.n_head})"
                )
            if not 0 < self.val_permille < 1000:
                raise task_config_error("val_permille", "must be in (0, 1000)", self.val_permille)

    name = "stdlib-lm"

    def __init__(self, config: "StdlibLMTask.Config | None" = None) -> None:
        self.config = c = config or StdlibLMTask.Config()
        root = Path(c.stdlib_dir or sysconfig.get_paths()["stdlib"])
        paths = sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*.py")
            if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
        )
        paths.sort(key=lambda rel: _hash("order", rel))  # deterministic sample when capped
        self.files: list[tuple[str, bytes]] = []
        total = 0
        for rel in paths:
            if total >= c.max_corpus_bytes:
                break
            data = (root / rel).read_bytes()
            self.files.append((rel, data))
            total += len(data) + 1
        val = [d for rel, d in self.files if _hash("split", rel) % 1000 < c.val_permille]
        self._val = np.frombuffer(SEPARATOR.join(val), dtype=np.uint8)
        if len(self._val) < c.block_size + 1:
            raise ConfigError(
                f"stdlib-lm: {len(self._val)} validation bytes do not fill one window of "
                f"task.block_size={c.block_size}; raise task.val_permille or task.max_corpus_bytes"
            )
        digest = hashlib.blake2b(digest_size=16)
        for rel, data in self.files:
            digest.update(rel.encode() + b"\x00" + hashlib.blake2b(data, digest_size=16).digest())
        self.corpus_digest = digest.hexdigest()
        """Identifies the exact corpus (file names and contents); equal on peers with the same stdlib."""

    def default_diloco(self) -> dict[str, object]:
        """DiLoCo settings tuned for this task on small CPU meshes (DilocoConfig.for_task merges them
        under the user's [diloco] options).

        Target: `make demo` (4 peers, 12 rounds, 8 processes on 2 cores) shows a clear validation-loss
        drop within ~3-4 minutes. One step of the default model at batch 16 takes ~0.25 s on one free
        core, ~0.5 s with 4 trainers sharing 2 cores, so H=20 is ~10 s of compute per round, long
        enough to amortize the round's fixed cost (materialize, pipe, fsync of the trainer state).
        inner_lr 3e-3: a 0.9M-parameter model tolerates it and a short run needs it (1e-3 learns ~2x
        slower in the first few hundred steps).

        Communication: top-k of 10 % of the entries with error feedback, sent as rice-q8 (sparse-q8's
        int8 values, bit for bit, with Rice-coded index gaps: 12.5 bits per kept entry instead of 16.6 on
        this task's updates). The density is high because runs this short are: with only tens of rounds,
        a small top-k leaves most of the early, dense progress stuck in the residual (bench/convergence's
        long preset, 0.28M params, 4 daemons, 80 rounds of H=30, rice-q2 at 1/64: 27 % above DDP's loss
        at 1,035x fewer bytes). 2-bit values cost loss here too: the full preset (H=10, 5 %) measured
        +9.6 % vs DDP with rice-q2 against +1.4 % with sparse-q8; `make demo` with rice-q2 at 10 % still
        reached 2.486 from 5.579 in 12 rounds.

        Outer SGD with lr 1.0 and no momentum instead of the paper's Nesterov 0.7 / 0.9: with top-k error
        feedback the residual already carries momentum-like memory (SparseLoCo drops outer momentum too),
        and free-running daemons apply each other's updates a little late, which momentum amplifies.
        Measured with bench/convergence's full preset (0.28M params, 4 peers, 1,200 inner steps, 5%
        sparse-q8): 4 real daemons reached val loss 1.545 with lr 1.0 / μ 0 and 1.623 with lr 0.7 / μ 0.6
        (DDP: 1.532); in lockstep simulation at H=25 0.9 was far worse (2.39 vs 1.94 at round 20). One
        fragment: few rounds, so sync the whole model each round.
        """
        return {
            "inner_steps": 20, "batch_size": 16, "inner_lr": 3e-3, "outer_lr": 1.0, "outer_momentum": 0.0,
            "codec": "rice-q8", "topk_density": 0.1, "num_fragments": 1,
        }

    def build_model(self) -> torch.nn.Module:
        c = self.config
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(c.init_seed)
            gpt = GPTConfig(block_size=c.block_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd)
            return ByteGPT(gpt)

    def shard_data(self, shard: int, num_shards: int) -> np.ndarray:
        """This shard's training bytes (its files joined by SEPARATOR), as uint8."""
        if not 0 <= shard < num_shards:
            raise ConfigError(f"shard must be in [0, num_shards={num_shards}), got {shard}")
        val_permille = self.config.val_permille
        mine = [
            d
            for rel, d in self.files
            if _hash("split", rel) % 1000 >= val_permille and _hash("shard", rel) % num_shards == shard
        ]
        data = np.frombuffer(SEPARATOR.join(mine), dtype=np.uint8)
        if len(data) < self.config.block_size + 1:
            raise ConfigError(
                f"stdlib-lm: shard {shard}/{num_shards} has {len(data)} bytes; "
                "use fewer shards or a larger task.max_corpus_bytes"
            )
        return data

    def batches(
        self, shard: int, num_shards: int, *, seed: int, batch_size: int, start: int = 0
    ) -> Iterator[Batch]:
        """Random windows; batch i depends only on (seed, shard, i), so `start` skips in O(1)."""
        data, T = self.shard_data(shard, num_shards), self.config.block_size
        window = np.arange(T + 1)
        step = start
        while True:
            offsets = np.random.default_rng([seed, shard, step]).integers(0, len(data) - T, size=batch_size)
            buf = torch.from_numpy(data[offsets[:, None] + window].astype(np.int64))  # (B, T+1)
            yield buf[:, :-1], buf[:, 1:]
            step += 1

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        device = next(model.parameters()).device
        x, y = batch[0].to(device), batch[1].to(device)
        logits = model(x)  # (B, T, 256)
        return F.cross_entropy(logits.float().view(-1, 256), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """val_loss in nats/byte and val_bpb (bits per byte) over the first eval_bytes of validation text."""
        device, T = next(model.parameters()).device, self.config.block_size
        n = max(1, min(self.config.eval_bytes, len(self._val) - 1) // T)
        buf = torch.from_numpy(self._val[: n * T + 1].astype(np.int64))
        x, y = buf[:-1].view(n, T), buf[1:].view(n, T)  # (n, T) non-overlapping windows
        total = 0.0
        for i in range(0, n, EVAL_BATCH):
            logits = model(x[i : i + EVAL_BATCH].to(device)).float()  # (b, T, 256)
            yy = y[i : i + EVAL_BATCH].to(device)
            total += F.cross_entropy(logits.view(-1, 256), yy.reshape(-1), reduction="sum").item()
        val_loss = total / (n * T)
        return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2)}
