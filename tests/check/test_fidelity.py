"""The live check's comparison with the BF16 source, on hand-made served outputs (no vLLM needed)."""

import math

import pytest

from fp8mix.check.fidelity import TOLERANCES, compare, probe_requests, probe_samples
from fp8mix.evaluate.served import eval_requests


def _out(prompt, tokens, logprobs, tops):
    return {"prompt_token_ids": prompt, "token_ids": tokens, "text": " ".join(map(str, tokens)),
            "continuation": {"token_ids": tokens, "logprobs": logprobs, "ranks": [1] * len(tokens),
                             "top": [[[t, lp]] for t, lp in zip(tops, logprobs)]}}


def _reference(n_probes=4, length=10):
    return {f"probe/{i}": _out([1, 2, 3, i], list(range(10, 10 + length)), [-0.1] * length,
                               list(range(10, 10 + length))) for i in range(n_probes)}


def test_identical_outputs_pass():
    ref = _reference()
    res = compare(ref, ref)
    assert res["errors"] == []
    m = res["metrics"]
    assert m["positions"] == 40 and m["top1_agreement"] == 1.0 and m["mean_logprob_gap"] == 0.0
    assert m["greedy_equal"] == 4


def test_logprob_gap_beyond_tolerance_fails():
    ref = _reference()
    shift = 2 * TOLERANCES["mean_logprob_gap_max"]
    out = {k: _out(v["prompt_token_ids"], v["token_ids"], [lp - shift for lp in v["continuation"]["logprobs"]],
                   v["token_ids"]) for k, v in ref.items()}
    res = compare(out, ref)
    assert math.isclose(res["metrics"]["mean_logprob_gap"], shift)
    assert len(res["errors"]) == 1 and res["errors"][0].startswith("mean logprob gap to the BF16 source")


def test_top1_disagreement_beyond_tolerance_fails():
    ref = _reference()
    out = {}
    for k, v in ref.items():  # every other position predicts another token first
        tops = [t if j % 2 else t + 1 for j, t in enumerate(v["token_ids"])]
        out[k] = _out(v["prompt_token_ids"], v["token_ids"], v["continuation"]["logprobs"], tops)
    res = compare(out, ref)
    assert res["metrics"]["top1_agreement"] == 0.5
    assert any(e.startswith("top-1 agreement with the BF16 source 0.500") for e in res["errors"])


def test_different_prompt_tokens_fail():
    ref = _reference()
    out = dict(ref)
    out["probe/1"] = {**ref["probe/1"], "prompt_token_ids": [1, 2, 3, 1, 99]}
    res = compare(out, ref)
    assert any("probe/1: the prompt's token ids differ from the BF16 source's" in e for e in res["errors"])
    assert res["metrics"]["probes"] == 3


def test_missing_output_fails():
    ref = _reference()
    out = {k: v for k, v in ref.items() if k != "probe/2"}
    assert "probe/2: no teacher-forced output from vLLM" in compare(out, ref)["errors"]


def test_requests():
    """BF16 scores its own replies; a checkpoint scores BF16's; sample requests have unique ids."""
    n = len(probe_samples())
    own = probe_requests(None).requests
    assert len(own) == n and all(r["continuation"] == "generated" for r in own)
    assert sum(1 for r in own if r["images"]) >= 8
    ref = {f"probe/{i}": {"token_ids": [i, i + 1]} for i in range(n)}
    theirs = probe_requests(ref).requests
    assert [r["continuation"] for r in theirs] == [[i, i + 1] for i in range(n)]
    req = eval_requests(probe_samples()[:2], max_tokens=7, top_k=3)
    assert [r["id"] for r in req.requests] == ["eval/0/reply", "eval/0/conversation", "eval/1/reply",
                                              "eval/1/conversation"]
    assert req.requests[0]["max_tokens"] == 7 and req.requests[1]["prompt_logprobs"] == 3
    with pytest.raises(ValueError, match="duplicate request id"):
        req.extend(eval_requests(probe_samples()[:1]))
