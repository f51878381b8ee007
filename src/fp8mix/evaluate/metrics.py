"""Quality of a quantized model against the BF16 reference, on held-out samples with images.

Position t of a sequence predicts token t+1. Two sets of positions are counted, each with its own KL and top-1:

- **text**: token t+1 is a real token (attention mask 1) and not a vision placeholder. The placeholders are the
  config's `image_token_id` and `video_token_id` (the pad tokens the vision tower's embeddings replace) and
  `vision_start_token_id` / `vision_end_token_id`: the processor puts those markers around every image, their
  place is fixed by the number of image patches, and a served model never writes them into a reply, so
  predicting them says nothing about the language model's text. System prompt, user text and chat-template
  tokens are text and count.
- **reply**: token t+1 is labelled (labels != -100: the assistant replies and their closing end-of-turn token),
  and is text. This is what a served model generates.

KL is KL(p_BF16 ‖ p_scheme) in nats per position, from the full distributions. Perplexity is over the labelled
tokens. Every average must have a counted position: an empty set is an error, never a silent 0 or 1; so is a
non-finite logit at a counted position, never a NaN figure.

A served model gives only its top-k log-probabilities (and the prompt token's own), so KL as served is measured
coarse-grained (`coarse_kl`): over S = the tokens in both models' top-k plus the position's actual token, and one
bucket for every other token. Merging outcomes never increases a KL divergence (the data-processing / log-sum
inequality), so this top-k KL is a lower bound of the full KL; transformers rows carry it too (`kl_topk_*`,
computed the same way from their full distributions), so emulated and served figures compare like with like.

Memory: the BF16 reference is needed position by position beside each scheme's output. It is never held for the
whole evaluation set: the batches are taken in chunks whose reference logits (kept in the model's dtype, from
which the log-probabilities are recomputed exactly; on the GPU while half of its free memory holds them, else on
the CPU) fit `reference_budget` bytes, and every scheme is swapped in once per chunk. A chunk holds at least one
batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..data.samples import ChatSample, model_inputs
from ..errors import FP8MixError
from ..timing import Phases
from .accuracy import accuracy_of, flips, generate, prompt_batches

# Config attributes naming the vision placeholder tokens (Qwen2-VL / Qwen2.5-VL naming); absent ones are skipped.
PLACEHOLDER_CONFIG_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
REFERENCE = "bf16"
# Bytes of BF16 reference logits held at once (at least one batch's). Each chunk costs one swap per scheme (about
# 1 s at 3B on an H200, BENCHMARKS.md); at 3B a batch of 8 samples of ~1.3 k tokens holds 2.7 GB, so 3 a chunk.
REFERENCE_BUDGET = 8 << 30
SLICE = 1024                # positions whose log-probabilities are compared at once
TOP_K = 20                  # top-k of the coarse-grained KL: vLLM's default max_logprobs


def placeholder_ids(config) -> list[int]:
    """The token ids that mark or stand for images and videos in the input (see the module docstring)."""
    ids = {getattr(config, k, None) for k in PLACEHOLDER_CONFIG_KEYS}
    return sorted(int(i) for i in ids if i is not None)


def counted_positions(batch: dict, placeholders: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(text, reply): boolean masks of shape [batch, seq - 1]; entry t says whether position t counts (it predicts
    token t + 1)."""
    nxt = batch["input_ids"][:, 1:]
    text = batch["attention_mask"][:, 1:].bool() & ~torch.isin(nxt, torch.tensor(placeholders, device=nxt.device))
    reply = text & (batch["labels"][:, 1:] != -100)
    return text, reply


