"""`fp8mix info` sizes every shipped Qwen2-VL and Qwen3-VL config offline, by hub id."""

import io

import pytest
from rich.console import Console

from fp8mix.models.info import describe

# hub id: (LM blocks, total parameters in billions as published, tied lm_head)
MEMBERS = {"Qwen/Qwen2-VL-2B-Instruct": (28, 2.21, True), "Qwen/Qwen2-VL-7B-Instruct": (28, 8.29, False),
           "Qwen/Qwen2-VL-72B-Instruct": (80, 73.4, False), "Qwen/Qwen3-VL-2B-Instruct": (28, 2.13, True),
           "Qwen/Qwen3-VL-4B-Instruct": (36, 4.44, True), "Qwen/Qwen3-VL-8B-Instruct": (36, 8.77, False),
           "Qwen/Qwen3-VL-32B-Instruct": (64, 33.4, False)}


@pytest.mark.parametrize("hub_id", MEMBERS)
def test_info_sizes_each_member_offline(hub_id):
    out = io.StringIO()
    doc = describe(hub_id, Console(file=out, width=220))
    text = out.getvalue()
    blocks, billions, tied = MEMBERS[hub_id]
    family = "Qwen3-VL" if "Qwen3" in hub_id else "Qwen2-VL"
    assert doc["blocks"] == blocks and doc["groups"] == 4 * blocks
    assert doc["total_params"] / 1e9 == pytest.approx(billions, rel=0.01)
    assert "published config shipped with fp8mix" in text and f"family {family.lower().replace('-', '_')}" in text
    assert ("tied to the embeddings" in text) == tied
    if family == "Qwen3-VL":
        assert "3 deepstack mergers" in text
    st = {k: v["bytes"] for k, v in doc["stages"].items()}
    assert st["score (gradient)"] > st["score --low-memory"] > 2 * doc["total_params"]
    assert st["vLLM, full scheme"] == 2 * doc["total_params"] - doc["lm_linear_params"]
