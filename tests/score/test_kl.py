"""The KL pieces (fp8mix.score.kl): FP8 variants stacked along the batch dimension, with the vision tower and the
blocks before the first FP8 block replayed, give the scores of full forwards (tests/score/kl_reference.py), also
for Qwen2-VL and for Qwen3-VL (whose deepstack adds vision features after the first blocks); batching by length
changes nothing; the control's figures equal their definition."""

import pytest
import torch

from fp8mix.data import real, shapes
from fp8mix.models import loading
from fp8mix.quant.numerics import FP8Format
from fp8mix.quant.weights import QuantizedWeights
from fp8mix.score import kl
from fp8mix.score.autoquant import kl_scores
from fp8mix.score.batches import fitted, make_batches
from fp8mix.score.study import control
from kl_reference import control_kl_reference, kl_scores_reference
from random_models import qwen2_vl_config, qwen3_vl_config, random_model_folder

# float32 on the CPU; a stacked forward's products are taller than a single forward's, which may round otherwise
REL = 1e-4


def _samples():
    return [shapes.sample("calib", 0), real.photo_sample("calib", 0), real.text_sample("calib", 1),
            real.photo_sample("calib", 2)]


def _kw(loaded):
    m, a = loaded.model, loaded.adapter
    return dict(layers=m.get_submodule(a.blocks_path), vision=m.get_submodule(a.vision_path))


def _assert_close(got, want, firsts):
    assert all(want[k] > 0 for k in firsts) and all(got[k] == 0.0 for k in got if k not in firsts)
    rel = max(abs(got[k] - want[k]) / want[k] for k in firsts)
    assert rel <= REL, rel


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl"])
def family(request, tmp_path_factory):
    config = {"qwen2_vl": qwen2_vl_config, "qwen3_vl": qwen3_vl_config}[request.param]
    return loading.load(str(random_model_folder(tmp_path_factory.mktemp(request.param), config())))


def test_families_kl_pass_equals_the_definition(family):
    """Every group of a 3-block model, stacked by block, with replay; Qwen3-VL's deepstack features are added
    after blocks 0 and 1 (the replayed ones included)."""
    samples, _ = fitted(family.processor, _samples(), 128 * 128, 1024, "calibration")
    batches = make_batches(family.processor, samples, 2, 1024)
    groups = list(family.layout.groups)
    want = kl_scores_reference(family.model, groups, batches, FP8Format.fp8_dynamic)
    got = kl_scores(family.model, groups, batches, FP8Format.fp8_dynamic, **_kw(family))
    _assert_close(got, want, {g.modules[0] for g in groups})


def test_variants_of_a_stack_equal_separate_forwards(embedded):
    """A stack of variants that share modules, differ in others and one with nothing in FP8: each slice gives the
    hidden states of its own forward, with the position ids of the BF16 pass; the instance forwards are put back
    afterwards."""
    model = embedded.model
    batch = make_batches(embedded.processor, _samples()[:2], 2, 1024)[0]
    groups = list(embedded.layout.groups)
    qw = QuantizedWeights(model, [g.modules for g in groups], FP8Format.fp8_dynamic)
    variants = [groups[8].modules + groups[13].modules, groups[13].modules, [], groups[9].modules]
    from fp8mix.evaluate.metrics import placeholder_ids

    rec = kl.Recorded(model, batch, placeholder_ids(model.config), **_kw(embedded))
    assert rec.positions is not None and rec.positions.shape[-2:] == batch["input_ids"].shape
    calls, rope_index = [], model.model.get_rope_index
    model.model.get_rope_index = lambda *a, **k: calls.append(1) or rope_index(*a, **k)
    try:
        stacked = rec.variants(qw, variants, first_block=2)
    finally:
        del model.model.get_rope_index
    assert not calls  # the recorded position ids are given to the variants (no loop over the samples again)
    for names, got in zip(variants, stacked):
        with kl.fp8_modules(qw, names):
            want = kl.text_hidden(model, rec.inputs, rec.text)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(stacked[1], stacked[2]) and torch.equal(stacked[2], rec.hidden)
    assert not [m for m in model.modules() if "forward" in m.__dict__]


