"""The served eval's metrics: the top-k KL is a lower bound of the KL and exact with the whole vocabulary; read
off vLLM-shaped outputs (top-k lists and the prompt token's own log-probability) it equals the same estimator
on the full distributions; a mismatch of prompt tokens is an error, not a number."""

import pytest
import torch
import torch.nn.functional as F

from fp8mix.data import sources
from fp8mix.data.samples import encode, model_inputs
from fp8mix.errors import FP8MixError
from fp8mix.evaluate.metrics import Outputs, Tally, coarse_kl, counted_positions, placeholder_ids, topk_partition
from fp8mix.evaluate.served import eval_requests, served_tally


def _pair(n=64, vocab=300, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, vocab, generator=g) * 3
    q = p + scale * torch.randn(n, vocab, generator=g)
    return F.log_softmax(p.double(), -1), F.log_softmax(q.double(), -1), torch.randint(0, vocab, (n,), generator=g)


def test_topk_kl_is_a_lower_bound_and_exact_with_the_whole_vocabulary():
    p, q, t = _pair()
    full = (p.exp() * (p - q)).sum(-1).double()
    for k in (1, 5, 20, 100):
        est = coarse_kl(*topk_partition(p, q, t, k))
        assert (est <= full + 1e-6).all(), k
        assert (est >= 0).all()
    exact = coarse_kl(*topk_partition(p, q, t, p.shape[1]))
    assert torch.allclose(exact, full, rtol=1e-4, atol=1e-7)
    # with k = 20 of 300 tokens the bound already holds most of the KL on these peaked distributions
    assert coarse_kl(*topk_partition(p, q, t, 20)).sum() > 0.5 * full.sum()


def test_topk_partition_counts_each_token_once():
    """S = both top-k lists' common tokens plus the actual token, each once (here the actual token is the most
    likely one, so it is in both lists too)."""
    p, q, _ = _pair(n=8, vocab=30)
    t = p.argmax(-1)
    pl, ql = topk_partition(p, q, t, 5)
    for row in range(8):
        want = (set(p[row].topk(5).indices.tolist()) & set(q[row].topk(5).indices.tolist())) | {int(t[row])}
        listed = torch.isfinite(pl[row])
        assert int(listed.sum()) == len(want)
        assert torch.isclose(pl[row][listed].exp().sum(), p[row].exp()[sorted(want)].sum())
        assert torch.isclose(ql[row][listed].exp().sum(), q[row].exp()[sorted(want)].sum())


def _vllm_shaped(ids: list[int], logp: torch.Tensor, k: int) -> list:
    """What vLLM returns as prompt logprobs for a sequence: entry j is the distribution of token j given < j (its
    own token's logprob and the top-k); entry 0 is None."""
    out = [None]
    for j in range(1, len(ids)):
        row = logp[j - 1]
        top = row.topk(k)
        out.append({"logprob": float(row[ids[j]]), "rank": None,
                    "top": [[int(i), float(v)] for v, i in zip(top.values, top.indices)]})
    return out


def test_served_tally_equals_the_emulated_estimator(embedded):
    """Given the same two distributions, the served path (vLLM-shaped top-k lists) and the emulated path (full
    logits) give the same top-k KL, top-1 agreement and perplexity at the same positions."""
    model, proc = embedded.model, embedded.processor
    samples = sources.held_out("embedded", 3)
    placeholders = placeholder_ids(model.config)
    torch.manual_seed(0)
    served_ref, served_got, emulated = {}, {}, Tally()
    for i, s in enumerate(samples):
        enc = encode(proc, [s])
        with torch.no_grad():
            logits = model(**model_inputs(enc), use_cache=False).logits[0].float()
        noisy = logits + 0.5 * torch.randn_like(logits)
        ids = enc["input_ids"][0].tolist()
        for store, lg in ((served_ref, logits), (served_got, noisy)):
            store[f"eval/{i}/conversation"] = {"prompt_token_ids": ids,
                                               "prompt_logprobs": _vllm_shaped(ids, F.log_softmax(lg, -1), 20)}
            store[f"eval/{i}/reply"] = {"text": "same"}
        text, reply = (m[0] for m in counted_positions(enc, placeholders))
        labels = enc["labels"][0, 1:]
        nll = float(F.cross_entropy(noisy[:-1][labels != -100], labels[labels != -100], reduction="sum"))
        targets = enc["input_ids"][0, 1:][text]
        emulated.add(Outputs(logits[:-1][text], targets, reply[text], 0.0, 0),
                     Outputs(noisy[:-1][text], targets, reply[text], nll, int((labels != -100).sum())))
        emulated.replies.append("same")
    got = served_tally(served_got, served_ref, samples, proc, placeholders, "noisy").row(samples, ["same"] * 3)
    want = emulated.row(samples, ["same"] * 3)
    for key in ("kl_topk_mean", "kl_topk_reply_mean", "top1_agreement", "top1_reply_agreement", "ppl"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-9), key
    assert got["n_text_positions"] == want["n_text_positions"] and got["flips_vs_bf16"] == 0
    assert 0 < got["kl_topk_mean"] <= want["kl_mean"] and "kl_mean" not in got


