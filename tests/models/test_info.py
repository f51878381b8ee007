"""`fp8mix info` sizes every shipped family config without weights, and the scoring estimate matches the GPU."""

import io
import json

import pytest
from rich.console import Console

from fp8mix.models import loading, sizing
from fp8mix.models.info import describe

FAMILY = {"3B": 36, "7B": 28, "32B": 64, "72B": 80}


def _describe(model, **kw):
    out = io.StringIO()
    doc = describe(model, Console(file=out, width=200), **kw)
    return doc, out.getvalue()


@pytest.mark.parametrize("size", FAMILY)
def test_info_sizes_each_family_member_from_its_config(size):
    doc, text = _describe(f"Qwen/Qwen2.5-VL-{size}-Instruct")
    assert doc["blocks"] == FAMILY[size] and doc["groups"] == 4 * FAMILY[size]
    assert "published config shipped with fp8mix" in text and "Memory by stage" in text
    st = {k: v["bytes"] for k, v in doc["stages"].items()}
    weights = 2 * doc["total_params"]
    assert st["score (gradient)"] > st["score --low-memory"] > weights
    assert st["score (gradient)"] - st["score --low-memory"] >= doc["lm_linear_params"]  # the FP8 copies
    assert weights - doc["lm_linear_params"] == st["vLLM, full scheme"]
    assert "scoring (--low-memory) fits on" in text


def test_family_grows_and_sizes_scale_with_tokens():
    docs = [_describe(f"Qwen/Qwen2.5-VL-{s}-Instruct")[0] for s in FAMILY]
    params = [d["total_params"] for d in docs]
    assert params == sorted(params) and 3e9 < params[0] < 5e9 and 70e9 < params[-1] < 80e9
    small, big = (_describe("Qwen/Qwen2.5-VL-7B-Instruct", batch_size=b, max_length=512)[0] for b in (1, 4))
    grow = big["stages"]["score (gradient)"]["bytes"] - small["stages"]["score (gradient)"]["bytes"]
    assert grow == 3 * 512 * sizing.scoring_bytes_per_token(sizing.Dims.of(
        loading.build_empty(loading.FIXTURES["Qwen/Qwen2.5-VL-7B-Instruct"])[0].config))


def test_scoring_estimate_matches_the_h100_measurement():
    """BENCHMARKS.md (AutoQuant scoring, H100): the 3B architecture scoring 4 x 512-token batches peaked at
    27.2 GiB with FP8 copies kept; the estimate is fitted to it and must stay within 10 %."""
    doc, _ = _describe("Qwen/Qwen2.5-VL-3B-Instruct", batch_size=4, max_length=512)
    assert doc["stages"]["score (gradient)"]["bytes"] / 2**30 == pytest.approx(27.2, rel=0.10)


def test_info_reads_a_config_file_and_a_folder(tmp_path):
    cfg = tmp_path / "my_config.json"
    cfg.write_text(loading.FIXTURES["Qwen/Qwen2.5-VL-7B-Instruct"].read_text())
    doc, text = _describe(str(cfg))
    assert doc["blocks"] == 28 and "config file" in text
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(json.loads(cfg.read_text())))
    assert _describe(str(folder))[0]["total_params"] == doc["total_params"]


def test_embedded_info_reports_its_shard():
    doc, text = _describe(None)
    assert doc["stages"]["export"]["bytes"] == 2 * (loading.EMBEDDED / "model.safetensors").stat().st_size
