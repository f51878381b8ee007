"""Quality as vLLM serves it: the BF16 source and every checkpoint answer the evaluation set in vLLM, and the
same metrics as the emulated eval are read off what vLLM returns.

Requests per sample i (`eval_requests`): "eval/i/reply", the greedy reply to the prompt (REPLY_TOKENS tokens,
as the emulated eval generates); "eval/i/conversation", the top-k prompt log-probabilities over the whole
conversation (TOP_K). The check stage serves them on the engines of the live check, so a checkpoint is loaded
once; the eval stage reads them back (`checks/served/<name>.json`, matched by the requests' key) and serves only
what is missing.

Metrics (`served_tally`): at the positions the emulated eval counts (text and reply positions, from fp8mix's own
encoding of the sample, whose token ids must equal the ones vLLM rendered), top-1 agreement with BF16 as served,
the top-k (coarse-grained) KL against BF16 as served (`metrics.coarse_kl`: a lower bound of the full KL),
perplexity from the served log-probabilities of the reply tokens, and the greedy replies' accuracy and flips.
"""

from __future__ import annotations

import torch

from ..check.live import RequestSet
from ..data.samples import ChatSample, encode
from ..errors import FP8MixError
from .accuracy import REPLY_TOKENS
from .metrics import TOP_K, Tally, coarse_kl, counted_positions


def eval_requests(samples: list[ChatSample], max_tokens: int = REPLY_TOKENS, top_k: int = TOP_K) -> RequestSet:
    """For each sample i: its greedy reply ("eval/i/reply") and the top-k prompt log-probabilities over its whole
    conversation ("eval/i/conversation")."""
    req = RequestSet()
    for i, s in enumerate(samples):
        req.add_reply(f"eval/{i}/reply", s, max_tokens)
        req.add_conversation(f"eval/{i}/conversation", s, top_k)
    return req


def _partition(p: dict, q: dict, target: int) -> tuple[list[float], list[float]]:
    """S = the tokens in both top-k lists plus the actual token: their log-probabilities under p and q."""
    p_top, q_top = dict(map(tuple, p["top"])), dict(map(tuple, q["top"]))
    p_top.setdefault(target, p["logprob"])
    q_top.setdefault(target, q["logprob"])
    tokens = [t for t in p_top if t in q_top]
    return [p_top[t] for t in tokens], [q_top[t] for t in tokens]


def _rows(pairs: list[tuple[list[float], list[float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(a) for a, _ in pairs)
    p = torch.full((len(pairs), width), float("-inf"), dtype=torch.float64)
    q = p.clone()
    for i, (a, b) in enumerate(pairs):
        p[i, :len(a)] = torch.tensor(a, dtype=torch.float64)
        q[i, :len(b)] = torch.tensor(b, dtype=torch.float64)
    return p, q


def served_tally(outputs: dict, reference: dict, samples: list[ChatSample], processor, placeholders: list[int],
                 who: str) -> Tally:
    """One served model's tally against BF16 as served (`reference`), on the evaluation set `samples`."""
    tally = Tally()
    for i, s in enumerate(samples):
        got, ref = outputs.get(f"eval/{i}/conversation"), reference.get(f"eval/{i}/conversation")
        for name, out in ((who, got), ("bf16", ref)):
            if out is None or out.get("prompt_logprobs") is None or (name == who and f"eval/{i}/reply" not in outputs):
                raise FP8MixError(f"vLLM's outputs for {name} lack sample {i} of the evaluation set; rerun fp8mix eval")
        enc = encode(processor, [s])
        ids = enc["input_ids"][0].tolist()
        for name, out in ((who, got), ("bf16", ref)):
            if out["prompt_token_ids"] != ids:
                raise FP8MixError(f"vLLM rendered evaluation sample {i} for {name} as {len(out['prompt_token_ids'])} "
                                  f"tokens where fp8mix's processor gives {len(ids)}: chat template, tokenizer or "
                                  "image processor config differ between the checkpoint and the source")
        text, reply = (m[0] for m in counted_positions(enc, placeholders))
        labels = enc["labels"][0, 1:]
        pairs, agree = [], []
        for t in text.nonzero().flatten().tolist():
            p, q = ref["prompt_logprobs"][t + 1], got["prompt_logprobs"][t + 1]
            pairs.append(_partition(p, q, ids[t + 1]))
            agree.append(p["top"][0][0] == q["top"][0][0])
        if pairs:
            tally.kl_topk.append(coarse_kl(*_rows(pairs)))
            tally.agree.append(torch.tensor(agree, dtype=torch.bool))
        labelled = (labels != -100).nonzero().flatten().tolist()
        nll = -sum(got["prompt_logprobs"][t + 1]["logprob"] for t in labelled)
        if nll != nll or any(v != v for a, b in pairs for v in (*a, *b)):
            raise FP8MixError(f"vLLM served NaN log-probabilities for {who} (or bf16) on evaluation sample {i}: "
                              "no KL, agreement or perplexity can be averaged over them")
        tally.count(reply[text], nll, len(labelled))
        tally.replies.append(outputs[f"eval/{i}/reply"]["text"].strip())
    return tally


def throughput(doc: dict) -> dict:
    """What the engine start cost and how fast it served (every request of its serve call: the evaluation set
    and the live check's probes): engine start seconds, serve seconds, tokens prefilled + generated per second."""
    outputs = doc.get("outputs", {})
    tokens = sum(len(o.get("prompt_token_ids", [])) + len(o.get("token_ids", [])) +
                 len((o.get("continuation") or {}).get("token_ids", [])) for o in outputs.values())
    t = doc.get("timings_s", {})
    serve_s = t.get("serve")
    return {"engine_start_s": t.get("load"), "serve_s": serve_s, "served_tokens": tokens,
            "tokens_per_s": round(tokens / serve_s, 1) if serve_s else None}
