import copy

import torch

from fp8mix.data import sources
from fp8mix.evaluate.metrics import compare, reference
from fp8mix.score.batches import make_batches
from fp8mix.quant.numerics import FP8Linear


def _set(model, name, mod):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, mod)


def test_identical_model_gives_zero_kl_and_full_agreement(embedded):
    samples = sources.embedded("eval", 8)
    batches = make_batches(embedded.processor, samples, 8, 1024)
    ref = reference(embedded.model, embedded.processor, batches, samples)
    same = compare(copy.deepcopy(embedded.model), embedded.processor, batches, samples, ref)
    assert same["kl_mean"] == 0.0 and same["kl_p99"] == 0.0
    assert same["top1_agreement"] == 1.0
    assert same["ppl"] == ref.ppl and same["answer_accuracy"] == ref.answer_accuracy
    assert same["n_tokens"] == sum(int(t.numel()) for t in ref.top1)


def test_fp8_block_zero_moves_the_distribution(embedded):
    samples = sources.embedded("eval", 8)
    batches = make_batches(embedded.processor, samples, 8, 1024)
    ref = reference(embedded.model, embedded.processor, batches, samples)
    q = copy.deepcopy(embedded.model)
    for g in embedded.layout.groups_of_block(0):
        for m in g.modules:
            _set(q, m, FP8Linear.from_linear(q.get_submodule(m), "fp8_dynamic"))
    got = compare(q, embedded.processor, batches, samples, ref)
    assert got["kl_mean"] > 0 and got["kl_p99"] >= got["kl_mean"]
    assert 0.5 < got["top1_agreement"] < 1.0
    assert torch.isfinite(torch.tensor(got["ppl"]))
