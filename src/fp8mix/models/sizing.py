"""How much memory and disk each stage needs, from the architecture alone (no weights), to size machines.

The scoring estimate counts what autograd keeps for the backward with frozen weights (linears save nothing; per
LM block the two RMSNorms keep an FP32 input, attention keeps q, k, v, its output and log-sum-exp, the SiLU-gated
MLP keeps gate, up and their product) plus what the AutoQuant hooks hold until the gradient arrives (ΔY of every
scored linear, BF16), the FP32 logits of the loss, the BF16 weights and the FP8 copies of every LM linear. The
vision tower's activations are not kept: nothing before the token embeddings needs a gradient. ACTIVATION_OVERHEAD
covers the allocator and short-lived temporaries; it was fitted on the H100 measurement of the 3B architecture
(BENCHMARKS.md: 27.2 GiB at 4 x 512 tokens) and checked against benchmarks/bench_scale.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import ModelLayout

ACTIVATION_OVERHEAD = 1.25
GPU_SIZES_GIB = {"80 GB (H100)": 79.6, "141 GB (H200)": 139.8}
USABLE = 0.9   # of a GPU's memory, leaving room for the CUDA context and fragmentation
DEFAULT_FRACTIONS = {"fp8_autoquant_top25": 0.25, "fp8_autoquant_top50": 0.5, "fp8_autoquant_full": 1.0,
                     "fp8_autoquant_bits12": 0.5, "fp8_autoquant_bits10": 0.75}


@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> Dims:
        text = config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(text.num_hidden_layers, text.hidden_size, text.intermediate_size,
                   text.num_key_value_heads * head_dim, text.vocab_size)


@dataclass(frozen=True)
class StageNeed:
    stage: str
    where: str
    bytes: int
    holds: str


def scoring_bytes_per_token(d: Dims) -> int:
    per_block = (2 * 4 * d.hidden                      # two RMSNorm inputs in FP32
                 + 2 * (2 * d.hidden + 2 * d.kv_dim)   # attention: q, k, v and output (BF16)
                 + 2 * 3 * d.intermediate              # MLP: gate, up, silu(gate)*up (BF16)
                 + 2 * (3 * d.hidden + 2 * d.kv_dim + 2 * d.intermediate))  # ΔY of q,k,v,o,gate,up,down
    logits = 12 * d.vocab                              # BF16 logits, FP32 copy and log-softmax
    return int(ACTIVATION_OVERHEAD * (d.layers * per_block + logits))


def forward_bytes_per_token(d: Dims) -> int:
    """A no-grad forward (KL scoring, evaluation): the reference and the scheme's log-probabilities, FP32."""
    return int(ACTIVATION_OVERHEAD * (2 * 4 * d.vocab + 2 * 4 * d.vocab + 4 * (d.hidden + d.intermediate)))


def needs(layout: ModelLayout, d: Dims, tokens: int, largest_shard: int | None) -> list[StageNeed]:
    weights = 2 * layout.total_params
    lm = layout.lm_linear_params
    fp8_copies = lm + 4 * sum(o for g in layout.groups for o, _ in g.shapes)  # FP8 weights + per-channel scales
    score = weights + fp8_copies + tokens * scoring_bytes_per_token(d)
    fwd = weights + fp8_copies + tokens * forward_bytes_per_token(d)
    shard = f"2 x the largest input shard ({largest_shard / 1e9:.2f} GB)" if largest_shard else \
        "2 x the largest input shard"
    served = weights - lm
    disk = sum(weights - int(f * lm) for f in DEFAULT_FRACTIONS.values())
    return [
        StageNeed("score (gradient)", "GPU", score,
                  f"BF16 weights {weights / 1e9:.1f} GB + FP8 copies {fp8_copies / 1e9:.1f} GB + activations for "
                  f"{tokens:,} tokens per batch"),
        StageNeed("score --low-memory", "GPU", score - fp8_copies, "the same without the FP8 copies"),
        StageNeed("score --study (KL)", "GPU", fwd, "weights + FP8 copies + two sets of FP32 log-probabilities"),
        StageNeed("export", "CPU RAM", 2 * largest_shard if largest_shard else 0,
                  f"streams shard by shard: at most {shard} (fp8_static also loads the model to calibrate)"),
        StageNeed("eval", "GPU", fwd, "BF16 weights + one scheme's FP8 layers swapped in place + one batch's log-probabilities (the "
                  "reference's wait in CPU memory)"),
        StageNeed("vLLM, full scheme", "GPU", served, "weights only; vLLM fills the rest with KV cache"),
        StageNeed("checkpoints, default catalog", "disk", disk, f"{len(DEFAULT_FRACTIONS)} schemes"),
    ]


def gpus_needed(nbytes: int) -> dict[str, int]:
    """GPUs of each size that hold `nbytes` with --device-map auto (USABLE of each)."""
    return {name: max(1, math.ceil(nbytes / (USABLE * gib * 2**30))) for name, gib in GPU_SIZES_GIB.items()}


__all__ = ["ACTIVATION_OVERHEAD", "Dims", "StageNeed", "forward_bytes_per_token", "gpus_needed", "needs",
           "scoring_bytes_per_token"]
