"""Greedy replies and what is read off them: answer accuracy against the samples' reference answers, and flips
against the BF16 model's own replies (which need no reference answer).

Replies and answers are compared normalised (`normalise`): the first sentence only, case folded, punctuation
dropped, whitespace collapsed. So "The circle." and "the circle" agree, and so do a short reference answer and
a reply that states it and then goes on. The exact match of the stripped texts is kept beside it.
"""

from __future__ import annotations

import re
import unicodedata
from contextlib import contextmanager

import torch
from transformers import GenerationConfig

from ..data.samples import ChatSample, encode

REPLY_TOKENS = 32  # greedy tokens generated per reply
# Prompts the eval generates at once. A generate call costs REPLY_TOKENS decode steps whatever its batch (at these
# sizes a step's time is that of reading the weights and launching the kernels): the default 64 samples take one.
GENERATE_BATCH = 64
GENERATE_TOKENS = 1 << 16  # and padded prompt tokens at once (the default data: 64 samples of at most ~650 tokens)
# A sentence ends at . ! or ? followed by whitespace, or at a line break ("3.5 cm" does not end one).
SENTENCE_END = re.compile(r"(?<=[.!?])\s|\n")


def with_shuffled_images(samples: list[ChatSample]) -> list[ChatSample]:
    """Give every sample the images of the next one (the control that shows whether the images matter)."""
    imgs = [s.images for s in samples]
    imgs = imgs[1:] + imgs[:1]
    return [ChatSample(s.messages, im, s.answer, s.source) for s, im in zip(samples, imgs)]


def normalise(text: str) -> str:
    """The first sentence of `text`, case folded, every punctuation character replaced by a space, whitespace
    collapsed and stripped."""
    first = SENTENCE_END.split(text.strip(), maxsplit=1)[0].casefold()
    spaced = "".join(" " if unicodedata.category(c).startswith("P") else c for c in first)
    return " ".join(spaced.split())


def prompt_batches(processor, samples: list[ChatSample], device, batch_size: int = GENERATE_BATCH,
                   lengths: list[int] | None = None, max_tokens: int = GENERATE_TOKENS) -> list[dict]:
    """The samples' prompts (ending with the assistant header), left-padded, on `device`, in order: encoded once,
    so that every model generates from the same tensors. A batch holds up to `batch_size` prompts and, given
    `lengths` (a bound on each prompt's tokens, e.g. its whole conversation's), up to `max_tokens` padded tokens
    (the prefill's activations grow with them)."""
    lengths = lengths or [0] * len(samples)
    groups, longest = [[]], 0
    for i, n in enumerate(lengths):
        if groups[-1] and (len(groups[-1]) == batch_size or (len(groups[-1]) + 1) * max(longest, n) > max_tokens):
            groups.append([])
            longest = 0
        groups[-1].append(samples[i])
        longest = max(longest, n)
    return [{n: t.to(device) for n, t in encode(processor, g, for_generation=True).items()} for g in groups if g]


@contextmanager
def plain_greedy(model):
    """The model's generation config reduced to its special token ids while inside: transformers fills every
    setting a call leaves unset from the model's generation_config.json, and a released checkpoint's may carry
    e.g. repetition_penalty 1.05, which vLLM's explicit greedy SamplingParams do not apply. Both engines then pick
    the argmax token and stop at the same end-of-sequence ids."""
    kept = model.generation_config
    ids = {k: getattr(kept, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
    try:
        yield
    finally:
        model.generation_config = kept


@torch.no_grad()
def generate(model, processor, batches: list[dict], max_new_tokens: int = REPLY_TOKENS) -> list[str]:
    """`model`'s greedy replies to the prompt batches (`prompt_batches`), stripped, in order: the argmax token
    at every step, nothing from the model's own generation settings (`plain_greedy`)."""
    out_texts = []
    with plain_greedy(model):
        for enc in batches:
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            out_texts += processor.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip() for t in out_texts]


def greedy_replies(model, processor, samples: list[ChatSample], max_new_tokens: int = REPLY_TOKENS,
                   batch_size: int = 16) -> list[str]:
    device = next(model.parameters()).device
    return generate(model, processor, prompt_batches(processor, samples, device, batch_size), max_new_tokens)


def accuracy_of(replies: list[str], samples: list[ChatSample]) -> dict:
    """Answer accuracy of `replies` (one per sample) over the samples that have a reference answer: normalised
    (`answer_accuracy`) and exact (`answer_exact_match`); NaN when no sample has an answer. An answer that
    normalises to nothing (empty, or punctuation only) is none: an empty reply would match it."""
    pairs = [(r, s.answer) for r, s in zip(replies, samples, strict=True)
             if s.answer is not None and normalise(s.answer)]
    n = len(pairs)
    return {"answer_accuracy": sum(normalise(r) == normalise(a) for r, a in pairs) / n if n else float("nan"),
            "answer_exact_match": sum(r.strip() == a.strip() for r, a in pairs) / n if n else float("nan"),
            "n_answers": n}


def flips(replies: list[str], reference: list[str]) -> int:
    """How many replies differ, normalised, from the reference model's reply to the same sample."""
    return sum(normalise(a) != normalise(b) for a, b in zip(replies, reference, strict=True))


def answer_accuracy(model, processor, samples: list[ChatSample], shuffle_images: bool = False,
                    batch_size: int = 16) -> float:
    """Normalised answer accuracy of `model`'s greedy replies on the samples that have an answer."""
    scored = [s for s in samples if s.answer is not None]
    if not scored:
        return float("nan")
    if shuffle_images:
        scored = with_shuffled_images(scored)
    return accuracy_of(greedy_replies(model, processor, scored, batch_size=batch_size), scored)["answer_accuracy"]
