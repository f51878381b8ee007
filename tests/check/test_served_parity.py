"""Served parity: fp8mix computes the embedded model the way vLLM's CPU build serves it.

On the image questions of the run's 64-sample evaluation set, with the same prompt tokens on both sides (checked):
- BF16: fp8mix's greedy answers (its eval path, `greedy_replies`) equal vLLM's on >= 95 % of the questions, and
  at the reply tokens of each full conversation fp8mix's most likely token equals vLLM's (its top-k prompt
  logprobs) at >= 99 % of the positions;
- the full FP8 scheme, emulated by fp8mix (`scheme_applied`) and served by vLLM from the exported checkpoint:
  >= 90 % equal answers.
vLLM serves the samples on the engines of the live check (the `live_checked` fixture): no engine start of its own.
A batch that loses the processor's `mm_token_type_ids` gives image tokens 1-D positions where vLLM uses M-RoPE;
these tests fail on it.
"""

from __future__ import annotations

import pytest
import torch

from fp8mix.check.live import served_outputs, vllm_python
from fp8mix.data.samples import encode, model_inputs
from fp8mix.evaluate.accuracy import greedy_replies
from fp8mix.evaluate.checkpoint import scheme_applied

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(vllm_python() is None, reason="vLLM not importable and .venv-vllm missing: "
                                                                 "make vllm-env builds it")]

ANSWERS_EQUAL_BF16 = 0.95
TOP1_AGREE_BF16 = 0.99
ANSWERS_EQUAL_FP8 = 0.90
BATCH = 16


def _ids(enc: dict, row: int) -> list[int]:
    return enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()


def _prompt_mismatches(processor, pairs, served) -> list[str]:
    """Samples whose prompt token ids differ between fp8mix's batches and vLLM's chat rendering."""
    bad = []
    for i, s in pairs:
        for kind, gen in (("reply", True), ("conversation", False)):
            mine = _ids(encode(processor, [s], for_generation=gen), 0)
            theirs = served[f"eval/{i}/{kind}"]["prompt_token_ids"]
            if mine != theirs:
                first = next((j for j, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
                bad.append(f"sample {i} {kind}: {len(mine)} vs {len(theirs)} tokens, first difference at {first}")
    return bad


@torch.no_grad()
def _reply_top1(model, processor, pairs, served) -> tuple[int, int, list[str]]:
    """(agreeing positions, positions, first disagreements) over every reply token of every conversation:
    fp8mix's argmax of the logits predicting it against vLLM's rank-1 prompt logprob there."""
    agree = total = 0
    where = []
    for k in range(0, len(pairs), BATCH):
        chunk = pairs[k:k + BATCH]
        enc = encode(processor, [s for _, s in chunk])
        logits = model(**model_inputs(enc), use_cache=False).logits
        for row in range(logits.shape[0]):
            i = chunk[row][0]
            plp = served[f"eval/{i}/conversation"]["prompt_logprobs"]
            for j in (enc["labels"][row] != -100).nonzero().flatten().tolist():
                mine = int(logits[row, j - 1].argmax())
                theirs = plp[j]["top"][0][0]
                agree += mine == theirs
                total += 1
                if mine != theirs and len(where) < 3:
                    where.append(f"sample {i} token {j}: fp8mix {mine}, vLLM {theirs}")
    return agree, total, where


def _equal_answers(pairs, mine: list[str], served: dict) -> tuple[int, list[str]]:
    theirs = [served[f"eval/{i}/reply"]["text"].strip() for i, _ in pairs]
    diff = [f"sample {i}: fp8mix {a!r}, vLLM {b!r}" for (i, _), a, b in zip(pairs, mine, theirs) if a != b]
    return len(mine) - len(diff), diff


def test_bf16_served_parity(embedded, check_run, live_checked, parity_samples):
    model, processor = embedded.model, embedded.processor
    served = served_outputs(check_run.run, "bf16")
    n = len(parity_samples)
    assert n >= 30, n

    mismatches = _prompt_mismatches(processor, parity_samples, served)
    equal, diff = _equal_answers(parity_samples, greedy_replies(model, processor, [s for _, s in parity_samples]),
                                 served)
    agree, total, where = _reply_top1(model, processor, parity_samples, served)
    print(f"\nBF16 served parity: {n} questions; prompt token mismatches {len(mismatches)}; equal answers "
          f"{equal}/{n} ({equal / n:.1%}); reply-token top-1 agreement {agree}/{total} ({agree / total:.2%})")
    assert not mismatches, f"vLLM's prompt tokens differ from fp8mix's on {len(mismatches)}: {mismatches[:3]}"
    assert equal / n >= ANSWERS_EQUAL_BF16, (
        f"fp8mix and vLLM give the same greedy answer on {equal}/{n} questions ({equal / n:.1%} < "
        f"{ANSWERS_EQUAL_BF16:.0%}); {diff[:3]}")
    assert agree / total >= TOP1_AGREE_BF16, (
        f"reply-token top-1 agreement fp8mix vs vLLM {agree}/{total} ({agree / total:.2%} < "
        f"{TOP1_AGREE_BF16:.0%}); {where}")


def test_fp8_full_emulated_vs_served(embedded, check_run, live_checked, parity_samples):
    name = "fp8_autoquant_full"
    assert live_checked[name]["live"]["ok"], live_checked[name]["live"]["errors"]
    served = served_outputs(check_run.run, name)
    mismatches = _prompt_mismatches(embedded.processor, parity_samples, served)  # vLLM read the checkpoint's files
    assert not mismatches, f"vLLM's prompt tokens for {name} differ from fp8mix's on {len(mismatches)}: {mismatches[:3]}"
    with scheme_applied(embedded.model, check_run.run / "checkpoints" / name, embedded.adapter) as fp8:
        assert fp8, "the checkpoint holds no FP8 layer"
        mine = greedy_replies(embedded.model, embedded.processor, [s for _, s in parity_samples])
    n = len(parity_samples)
    equal, diff = _equal_answers(parity_samples, mine, served)
    bf16 = served_outputs(check_run.run, "bf16")
    flips = sum(served[f"eval/{i}/reply"]["text"] != bf16[f"eval/{i}/reply"]["text"] for i, _ in parity_samples)
    print(f"\nFP8 full, emulated by fp8mix vs served by vLLM: equal answers {equal}/{n} ({equal / n:.1%}); "
          f"served FP8 answers that differ from served BF16: {flips}/{n}")
    assert equal / n >= ANSWERS_EQUAL_FP8, (
        f"{name}: fp8mix's emulation and vLLM give the same greedy answer on {equal}/{n} questions "
        f"({equal / n:.1%} < {ANSWERS_EQUAL_FP8:.0%}); {diff[:3]}")
