"""The study's held-out control measures KL where eval does: positions that predict text."""

import math

import pytest
import torch

from fp8mix.data import shapes
from fp8mix.errors import FP8MixError
from fp8mix.score.batches import make_batches
from fp8mix.score.study import CONTROL_FRACTIONS, control


def _doc(n_blocks):
    return {"blocks": [{"block": b, "rank": b} for b in range(n_blocks)]}


def test_control_kl_is_finite_and_ranks_choices(embedded):
    batches = make_batches(embedded.processor, [shapes.sample("eval", i) for i in range(2)], 2, 1024)
    out = control(embedded.model, embedded.layout, _doc(embedded.layout.n_blocks), batches, "fp8_dynamic")
    assert set(out) == {f"{f:.2f}" for f in CONTROL_FRACTIONS}
    for row in out.values():
        vals = [row["autoquant"], row["first_k"], row["last_k"], *row["random"]]
        assert all(math.isfinite(v) and v > 0 for v in vals)
        assert row["autoquant_blocks"] == list(range(row["blocks"]))  # rank = block index here
        assert row["autoquant"] == pytest.approx(row["first_k"], rel=1e-9)


def test_control_without_text_positions_is_an_error(embedded):
    batch = make_batches(embedded.processor, [shapes.sample("eval", 0)], 1, 1024)[0]
    batch = {**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])}
    with pytest.raises(FP8MixError, match="no text position"):
        control(embedded.model, embedded.layout, _doc(embedded.layout.n_blocks), [batch], "fp8_dynamic")
