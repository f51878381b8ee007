import torch
from scipy.stats import spearmanr
from transformers import Qwen2_5_VLForConditionalGeneration

from random_models import tiny_random_config
from fp8mix.models import Qwen2_5_VLAdapter
from fp8mix.score.autoquant import gradient_scores, kl_scores
from fp8mix.score.batches import calibration_samples, make_batches
from fp8mix.quant.numerics import FP8Format, fp8_linear_forward
from fp8mix.score.settings import AutoQuantSettings


def _random_model_and_batches():
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_random_config()).eval()
    ids = torch.randint(0, 400, (2, 3, 12))
    batches = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]
    return model, batches


def test_one_pass_equals_the_per_module_definition():
    """The shared forward/backward gives, for every module, Σ(∂L/∂Y ⊙ (Y_fp8 − Y))² computed module by module."""
    model, batches = _random_model_and_batches()
    groups = list(Qwen2_5_VLAdapter().layout(model).groups)
    got = gradient_scores(model, groups, batches, FP8Format.fp8_dynamic)
    for name in [groups[0].modules[1], groups[6].modules[0], groups[-1].modules[0]]:
        mod = model.get_submodule(name)
        want = 0.0
        for b in batches:
            cap = {}
            h = mod.register_forward_hook(lambda _m, a, o: cap.update(x=a[0], y=o))
            emb = model.get_input_embeddings()
            h2 = emb.register_forward_hook(lambda _m, _a, o: o.requires_grad_(True))
            loss = model(**b, use_cache=False).loss
            h.remove(), h2.remove()
            (g,) = torch.autograd.grad(loss, cap["y"])
            delta = fp8_linear_forward(cap["x"].detach(), mod.weight, mod.bias, "fp8_dynamic") - cap["y"].detach()
            want += float((g.detach() * delta).square().sum())
        assert abs(got[name] - want) <= 1e-5 * want, (name, got[name], want)
    assert all(v > 0 for v in got.values())
    assert all(p.grad is None for p in model.parameters())  # weights got no gradients


def test_static_format_calibrates_and_scores():
    model, batches = _random_model_and_batches()
    groups = list(Qwen2_5_VLAdapter().layout(model).groups)
    dyn = gradient_scores(model, groups, batches, FP8Format.fp8_dynamic)
    sta = gradient_scores(model, groups, batches, FP8Format.fp8_static)
    assert set(dyn) == set(sta) and all(v > 0 for v in sta.values())
    assert dyn != sta


def test_gradient_agrees_with_kl_on_the_embedded_model(embedded):
    """Both methods find the same sensitive groups (block 0 above all) on the trained model. Mostly photo and text
    samples: the model answers its shapes questions with a loss near 0.02, so shapes-only gradient scores are tiny
    and noisy (measured on 8 catalog samples, mostly shapes: group Spearman 0.44; on these 8: 0.73)."""
    from fp8mix.data import real, shapes

    samples = ([real.photo_sample("calib", i) for i in range(4)] + [real.text_sample("calib", i) for i in range(2)]
               + [shapes.sample("calib", i) for i in range(2)])
    batches = make_batches(embedded.processor, samples, 8, 1024)
    groups = list(embedded.layout.groups)
    g = gradient_scores(embedded.model, groups, batches, FP8Format.fp8_dynamic)
    k = kl_scores(embedded.model, groups, batches, FP8Format.fp8_dynamic)
    gs = [sum(g[m] for m in grp.modules) for grp in groups]
    ks = [k[grp.modules[0]] for grp in groups]
    assert spearmanr(gs, ks)[0] >= 0.6
    blocks = [sum(gs[i] for i, grp in enumerate(groups) if grp.block == b) for b in range(8)]
    assert max(range(8), key=blocks.__getitem__) == 0


