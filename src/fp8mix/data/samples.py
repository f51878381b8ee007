"""Chat samples (image(s) + conversation) and their encoding into model batches."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from PIL import Image


@dataclass(frozen=True)
class ChatSample:
    """One conversation in Hugging Face chat format; `{"type": "image"}` items refer to `images` in order.

    `answer` is the reference text of the last assistant turn, when the sample has one (used for accuracy).
    """

    messages: list[dict]
    images: list[Image.Image] = field(default_factory=list)
    answer: str | None = None
    source: str = "unknown"

    def prompt_messages(self) -> list[dict]:
        """The conversation up to (not including) the last assistant turn."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[:-1]
        return self.messages

    def without_images(self) -> "ChatSample":
        """The same conversation with every image item removed (text-only calibration)."""
        def strip(content):
            if isinstance(content, str):
                return content
            return [c for c in content if c.get("type") != "image"]

        msgs = [{**m, "content": strip(m["content"])} for m in self.messages]
        return ChatSample(msgs, [], self.answer, self.source)

    def fingerprint(self) -> str:
        """A hash of the text and the image pixels: equal fingerprints mean equal samples."""
        h = hashlib.sha256(repr(self.messages).encode())
        for img in self.images:
            h.update(img.tobytes())
        return h.hexdigest()


def user_turn(text: str, n_images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def assistant_turn(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _assistant_label_mask(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """True on the tokens of every assistant reply, its closing <|im_end|> included.

    The chat template gives no offsets, so the replies are found by the token pattern
    `<|im_start|>assistant\n` ... `<|im_end|>`.
    """
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    n = len(header)
    for row, ids in enumerate(input_ids.tolist()):
        i = 0
        while i + n <= len(ids):
            if ids[i:i + n] == header:
                j = i + n
                while j < len(ids) and ids[j] != im_end:
                    j += 1
                mask[row, i + n:min(j + 1, len(ids))] = True
                i = j
            i += 1
    return mask


def model_inputs(batch: dict) -> dict:
    """A batch's model inputs: everything but the labels (for forwards that need no loss)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def encode(processor, samples: list[ChatSample], *, for_generation: bool = False,
           max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenize a batch. Training/scoring batches are right-padded with labels on the assistant replies only;
    generation batches are left-padded prompts that end with the assistant header."""
    texts, images = [], []
    for s in samples:
        msgs = s.prompt_messages() if for_generation else s.messages
        texts.append(processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=for_generation))
        images.extend(s.images)
    tok = processor.tokenizer
    tok.padding_side = "left" if for_generation else "right"
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    enc = processor(text=texts, images=images or None, return_tensors="pt", padding=True, **kwargs)
    enc = dict(enc)
    enc.pop("mm_token_type_ids", None)
    if not for_generation:
        labels = enc["input_ids"].clone()
        labels[~_assistant_label_mask(enc["input_ids"], tok)] = -100
        labels[enc["attention_mask"] == 0] = -100
        enc["labels"] = labels
    return enc