def coarse_kl(p_lp: torch.Tensor, q_lp: torch.Tensor) -> torch.Tensor:
    """Per row, KL(p ‖ q) over a partition: each token whose log-probability is finite in the row (the same
    tokens in both), and one bucket for the rest of the vocabulary (1 - the listed mass). A lower bound of the
    full KL (see the module docstring). Float64; never negative."""
    p_lp, q_lp = p_lp.double(), q_lp.double()
    listed = torch.isfinite(p_lp)
    p = torch.where(listed, p_lp.exp(), 0.0)
    q = torch.where(listed, q_lp.exp(), 0.0)
    kl = torch.where(listed, p * (p_lp - torch.where(listed, q_lp, 0.0)), 0.0).sum(-1)
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    q_rest = (1 - q.sum(-1)).clamp_min(1e-30)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-30).log() - q_rest.log()), 0.0)
    return (kl + rest).clamp_min(0)


def topk_partition(ref_lp: torch.Tensor, lp: torch.Tensor, targets: torch.Tensor, k: int = TOP_K
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`coarse_kl`'s inputs from full log-probabilities [n, vocab]: the log-probabilities of S (the tokens in
    both top-k lists, plus the actual next token `targets`), -inf elsewhere; [n, 2k + 1] each."""
    ref_top = ref_lp.topk(k, dim=-1).indices
    top = lp.topk(k, dim=-1).indices
    cand = torch.cat([ref_top, top, targets[:, None]], dim=1)
    in_both = (cand[..., None] == ref_top[:, None, :]).any(-1) & (cand[..., None] == top[:, None, :]).any(-1)
    n = cand.shape[1]
    earlier = torch.ones(n, n, dtype=torch.bool, device=cand.device).tril(-1)
    first = ~((cand[:, :, None] == cand[:, None, :]) & earlier).any(-1)
    keep = (in_both | (cand == targets[:, None])) & first
    ninf = torch.tensor(float("-inf"), dtype=ref_lp.dtype, device=ref_lp.device)
    return (torch.where(keep, ref_lp.gather(1, cand), ninf), torch.where(keep, lp.gather(1, cand), ninf))


@dataclass
class Outputs:
    """One model's outputs on one batch, at the batch's text positions."""

    logits: torch.Tensor   # [n_text, vocab], the model's dtype
    targets: torch.Tensor  # [n_text] the token each position predicts
    reply: torch.Tensor    # [n_text] bool: the reply positions among them
    nll: float             # summed over the labelled tokens
    n_labelled: int


@torch.no_grad()
def outputs(model, batch: dict, placeholders: list[int], keep_on=None) -> Outputs:
    """Run `model` on `batch`; keep the logits at the text positions (on `keep_on`, default their device)."""
    logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1]
    text, reply = (m.to(logits.device) for m in counted_positions(batch, placeholders))
    labels = batch["labels"][:, 1:].to(logits.device)
    labelled = labels != -100
    logp = F.log_softmax(logits[labelled].float(), dim=-1)
    nll = -logp.gather(-1, labels[labelled].unsqueeze(-1)).sum()
    targets = batch["input_ids"][:, 1:].to(logits.device)[text]
    return Outputs(logits[text].to(keep_on or logits.device), targets.to(keep_on or logits.device), reply[text],
                   float(nll), int(labelled.sum()))


def finite(out: Outputs, who: str) -> Outputs:
    """`out`, once every logit at its positions is finite (a NaN or inf would make every average NaN)."""
    bad = int((~torch.isfinite(out.logits.sum(-1, dtype=torch.float32))).sum())
    if bad:
        raise FP8MixError(f"{who} gives non-finite logits at {bad} of {out.logits.shape[0]} text positions of the "
                          "evaluation set: no KL, agreement or perplexity can be averaged over them")
    return out


@dataclass
class Tally:
    """One model's metrics, accumulated batch by batch against the reference (served rows have no full KL)."""

    kl: list[torch.Tensor] = field(default_factory=list)       # per text position, float64
    kl_topk: list[torch.Tensor] = field(default_factory=list)  # per text position, float64 (`coarse_kl`)
    agree: list[torch.Tensor] = field(default_factory=list)    # per text position, bool
    reply: list[torch.Tensor] = field(default_factory=list)    # per text position, bool
    nll: float = 0.0
    n_labelled: int = 0
    replies: list[str] = field(default_factory=list)           # greedy replies, in sample order

    def add(self, ref: Outputs, got: Outputs) -> None:
        device = got.logits.device
        for k in range(0, got.logits.shape[0], SLICE):  # bounded scratch: a slice of positions at a time
            sl = slice(k, k + SLICE)
            ref_lp = F.log_softmax(ref.logits[sl].to(device).float(), dim=-1)
            lp = F.log_softmax(got.logits[sl].float(), dim=-1)
            kl = F.kl_div(lp, ref_lp, reduction="none", log_target=True).sum(-1)
            self.kl.append(kl.double().clamp_min(0).cpu())
            self.kl_topk.append(coarse_kl(*topk_partition(ref_lp, lp, got.targets[sl].to(device))).cpu())
            self.agree.append((lp.argmax(-1) == ref_lp.argmax(-1)).cpu())
        self.count(got.reply, got.nll, got.n_labelled)

    def add_reference(self, ref: Outputs) -> None:
        """The reference against itself: KL exactly 0 and full agreement, over the same positions."""
        self.kl.append(torch.zeros(ref.logits.shape[0], dtype=torch.float64))
        self.kl_topk.append(torch.zeros(ref.logits.shape[0], dtype=torch.float64))
        self.agree.append(torch.ones(ref.logits.shape[0], dtype=torch.bool))
        self.count(ref.reply, ref.nll, ref.n_labelled)

    def count(self, reply: torch.Tensor, nll: float, n_labelled: int) -> None:
        """Which of the positions just added are reply positions; the summed NLL of the labelled tokens."""
        self.reply.append(reply.cpu())
        self.nll += nll
        self.n_labelled += n_labelled

    def row(self, samples: list[ChatSample], reference_replies: list[str]) -> dict:
        kl, kl_topk, agree, reply = (torch.cat(t).numpy() if t else np.zeros(0)
                                     for t in (self.kl, self.kl_topk, self.agree, self.reply))
        reply = reply.astype(bool)
        empty = ("text" if agree.size == 0 else "labelled reply" if self.n_labelled == 0
                 else "reply" if not reply.any() else None)
        if empty:
            raise FP8MixError(f"the evaluation set has no {empty} token to average over (KL, top-1 agreement, "
                              "perplexity): every sample needs text and a final assistant reply; check --data")
        full = {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
                "kl_reply_mean": float(kl[reply].mean()), "kl_reply_p99": float(np.percentile(kl[reply], 99))
                } if kl.size else {}
        return {
            **full,
            "kl_topk_mean": float(kl_topk.mean()), "kl_topk_reply_mean": float(kl_topk[reply].mean()),
            "top1_agreement": float(agree.mean()), "n_text_positions": int(agree.size),
            "top1_reply_agreement": float(agree[reply].mean()), "n_reply_positions": int(reply.sum()),
            "ppl": float(np.exp(self.nll / self.n_labelled)), "n_labelled_tokens": self.n_labelled,
            **accuracy_of(self.replies, samples),
            "flips_vs_bf16": flips(self.replies, reference_replies),
        }