def test_images_change_the_scores(embedded):
    with_img = AutoQuantSettings(calib_samples=8)
    text = AutoQuantSettings(calib_samples=8, with_images=False)
    groups = list(embedded.layout.groups)
    a = gradient_scores(embedded.model, groups, make_batches(embedded.processor, calibration_samples(with_img), 8,
                                                             1024), FP8Format.fp8_dynamic)
    b_samples = calibration_samples(text)
    assert all(not s.images for s in b_samples)
    b = gradient_scores(embedded.model, groups, make_batches(embedded.processor, b_samples, 8, 1024),
                        FP8Format.fp8_dynamic)
    assert a != b


def test_low_memory_gives_the_same_scores():
    """Quantizing each weight when used (no FP8 copies kept) scores exactly as the cached weights do."""
    model, batches = _random_model_and_batches()
    groups = list(Qwen2_5_VLAdapter().layout(model).groups)
    for fmt in (FP8Format.fp8_dynamic, FP8Format.fp8_static):
        cached = gradient_scores(model, groups, batches, fmt)
        assert gradient_scores(model, groups, batches, fmt, cache_weights=False) == cached
    assert kl_scores(model, groups, batches, FP8Format.fp8_dynamic, cache_weights=False) == \
        kl_scores(model, groups, batches, FP8Format.fp8_dynamic)


def test_kl_pass_equals_the_definition(embedded):
    """The KL pass (vision tower and earlier blocks replayed from the BF16 pass, lm_head only at the text
    positions, a slice at a time) gives the scores of full forwards with full logits (kl_reference.py). Not
    bitwise by construction: the lm_head's matrix product over the gathered positions may round differently from
    the one over the whole [batch, seq] tensor (float32 ulps in the logits); measured on the embedded model on
    the CPU: bitwise equal."""
    from fp8mix.data import real, shapes
    from kl_reference import kl_scores_reference

    samples = [shapes.sample("calib", 0), real.photo_sample("calib", 0), real.text_sample("calib", 1)]
    batches = make_batches(embedded.processor, samples, 3, 1024)
    groups = [g for g in embedded.layout.groups if g.block in (0, 3, 7)]
    model, adapter = embedded.model, embedded.adapter
    want = kl_scores_reference(model, groups, batches, FP8Format.fp8_dynamic)
    got = kl_scores(model, groups, batches, FP8Format.fp8_dynamic, layers=model.get_submodule(adapter.blocks_path),
                    vision=model.get_submodule(adapter.vision_path))
    assert set(got) == set(want)
    firsts = {g.modules[0] for g in groups}
    assert all(want[k] > 0 for k in firsts) and all(got[k] == 0.0 for k in got if k not in firsts)
    rel = max(abs(got[k] - want[k]) / want[k] for k in firsts)
    assert rel <= 1e-4, rel
    assert "forward" not in model.get_submodule(adapter.vision_path).__dict__  # the class's forward is back


def test_kl_padding_adds_nothing(embedded):
    """Padding positions are not text positions: the same sample with more right padding scores the same."""
    from fp8mix.data import real

    model, adapter = embedded.model, embedded.adapter
    groups = [g for g in embedded.layout.groups if g.block == 2]
    kw = dict(layers=model.get_submodule(adapter.blocks_path), vision=model.get_submodule(adapter.vision_path))
    batch = make_batches(embedded.processor, [real.photo_sample("calib", 2)], 1, 1024)[0]
    base = kl_scores(model, groups, [batch], FP8Format.fp8_dynamic, **kw)
    pad = 5
    padded = {k: torch.cat([v, torch.full((1, pad), -100 if k == "labels" else 0, dtype=v.dtype)], 1)
              if v.dim() == 2 and v.shape[1] == batch["input_ids"].shape[1] else v for k, v in batch.items()}
    again = kl_scores(model, groups, [padded], FP8Format.fp8_dynamic, **kw)
    # equal up to the float32 rounding of another sequence length (measured: 3e-5 relative at most)
    assert all(abs(again[k] - base[k]) <= 2e-4 * base[k] for k in base if base[k]), (again, base)
