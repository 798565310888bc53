"""A Hugging Face `transformers` causal LM (Llama or GPT-2 architecture, built from a config: nothing
is downloaded) trained by meshtrain on the Python standard library's source, byte by byte.

    [training]
    task = "examples/hf_causal_lm/hf_causal_lm.py:HFCausalLM"
    [task]
    arch = "llama"      # or "gpt2"
    n_layer = 2

Everything about the data (reading the stdlib, the validation split, random windows, bits per byte)
comes from meshtrain's built-in `stdlib-lm` task, which this class extends: only the model differs.
The vocabulary is the 256 byte values, so no tokenizer has to be shipped or agreed on.

Two details every transformers model needs here: `tie_word_embeddings=False` (tied tensors share
storage, which safetensors export refuses) and `use_cache=False` (training needs no key/value cache).
"""

import dataclasses

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from training import ConfigError, StdlibLMTask

ARCHS = ("llama", "gpt2")


class Logits(nn.Module):
    """Wraps a transformers causal LM so that model(idx) returns logits, as stdlib-lm's loss expects."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=idx, use_cache=False).logits  # (B, T, 256)


class HFCausalLM(StdlibLMTask):
    """Byte-level language modeling of the stdlib's source with a transformers model."""

    @dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
    class Config(StdlibLMTask.Config):
        """stdlib-lm's options (n_layer, n_head, n_embd, block_size, corpus) plus the architecture."""

        arch: str = "llama"
        """"llama" (RMSNorm, rotary positions, SwiGLU MLP) or "gpt2" (LayerNorm, learned positions)."""

        def __post_init__(self) -> None:
            StdlibLMTask.Config.__post_init__(self)
            if self.arch not in ARCHS:
                raise ConfigError(f"task.arch must be one of {ARCHS} (got {self.arch!r})")

    name = "hf-causal-lm"

    def build_model(self) -> nn.Module:
        c = self.config
        # NUL (byte 0) separates files in the corpus: it is the natural begin/end-of-text token
        common = {"vocab_size": 256, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0}
        if c.arch == "llama":
            hf = LlamaConfig(
                hidden_size=c.n_embd, intermediate_size=8 * c.n_embd // 3, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
                max_position_embeddings=c.block_size, **common,
            )
        else:
            hf = GPT2Config(
                n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, n_positions=c.block_size,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,  # as stdlib-lm: no dropout
            )
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(c.init_seed)
            return Logits(LlamaForCausalLM(hf) if c.arch == "llama" else GPT2LMHeadModel(hf))
