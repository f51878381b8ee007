"""Eval metrics: which positions count, KL and top-1 on exactly those, perplexity, and no average over nothing."""

import contextlib

import pytest
import torch

from fp8mix.data import sources
from fp8mix.errors import FP8MixError
from fp8mix.evaluate.metrics import counted_positions, evaluate, placeholder_ids
from fp8mix.score.batches import make_batches
from fp8mix.quant.numerics import FP8Linear


def _set(model, name, mod):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, mod)


@contextlib.contextmanager
def fp8_block(loaded, block):
    """Block `block` of the model in FP8 (dynamic) inside the context; the BF16 Linears back afterwards."""
    model = loaded.model
    names = [m for g in loaded.layout.groups_of_block(block) for m in g.modules]
    originals = {m: model.get_submodule(m) for m in names}
    for m, lin in originals.items():
        _set(model, m, FP8Linear.from_linear(lin, "fp8_dynamic"))
    try:
        yield
    finally:
        for m, lin in originals.items():
            _set(model, m, lin)


@contextlib.contextmanager
def negated_norm(loaded):
    """The final norm's weight negated: the model's preferences turn upside down (a scheme that flips answers)."""
    w = loaded.model.get_submodule("model.language_model.norm").weight
    with torch.no_grad():
        w.neg_()
    try:
        yield
    finally:
        with torch.no_grad():
            w.neg_()


def _eval_set(loaded, n, per_batch=8):
    samples = sources.embedded("eval", n)
    return samples, [samples[k:k + per_batch] for k in range(0, n, per_batch)]


def _batch(loaded):
    return lambda samples: make_batches(loaded.processor, samples, len(samples), 1024)[0]


def _evaluate(loaded, per_batch, schemes, make_batch=None, **kw):
    return evaluate(loaded.model, loaded.processor, per_batch, make_batch or _batch(loaded), schemes, **kw)


def test_counted_positions_on_a_hand_built_batch(embedded):
    cfg = embedded.model.config
    vs, img, ve = cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id
    pad = -1  # any id: padding is told by the attention mask
    ids = torch.tensor([[10, 11, vs, img, img, img, ve, 12, 13, 14, 15],
                        [20, 21, 22, 23, 24, pad, pad, pad, pad, pad, pad]])
    mask = torch.tensor([[1] * 11, [1] * 5 + [0] * 6])
    labels = torch.full_like(ids, -100)
    labels[0, 9:] = ids[0, 9:]   # the reply of row 0: tokens 14, 15
    labels[1, 3:5] = ids[1, 3:5]  # the reply of row 1: tokens 23, 24
    text, reply = counted_positions({"input_ids": ids, "attention_mask": mask, "labels": labels},
                                    placeholder_ids(cfg))
    # position t predicts token t + 1: row 0 skips the positions predicting <vision_start>, the image pads and
    # <vision_end> (t = 1..5) and keeps the one after the image (t = 6); row 1 stops before the padding
    assert text.nonzero().tolist() == [[0, 0], [0, 6], [0, 7], [0, 8], [0, 9], [1, 0], [1, 1], [1, 2], [1, 3]]
    assert reply.nonzero().tolist() == [[0, 8], [0, 9], [1, 2], [1, 3]]
    assert set(placeholder_ids(cfg)) == {vs, img, ve, cfg.video_token_id}


def _by_hand(loaded, batches, scheme):
    """KL(p_BF16 || p_scheme), top-1 agreement and the reply NLL, position by position in plain Python loops."""
    skip = {loaded.model.config.image_token_id, loaded.model.config.vision_start_token_id,
            loaded.model.config.vision_end_token_id}
    text, reply, nll, n_lab = [], [], 0.0, 0
    for b in batches:
        inputs = {k: v for k, v in b.items() if k != "labels"}
        with torch.no_grad():
            ref = torch.log_softmax(loaded.model(**inputs).logits.double(), -1)
            with scheme():
                got = torch.log_softmax(loaded.model(**inputs).logits.double(), -1)
        for row in range(b["input_ids"].shape[0]):
            ids, att, lab = (b[k][row].tolist() for k in ("input_ids", "attention_mask", "labels"))
            for t in range(len(ids) - 1):
                if lab[t + 1] != -100:
                    nll -= float(got[row, t, lab[t + 1]])
                    n_lab += 1
                if not att[t + 1] or ids[t + 1] in skip:
                    continue
                p = ref[row, t].exp()
                kl = float((p * (ref[row, t] - got[row, t])).sum())
                agree = int(ref[row, t].argmax()) == int(got[row, t].argmax())
                text.append((kl, agree))
                if lab[t + 1] != -100:
                    reply.append((kl, agree))
    return text, reply, nll, n_lab


