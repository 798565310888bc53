"""The examples as a user runs them: each plug-in under examples/ founds a run of two real daemons
(``init --task PATH``, ``invite``, ``init --join``), both train to a stated validation loss of the merged
model, and that model's checkpoint founds a new run (``init --from-checkpoint``) whose genesis is those
weights, bit for bit (read back through the Python client's ``state_dict``).

Marked slow (``make test-slow``): two examples x (two daemons training + one founding), about 4 minutes on
2 cores. The quick path of the same commands, with a ``task new`` skeleton, is tests/integration/test_join.py.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_steps import meshtrain, wait_for
from safetensors.torch import load_file

from daemon.cli.client import ControlClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ROUNDS = 6
START_TIMEOUT_S = 180.0
TRAIN_TIMEOUT_S = 420.0
LOOPBACK = "/ip4/127.0.0.1/tcp/0"

# (task spec, [task] options, bar on the merged model's val_loss after ROUNDS rounds of two nodes).
# Bars: measured on 2026-12-01 (digits_cnn 0.089, hf llama 2.317; fresh models 2.29 and 5.58), plus margin
# for scheduling (rounds interleave differently each run).
CASES = {
    "digits_cnn": (f"{EXAMPLES / 'digits_cnn' / 'digits_cnn.py'}:DigitsCNN", [], 0.5),
    "hf_causal_lm": (
        f"{EXAMPLES / 'hf_causal_lm' / 'hf_causal_lm.py'}:HFCausalLM",
        ["arch=llama", "n_layer=2", "n_embd=64", "block_size=64", "max_corpus_bytes=1000000",
         "eval_bytes=8192"],
        3.2,
    ),
}  # fmt: skip


@pytest.mark.parametrize("example", sorted(CASES))
def test_an_example_trains_on_two_daemons_and_its_checkpoint_founds_a_run(
    example: str,
    tmp_path: Path,
    daemons: Callable[..., subprocess.Popen[bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec, options, bar = CASES[example]
    if example == "hf_causal_lm":
        pytest.importorskip("transformers", reason="pip install -e '.[examples]'")
    monkeypatch.chdir(tmp_path)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    task_options = [arg for option in options for arg in ("--task-option", option)]

    meshtrain("--home", str(a), "init", "--run", example, "--task", spec, *task_options, "--listen", LOOPBACK)
    daemons(a, "--max-rounds", str(ROUNDS))
    wait_for([a], lambda s: s[0].genesis is not None, timeout_s=START_TIMEOUT_S, what="the run founded")
    token = meshtrain("--home", str(a), "invite", "--include-loopback").strip()
    meshtrain("--home", str(b), "init", "--join", token, "--listen", LOOPBACK)
    daemons(b, "--max-rounds", str(ROUNDS))
    first, second = wait_for(
        [a, b],
        lambda s: all(x.round == ROUNDS and x.eval.contributions == 2 * ROUNDS for x in s)
        and s[0].state_hash == s[1].state_hash,
        timeout_s=START_TIMEOUT_S + TRAIN_TIMEOUT_S,
        what="both nodes to train and evaluate one merged model",
    )  # fmt: skip
    val_loss = second.eval.metrics["val_loss"]
    print(f"{example}: val_loss {first.initial_eval.metrics['val_loss']:.3f} -> {val_loss:.3f}")
    assert val_loss < bar < first.initial_eval.metrics["val_loss"]

    meshtrain("--home", str(b), "checkpoint", "merged.safetensors")
    merged = load_file(tmp_path / "merged.safetensors")
    meshtrain("--home", str(c), "init", "--run", f"{example}-2", "--task", spec, *task_options,
              "--from-checkpoint", "merged.safetensors", "--listen", LOOPBACK)  # fmt: skip
    daemons(c, "--no-train")
    wait_for([c], lambda s: s[0].genesis is not None, timeout_s=START_TIMEOUT_S, what="the new run founded")
    founded = ControlClient.for_home(c).state_dict()
    assert founded.keys() == merged.keys()
    assert all(torch.equal(founded[name], merged[name]) for name in merged)
