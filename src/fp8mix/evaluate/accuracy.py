"""Answer accuracy: exact match of the greedy reply against the sample's reference answer."""

from __future__ import annotations

import torch

from ..data.samples import ChatSample, encode


def with_shuffled_images(samples: list[ChatSample]) -> list[ChatSample]:
    """Give every sample the images of the next one (the control that shows whether the images matter)."""
    imgs = [s.images for s in samples]
    imgs = imgs[1:] + imgs[:1]
    return [ChatSample(s.messages, im, s.answer, s.source) for s, im in zip(samples, imgs)]


@torch.no_grad()
def greedy_replies(model, processor, samples: list[ChatSample], max_new_tokens: int = 12,
                   batch_size: int = 16) -> list[str]:
    device = next(model.parameters()).device
    out_texts = []
    for k in range(0, len(samples), batch_size):
        chunk = samples[k:k + batch_size]
        enc = {n: t.to(device) for n, t in encode(processor, chunk, for_generation=True).items()}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        out_texts += processor.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip() for t in out_texts]


def answer_accuracy(model, processor, samples: list[ChatSample], shuffle_images: bool = False,
                    batch_size: int = 16) -> float:
    scored = [s for s in samples if s.answer is not None]
    if not scored:
        return float("nan")
    if shuffle_images:
        scored = with_shuffled_images(scored)
    replies = greedy_replies(model, processor, scored, batch_size=batch_size)
    return sum(r == s.answer.strip() for r, s in zip(replies, scored)) / len(scored)