def test_a_prompt_rendered_differently_is_an_error(embedded):
    proc = embedded.processor
    samples = sources.held_out("embedded", 1)
    ids = encode(proc, samples)["input_ids"][0].tolist()
    plp = [None] + [{"logprob": -1.0, "rank": 1, "top": [[t, -1.0]]} for t in ids[1:]]
    ref = {"eval/0/conversation": {"prompt_token_ids": ids, "prompt_logprobs": plp}, "eval/0/reply": {"text": ""}}
    got = {"eval/0/conversation": {"prompt_token_ids": ids[:-1], "prompt_logprobs": plp[:-1]},
           "eval/0/reply": {"text": ""}}
    with pytest.raises(FP8MixError, match="rendered evaluation sample 0 for scheme"):
        served_tally(got, ref, samples, proc, placeholder_ids(embedded.model.config), "scheme")
    with pytest.raises(FP8MixError, match="lack sample 0"):
        served_tally({}, ref, samples, proc, placeholder_ids(embedded.model.config), "scheme")


def test_eval_requests_cover_every_sample_twice():
    samples = sources.held_out("embedded", 3)
    req = eval_requests(samples)
    assert [r["id"] for r in req.requests] == [f"eval/{i}/{k}" for i in range(3) for k in ("reply", "conversation")]
    assert req.requests[1]["prompt_logprobs"] == 20 and req.requests[0]["max_tokens"] == 32


def test_a_served_output_without_its_reply_or_reference_logprobs_is_an_error(embedded):
    proc, placeholders = embedded.processor, placeholder_ids(embedded.model.config)
    samples = sources.held_out("embedded", 1)
    ids = encode(proc, samples)["input_ids"][0].tolist()
    plp = [None] + [{"logprob": -1.0, "rank": 1, "top": [[t, -1.0]]} for t in ids[1:]]
    full = {"eval/0/conversation": {"prompt_token_ids": ids, "prompt_logprobs": plp}, "eval/0/reply": {"text": ""}}
    no_reply = {"eval/0/conversation": full["eval/0/conversation"]}
    no_logprobs = {**full, "eval/0/conversation": {"prompt_token_ids": ids, "prompt_logprobs": None}}
    for got, ref in ((no_reply, full), (full, no_logprobs)):
        with pytest.raises(FP8MixError, match="lack sample 0"):
            served_tally(got, ref, samples, proc, placeholders, "scheme")


def test_nan_served_log_probabilities_are_an_error(embedded):
    proc, placeholders = embedded.processor, placeholder_ids(embedded.model.config)
    samples = sources.held_out("embedded", 1)
    ids = encode(proc, samples)["input_ids"][0].tolist()
    plp = [None] + [{"logprob": -1.0, "rank": 1, "top": [[t, -1.0]]} for t in ids[1:]]
    nan = [None] + [{"logprob": float("nan"), "rank": 1, "top": [[t, float("nan")]]} for t in ids[1:]]
    ref = {"eval/0/conversation": {"prompt_token_ids": ids, "prompt_logprobs": plp}, "eval/0/reply": {"text": ""}}
    got = {"eval/0/conversation": {"prompt_token_ids": ids, "prompt_logprobs": nan}, "eval/0/reply": {"text": ""}}
    with pytest.raises(FP8MixError, match="NaN log-probabilities for scheme"):
        served_tally(got, ref, samples, proc, placeholders, "scheme")