def reference_device(logits_device: torch.device, held: int, size: int):
    """Where a batch's reference logits (`size` bytes) wait for the schemes: on the GPU that computes the logits
    while the references held there (`held` bytes) stay within half of what is free for them, else on the CPU.
    Kept on the GPU, they are not copied back for every scheme."""
    if logits_device.type != "cuda":
        return "cpu"
    free, _total = torch.cuda.mem_get_info(logits_device)
    return logits_device if held + size <= (free + held) // 2 else "cpu"


def evaluate(model, processor, batch_samples: list[list[ChatSample]], make_batch: Callable[[list[ChatSample]], dict],
             schemes: dict[str, Callable[[], AbstractContextManager]], reference_budget: int = REFERENCE_BUDGET,
             progress: Callable[[Iterable, str], Iterable] = lambda items, _description: items,
             phases: dict[str, Phases] | None = None) -> dict[str, dict]:
    """Rows of metrics: the BF16 model (`model` as it is) under "bf16", and each scheme (`model` inside the
    context manager that `schemes[name]()` returns), on the batches `make_batch(batch_samples[i])`.

    Batches are made as they are reached, and the BF16 reference logits are kept for one chunk of batches at a
    time (on the GPU where it has room, else on the CPU: `reference_device`): a chunk grows until the next batch's
    reference would take it past `reference_budget` bytes (a chunk holds at least one batch), then every scheme is
    swapped in once and compared on the chunk. So at most the budget (or one batch's reference, if larger) is held,
    however large the evaluation set. The greedy replies are generated per chunk, up to GENERATE_BATCH prompts at
    once, from prompts encoded once for all the models.
    `progress(items, description)` counts the steps (a batch through one model). `phases`, when given, gets each
    model's seconds by phase: apply (the scheme swapped in) and restore, forward (teacher-forced), compare (the
    metrics against the reference), generate (greedy replies); the reference also encode (the batches and
    prompts made)."""
    if REFERENCE in schemes:
        raise FP8MixError(f"a scheme is named {REFERENCE!r}, the BF16 reference's name: rename it in the catalog")
    placeholders = placeholder_ids(model.config)
    tallies = {name: Tally() for name in (REFERENCE, *schemes)}
    phases = {} if phases is None else phases
    for name in (REFERENCE, *schemes):
        phases[name] = Phases()
    chunk: list[tuple[dict, list[ChatSample], Outputs]] = []
    # one step per batch and model, in whatever order the chunks take; next(steps) as each step starts
    steps = iter(progress(range(len(batch_samples) * (1 + len(schemes))),
                          f"evaluating BF16 and {len(schemes)} scheme(s)"))
    device = next(model.parameters()).device  # where generate takes its inputs

    def compare_chunk() -> None:
        with phases[REFERENCE]("encode"):
            lengths = [int(n) for batch, _, _ in chunk for n in batch["attention_mask"].sum(1).tolist()]
            prompts = prompt_batches(processor, [s for _, group, _ in chunk for s in group], device, lengths=lengths)
        with phases[REFERENCE]("generate"):
            tallies[REFERENCE].replies += generate(model, processor, prompts)
        for name, applied in schemes.items():
            ph = phases[name]
            with ExitStack() as stack:
                with ph("apply"):
                    stack.enter_context(applied())
                for batch, _samples, ref in chunk:
                    next(steps)
                    with ph("forward"):
                        got = finite(outputs(model, batch, placeholders), f"scheme {name!r}")
                    with ph("compare"):
                        tallies[name].add(ref, got)
                with ph("generate"):
                    tallies[name].replies += generate(model, processor, prompts)
                with ph("restore"):
                    stack.close()
        chunk.clear()

    head = model.get_output_embeddings().weight  # the logits' width and dtype
    held = held_on_gpu = 0
    for samples in batch_samples:
        next(steps)
        with phases[REFERENCE]("encode"):
            batch = make_batch(samples)
        size = int(counted_positions(batch, placeholders)[0].sum()) * head.shape[0] * head.element_size()
        if chunk and held + size > reference_budget:  # before this batch's reference exists
            compare_chunk()
            held = held_on_gpu = 0
        keep_on = reference_device(head.device, held_on_gpu, size)
        with phases[REFERENCE]("forward"):
            ref = finite(outputs(model, batch, placeholders, keep_on=keep_on), "the BF16 model")
        tallies[REFERENCE].add_reference(ref)
        chunk.append((batch, samples, ref))
        held += size
        held_on_gpu += size if keep_on != "cpu" else 0
    if chunk:
        compare_chunk()
    for _ in steps:  # ends the progress display
        pass
    samples = [s for group in batch_samples for s in group]
    return {name: t.row(samples, tallies[REFERENCE].replies) for name, t in tallies.items()}
