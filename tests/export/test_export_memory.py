"""Export streams shard by shard: its peak CPU memory stays within 2x the largest input shard, on the embedded
model and on a multi-shard checkpoint made here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fp8mix.models import loading
from random_models import add_embedded_processor
from uniform_plans import write_uniform_plan

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")


def _measure(model: str, plan: Path, out: Path) -> dict:
    script = Path(__file__).with_name("export_memory.py")
    r = subprocess.run([sys.executable, str(script), model, str(plan), str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\nexport of {doc['shards']} shard(s), largest {doc['largest_shard'] / 1e6:.1f} MB: peak "
          f"{doc['peak_above_start'] / 1e6:.1f} MB above the start ({doc['peak_above_start'] / doc['largest_shard']:.2f}x)")
    return doc


def test_embedded_export_peak_within_twice_its_shard(tmp_path):
    doc = _measure("embedded", write_uniform_plan(None, tmp_path / "plan.json"), tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert doc["peak_above_start"] <= 2 * doc["largest_shard"]


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory):
    """A random Qwen2.5-VL of about 290 MB in BF16, saved in shards of at most 80 MB (published checkpoints: shards
    of ~5 GB, tensors of at most ~0.5 GB), with the embedded model's tokenizer and processor files."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = json.loads((loading.EMBEDDED / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    text.pop("layer_types", None)  # one entry per layer: rebuilt for the new depth
    text.update(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                num_key_value_heads=4)
    if "text_config" in cfg:
        cfg["hidden_size"] = 768
    cfg["vision_config"]["out_hidden_size"] = 768
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(cfg)).to(torch.bfloat16)
    out = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(out, max_shard_size="80MB")
    add_embedded_processor(out)
    return out


def test_sharded_export_peak_within_twice_the_largest_shard(sharded_model, tmp_path):
    doc = _measure(str(sharded_model), write_uniform_plan(sharded_model, tmp_path / "plan.json"), tmp_path / "out")
    assert doc["shards"] >= 4
    assert doc["peak_above_start"] <= 2 * doc["largest_shard"]
    outs = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(outs) == doc["shards"]  # one output shard per input shard
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in outs}
