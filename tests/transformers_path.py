"""transformers' own processor -> model path, the reference of the position parity tests (every family).

The reference is what a user of transformers runs, one sample at a time (no padding):
`processor.apply_chat_template(messages with images, tokenize=True, return_dict=True)` then `model(**inputs)` /
`model.generate(**inputs)`. fp8mix's path batches several samples through `data.samples.encode` (right-padded
for scoring, left-padded for generation)."""

from __future__ import annotations

import torch

from fp8mix.data.samples import encode, model_inputs
from fp8mix.evaluate.accuracy import greedy_replies


def official_inputs(processor, sample, for_generation: bool) -> dict:
    """transformers' own processor path: images given inside the messages, the chat template applied by the
    processor, every output kept."""
    msgs = sample.prompt_messages() if for_generation else sample.messages
    images = iter(sample.images)
    filled = []
    for m in msgs:
        content = m["content"]
        if not isinstance(content, str):
            content = [{"type": "image", "image": next(images)} if c.get("type") == "image" else c for c in content]
        filled.append({**m, "content": content})
    return dict(processor.apply_chat_template(filled, tokenize=True, return_dict=True, return_tensors="pt",
                                              add_generation_prompt=for_generation))


@torch.no_grad()
def assert_scoring_batch_matches(model, proc, samples, atol: float) -> None:
    """A right-padded scoring batch: each row's tokens and logits equal the official path's for its sample."""
    batch = encode(proc, samples)
    assert batch["attention_mask"].sum(1).unique().numel() > 1, "the batch must hold padding"
    logits = model(**model_inputs(batch), use_cache=False).logits
    for row, s in enumerate(samples):
        ref_in = official_inputs(proc, s, for_generation=False)
        n = ref_in["input_ids"].shape[1]
        assert batch["input_ids"][row, :n].equal(ref_in["input_ids"][0])
        torch.testing.assert_close(logits[row, :n], model(**ref_in, use_cache=False).logits[0], atol=atol, rtol=0)


@torch.no_grad()
def assert_generation_batch_matches(model, proc, samples, max_new_tokens: int, atol: float) -> None:
    """A left-padded generation batch: each row's next-token logits and greedy reply (fp8mix's eval path) equal the
    official path's for its sample."""
    batch = encode(proc, samples, for_generation=True)
    assert not bool(batch["attention_mask"][:, 0].all()), "the batch must be left-padded"
    last = model(**model_inputs(batch), use_cache=False).logits[:, -1]
    replies = greedy_replies(model, proc, samples, max_new_tokens=max_new_tokens)
    for row, s in enumerate(samples):
        ref_in = official_inputs(proc, s, for_generation=True)
        torch.testing.assert_close(last[row], model(**ref_in, use_cache=False).logits[0, -1], atol=atol, rtol=0)
        out = model.generate(**ref_in, max_new_tokens=max_new_tokens, do_sample=False)
        ref_text = proc.batch_decode(out[:, ref_in["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
        assert replies[row] == ref_text
