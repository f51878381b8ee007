"""Quality of a quantized model against the BF16 reference, on held-out samples with images.

Token positions: every non-padding position predicts the next token; KL and top-1 agreement use them all.
Perplexity uses the assistant reply tokens only (the labelled ones). KL is KL(p_BF16 ‖ p_scheme) in nats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data.samples import model_inputs
from .accuracy import answer_accuracy


@dataclass
class Reference:
    """The BF16 model's outputs on the evaluation batches, computed once and shared by every scheme."""

    logprobs: list[torch.Tensor]   # per batch: [tokens, vocab] at the counted positions, in CPU memory
    top1: list[torch.Tensor]
    ppl: float
    answer_accuracy: float


def _positions(batch: dict) -> torch.Tensor:
    mask = batch["attention_mask"].bool().clone()
    mask[:, -1] = False  # the last position predicts nothing in the batch
    return mask


def _nll(logits: torch.Tensor, batch: dict) -> tuple[float, int]:
    labels = batch["labels"][:, 1:].to(logits.device)
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    keep = labels != -100
    picked = logp[keep].gather(-1, labels[keep].unsqueeze(-1)).squeeze(-1)
    return float(-picked.sum()), int(keep.sum())



@torch.no_grad()
def reference(model, processor, batches: list[dict], samples) -> Reference:
    logprobs, top1, nll, n = [], [], 0.0, 0
    for b in batches:
        logits = model(**model_inputs(b), use_cache=False).logits
        pos = _positions(b)
        lp = F.log_softmax(logits.float(), dim=-1)[pos.to(logits.device)]
        logprobs.append(lp.cpu())  # one batch at a time on the GPU; every scheme compares against these
        top1.append(lp.argmax(-1).cpu())
        s, k = _nll(logits, b)
        nll, n = nll + s, n + k
    acc = answer_accuracy(model, processor, samples)
    return Reference(logprobs, top1, float(np.exp(nll / max(n, 1))), acc)


@torch.no_grad()
def compare(model, processor, batches: list[dict], samples, ref: Reference) -> dict:
    kls, agree, nll, n = [], [], 0.0, 0
    for b, ref_lp, ref_top in zip(batches, ref.logprobs, ref.top1):
        logits = model(**model_inputs(b), use_cache=False).logits
        lp = F.log_softmax(logits.float(), dim=-1)[_positions(b).to(logits.device)]
        kls.append(F.kl_div(lp, ref_lp.to(lp.device), reduction="none", log_target=True).sum(-1).cpu())
        agree.append((lp.argmax(-1) == ref_top.to(lp.device)).cpu())
        s, k = _nll(logits, b)
        nll, n = nll + s, n + k
    kl = torch.cat(kls).double().clamp_min(0).numpy()
    return {
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.percentile(kl, 99)),
        "top1_agreement": float(torch.cat(agree).float().mean()),
        "ppl": float(np.exp(nll / max(n, 1))),
        "answer_accuracy": answer_accuracy(model, processor, samples),
        "n_tokens": int(kl.size),
    }


def reference_row(ref: Reference, n_tokens: int) -> dict:
    return {"kl_mean": 0.0, "kl_p99": 0.0, "top1_agreement": 1.0, "ppl": ref.ppl,
            "answer_accuracy": ref.answer_accuracy, "n_tokens": n_tokens}