def test_kl_scores_do_not_depend_on_the_batching(embedded):
    """By length (longest first, fewer padded tokens) or in order, batches of 3 or 2: the same sums."""
    groups = [g for g in embedded.layout.groups if g.block in (1, 6)]
    samples = _samples() + [real.photo_sample("calib", 5), real.text_sample("calib", 4)]
    in_order, _ = fitted(embedded.processor, samples, None, 1024, "calibration")
    by_length, _ = fitted(embedded.processor, samples, None, 1024, "calibration", by_length=True)
    a = make_batches(embedded.processor, in_order, 3, 1024)
    b = make_batches(embedded.processor, by_length, 2, 1024)
    padded = [sum(x["attention_mask"].numel() for x in bs) for bs in (a, b)]
    assert padded[1] < padded[0]
    lengths = torch.cat([x["attention_mask"].sum(1) for x in b])
    assert lengths.tolist() == sorted(lengths.tolist(), reverse=True)
    got_a = kl_scores(embedded.model, groups, a, FP8Format.fp8_dynamic, **_kw(embedded))
    got_b = kl_scores(embedded.model, groups, b, FP8Format.fp8_dynamic, **_kw(embedded))
    _assert_close(got_b, got_a, {g.modules[0] for g in groups})


def test_control_equals_its_definition(embedded):
    """The control's stacked, replayed figures against full forwards per choice (first-K, last-K, AutoQuant)."""
    batches = make_batches(embedded.processor, [shapes.sample("eval", i) for i in range(3)]
                           + [real.photo_sample("eval", 1)], 2, 1024)
    layout = embedded.layout
    doc = {"blocks": [{"block": b, "rank": (b * 3) % layout.n_blocks} for b in range(layout.n_blocks)]}
    out = control(embedded.model, layout, doc, batches, "fp8_dynamic", **_kw(embedded))
    for row in out.values():
        for key, blocks in (("first_k", range(row["blocks"])),
                            ("last_k", range(layout.n_blocks - row["blocks"], layout.n_blocks)),
                            ("autoquant", row["autoquant_blocks"])):
            want = control_kl_reference(embedded.model, layout, set(blocks), batches, FP8Format.fp8_dynamic)
            assert abs(row[key] - want) <= REL * want, (key, row[key], want)


def test_repeated_follows_the_batch_dimension():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    out = BaseModelOutputWithPooling(last_hidden_state=torch.arange(6.).view(3, 2), pooler_output=torch.ones(2, 4))
    rep = kl.repeated(out, 3)
    assert rep.last_hidden_state.shape == (9, 2) and rep.pooler_output.shape == (6, 4)
    assert torch.equal(rep.last_hidden_state[3:6], out.last_hidden_state)
    assert out.last_hidden_state.shape == (3, 2)  # the recorded output is left as it was
    assert kl.repeated([torch.zeros(2), None], 2)[1] is None


def test_control_uses_the_checkpoints_static_input_scales(embedded):
    """fp8_static: the input scales of the checkpoints the control stands for are calibrated on the calibration
    set (as export does), not on the held-out samples the control measures."""
    held_out = make_batches(embedded.processor, [shapes.sample("eval", 0), real.photo_sample("eval", 1)], 2, 1024)
    calib = make_batches(embedded.processor, [real.text_sample("calib", 0), shapes.sample("calib", 2)], 2, 1024)
    layout = embedded.layout
    doc = {"blocks": [{"block": b, "rank": b} for b in range(layout.n_blocks)]}
    out = control(embedded.model, layout, doc, held_out, "fp8_static", calib_batches=calib, **_kw(embedded))
    row = out["0.25"]
    want = control_kl_reference(embedded.model, layout, set(range(row["blocks"])), held_out, FP8Format.fp8_static,
                                calib_batches=calib)
    other = control_kl_reference(embedded.model, layout, set(range(row["blocks"])), held_out, FP8Format.fp8_static)
    assert abs(want - other) > 1e-3 * want  # the scales matter here
    assert abs(row["first_k"] - want) <= REL * want, (row["first_k"], want)