def test_kl_and_top1_over_text_and_reply_positions_equal_a_hand_computation(embedded):
    samples, per_batch = _eval_set(embedded, 8, per_batch=4)
    rows = _evaluate(embedded, per_batch, {"b0": lambda: fp8_block(embedded, 0)})
    batches = [_batch(embedded)(s) for s in per_batch]
    text, reply, nll, n_lab = _by_hand(embedded, batches, lambda: fp8_block(embedded, 0))
    got = rows["b0"]
    n_all = sum(int(b["attention_mask"].sum()) for b in batches)
    assert got["n_text_positions"] == len(text) < n_all  # image pads left out
    assert got["n_reply_positions"] == len(reply) == n_lab
    kl_text = sum(k for k, _ in text) / len(text)
    kl_reply = sum(k for k, _ in reply) / len(reply)
    assert got["kl_mean"] == pytest.approx(kl_text, rel=1e-4) and got["kl_mean"] > 0
    assert got["kl_reply_mean"] == pytest.approx(kl_reply, rel=1e-4) and got["kl_reply_mean"] != got["kl_mean"]
    assert got["top1_agreement"] == sum(a for _, a in text) / len(text)
    assert got["top1_reply_agreement"] == sum(a for _, a in reply) / len(reply)
    assert got["ppl"] == pytest.approx(float(torch.tensor(nll / n_lab).exp()), rel=1e-5)
    assert got["kl_p99"] >= got["kl_mean"]
    ref = rows["bf16"]
    assert (ref["kl_mean"], ref["kl_reply_mean"], ref["top1_agreement"], ref["flips_vs_bf16"]) == (0.0, 0.0, 1.0, 0)
    assert ref["n_text_positions"] == len(text)


def test_identical_scheme_gives_zero_kl_no_flips_and_the_same_answers(embedded):
    samples, per_batch = _eval_set(embedded, 8)
    rows = _evaluate(embedded, per_batch, {"same": contextlib.nullcontext})
    same, ref = rows["same"], rows["bf16"]
    assert same["kl_mean"] == same["kl_p99"] == same["kl_reply_mean"] == 0.0
    assert same["top1_agreement"] == same["top1_reply_agreement"] == 1.0
    assert same["flips_vs_bf16"] == 0 and same["ppl"] == ref["ppl"]
    assert same["answer_accuracy"] == ref["answer_accuracy"]
    assert same["n_answers"] == sum(s.answer is not None for s in samples) > 0


def test_flips_count_answers_that_change_against_bf16(embedded):
    from fp8mix.evaluate.accuracy import greedy_replies, normalise

    samples, per_batch = _eval_set(embedded, 8)
    rows = _evaluate(embedded, per_batch, {"neg": lambda: negated_norm(embedded)})
    before = greedy_replies(embedded.model, embedded.processor, samples)
    with negated_norm(embedded):
        after = greedy_replies(embedded.model, embedded.processor, samples)
    expected = sum(normalise(a) != normalise(b) for a, b in zip(before, after))
    assert rows["neg"]["flips_vs_bf16"] == expected > 0
    assert rows["neg"]["top1_agreement"] < 0.5


def test_reference_is_held_one_chunk_at_a_time(embedded):
    """With a budget below one batch each batch is its own chunk, and each scheme is swapped in once per chunk;
    the metrics are those of one chunk holding every batch."""
    samples, per_batch = _eval_set(embedded, 8, per_batch=4)
    entered = []

    def scheme():
        entered.append(1)
        return fp8_block(embedded, 1)

    whole = _evaluate(embedded, per_batch, {"b1": scheme})
    assert len(entered) == 1
    entered.clear()
    split = _evaluate(embedded, per_batch, {"b1": scheme}, reference_budget=1)
    assert len(entered) == len(per_batch) == 2
    assert split == whole


def test_no_average_over_zero_tokens(embedded):
    samples, per_batch = _eval_set(embedded, 8)

    def unlabelled(chunk):
        b = _batch(embedded)(chunk)
        return {**b, "labels": torch.full_like(b["labels"], -100)}

    with pytest.raises(FP8MixError, match="no labelled reply token") as err:
        _evaluate(embedded, per_batch, {"same": contextlib.nullcontext}, make_batch=unlabelled)
    assert "\n" not in str(err.value) and "--data" in str(err.value)
    with pytest.raises(FP8MixError, match="no text token"):
        _evaluate(embedded, [], {})


def test_a_scheme_named_like_the_reference_is_an_error(embedded):
    """A scheme called "bf16" would share the reference's tally and row: one clear line before any work."""
    samples, per_batch = _eval_set(embedded, 8)
    with pytest.raises(FP8MixError, match="named 'bf16', the BF16 reference") as err:
        _evaluate(embedded, per_batch, {"bf16": contextlib.nullcontext})
    assert "\n" not in str(err.value)


@contextlib.contextmanager
def nan_norm(loaded):
    """The final norm's weight NaN: every logit of the model is NaN inside the context."""
    w = loaded.model.get_submodule("model.language_model.norm").weight
    old = w.detach().clone()
    with torch.no_grad():
        w.fill_(float("nan"))
    try:
        yield
    finally:
        with torch.no_grad():
            w.copy_(old)


def test_non_finite_logits_are_one_error_line_not_nan_metrics(embedded):
    samples, per_batch = _eval_set(embedded, 8)
    with pytest.raises(FP8MixError, match="broken.*non-finite logits") as err:
        _evaluate(embedded, per_batch, {"broken": lambda: nan_norm(embedded)})
    assert "\n" not in str(err.value)
