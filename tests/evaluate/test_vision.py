"""The vision tower's outputs computed once and reused by every model: the same metrics as computing them per
model, and a scheme that changes the vision tower computes its own."""

import contextlib

import torch
from safetensors.torch import load_file, save_file

from fp8mix.data import sources
from fp8mix.evaluate import metrics
from fp8mix.evaluate.checkpoint import scheme_applied
from fp8mix.evaluate.metrics import evaluate
from fp8mix.evaluate.vision import VisionReuse, touches
from fp8mix.score.batches import make_batches
from uniform_plans import uniform_plan


def _run(loaded, schemes, n=8, per_batch=4):
    samples = sources.embedded("eval", n)
    batches = [samples[k:k + per_batch] for k in range(0, n, per_batch)]
    return evaluate(loaded.model, loaded.processor, batches,
                    lambda s: make_batches(loaded.processor, s, len(s), 1024)[0], schemes)


def test_reused_image_features_give_the_same_metrics(embedded, monkeypatch):
    schemes = {"a": contextlib.nullcontext, "b": contextlib.nullcontext}
    plain = _run(embedded, schemes)
    calls = {"prompts": 0, "generate": 0}
    real_prompts, real_generate = metrics.prompt_batches, metrics.generate

    def prompts(*a, **k):
        calls["prompts"] += 1
        return real_prompts(*a, **k)

    def generate(*a, **k):
        calls["generate"] += 1
        return real_generate(*a, **k)

    monkeypatch.setattr(metrics, "prompt_batches", prompts)
    monkeypatch.setattr(metrics, "generate", generate)
    with VisionReuse(embedded.model, embedded.adapter.vision_path) as vision:
        reused = _run(embedded, schemes)
    assert reused == plain
    # 2 teacher-forced batches and 1 generation batch per model: BF16 computes them, each scheme reuses them
    assert vision.hits == 2 * 3 and not vision.cache
    assert calls == {"prompts": 1, "generate": 3}  # the prompts encoded once; one generate call per model
    holder = embedded.model.get_submodule(embedded.adapter.vision_path.rpartition(".")[0])
    assert "get_image_features" not in vars(holder)  # the model's own method again


def test_a_scheme_that_changes_the_vision_tower_computes_its_own(embedded, tmp_path):
    from fp8mix.export import export_checkpoint

    ckpt = export_checkpoint(None, uniform_plan(None), tmp_path / "full")
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    key = next(k for k in tensors if k.startswith("visual.") and k.endswith(".weight"))
    tensors[key] = tensors[key] * 2
    save_file(tensors, f, metadata={"format": "pt"})
    vision_path = embedded.adapter.vision_path
    changed = []
    with scheme_applied(embedded.model, ckpt, embedded.adapter, changed):
        pass
    assert touches(changed, vision_path) and any(n.startswith(vision_path + ".") for n in changed)
    assert not touches([m for m in changed if not m.startswith(vision_path)], vision_path)

    samples = sources.embedded("eval", 8)
    batch = make_batches(embedded.processor, [s for s in samples if s.images][:2], 2, 1024)[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        with VisionReuse(embedded.model, vision_path) as vision:
            base = embedded.model(**inputs).logits
            with scheme_applied(embedded.model, ckpt, embedded.adapter), vision.suspended(True):
                own = embedded.model(**inputs).logits
            assert vision.hits == 0
            again = embedded.model(**inputs).logits
            assert vision.hits == 1
        with scheme_applied(embedded.model, ckpt, embedded.adapter):
            fresh = embedded.model(**inputs).logits
    assert torch.equal(own, fresh) and not torch.equal(own, base) and torch.equal(again, base)
