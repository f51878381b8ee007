"""Chat samples (image(s) + conversation) and their encoding into model batches."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..errors import FP8MixError


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


def rgb(image: Image.Image) -> Image.Image:
    """The image in RGB as transformers' image processors and vLLM convert it: transparency composited onto white
    (a plain convert("RGB") keeps the colour under transparent pixels, often black)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def user_turn(text: str, n_images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def assistant_turn(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


ASSISTANT_HEADER = "<|im_start|>assistant\n"
END_OF_TURN = "<|im_end|>"
# Images larger than this many pixels are scaled down (aspect kept) before the processor sees them: 512 merged
# 28x28 patches, so that a photo and its text fit the default --max-length of 1024 tokens. Qwen's own default
# (12.8 M pixels, ~16 k tokens) would not fit any scoring batch.
DEFAULT_MAX_PIXELS = 512 * 28 * 28
DEFAULT_MAX_LENGTH = 1024
MAX_ASPECT = 200  # the Qwen image processors' limit on an image's long side over its short side


def _assistant_label_mask(input_ids: torch.Tensor, tokenizer) -> tuple[torch.Tensor, list[int]]:
    """True on the tokens of every assistant reply, its closing <|im_end|> included; and the replies found per row.

    The Qwen chat templates mark no generation span (no `{% generation %}` block), so the replies are found by the
    token pattern `<|im_start|>assistant\n` ... `<|im_end|>` in the rendered, tokenized conversation.
    """
    header = tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)
    im_end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    found = []
    n = len(header)
    for row, ids in enumerate(input_ids.tolist()):
        i, found_here = 0, 0
        while i + n <= len(ids):
            if ids[i:i + n] == header:
                j = i + n
                while j < len(ids) and ids[j] != im_end:
                    j += 1
                mask[row, i + n:min(j + 1, len(ids))] = True
                found_here += 1
                i = j
            i += 1
        found.append(found_here)
    return mask, found


def message_text(content) -> str:
    """A message's text: its string, or its text items joined."""
    if isinstance(content, str):
        return content
    return "".join(c.get("text") or "" for c in content or [] if isinstance(c, dict) and c.get("type") == "text")


def model_inputs(batch: dict) -> dict:
    """A batch's model inputs: everything but the labels (for forwards that need no loss)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def _render(processor, sample: ChatSample, for_generation: bool) -> str:
    msgs = sample.prompt_messages() if for_generation else sample.messages
    return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=for_generation)


def encode(processor, samples: list[ChatSample], *, for_generation: bool = False,
           max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenize a batch: every output of the processor, as transformers' own processor -> model path passes it.

    Qwen2.5-VL needs `mm_token_type_ids` (with `image_grid_thw`) to give image tokens their 3-D M-RoPE positions;
    without it transformers silently falls back to 1-D positions, which is not the model vLLM serves. So nothing the
    processor returns is dropped. Training/scoring batches are right-padded with labels on the assistant replies
    only (an error when a sample has no reply token to supervise); generation batches are left-padded prompts that
    end with the assistant header. Sequences are never truncated (cutting inside an image breaks the sample):
    a sample longer than `max_length` is an error here; `fit_samples` drops such samples beforehand.
    """
    texts = [_render(processor, s, for_generation) for s in samples]
    images = [img for s in samples for img in s.images]
    tok = processor.tokenizer
    tok.padding_side = "left" if for_generation else "right"
    enc = dict(processor(text=texts, images=images or None, return_tensors="pt", padding=True))
    lengths = enc["attention_mask"].sum(1)
    if max_length is not None and int(lengths.max()) > max_length:
        too_long = int((lengths > max_length).sum())
        raise FP8MixError(f"{too_long} sample(s) exceed --max-length {max_length} tokens (longest "
                          f"{int(lengths.max())}); raise --max-length or lower --max-pixels")
    if not for_generation:
        labels = enc["input_ids"].clone()
        mask, found = _assistant_label_mask(enc["input_ids"], tok)
        labels[~mask] = -100
        for k, (s, n) in enumerate(zip(samples, found)):
            replies = [m for m in s.messages if m.get("role") == "assistant"]
            if n < len(replies) and any(message_text(m.get("content"))[:1].isspace() for m in replies):
                # the reply's leading line break merged with the header's "\n" token
                raise FP8MixError(f"sample {k} ({s.source}): {len(replies)} assistant replies, {n} found after the "
                                  f"header {ASSISTANT_HEADER!r} in the tokenized chat; a reply that starts with "
                                  "whitespace merges with the header's line break and would go unsupervised: strip it")
        labels[enc["attention_mask"] == 0] = -100
        unsupervised = int(((labels != -100).sum(1) == 0).sum())
        if unsupervised:
            raise FP8MixError(
                f"{unsupervised} of {len(samples)} sample(s) have no supervised token: fp8mix supervises the assistant "
                f"replies, found after the header {ASSISTANT_HEADER!r} up to {END_OF_TURN!r} in the rendered chat "
                "template, and found none; every sample needs a final assistant reply and the chat template must "
                "render that header (use the model's own Qwen chat template)")
        enc["labels"] = labels
    return enc


def fit_image(image: Image.Image, max_pixels: int) -> Image.Image:
    """The image scaled down (aspect ratio kept, bicubic) to at most `max_pixels` pixels; unchanged if it fits."""
    w, h = image.size
    if w * h <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (w * h))
    size = (max(1, math.floor(w * scale)), max(1, math.floor(h * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def fit_samples(processor, samples: list[ChatSample], max_pixels: int | None = DEFAULT_MAX_PIXELS,
                max_length: int | None = DEFAULT_MAX_LENGTH) -> tuple[list[ChatSample], int]:
    """Samples made to fit: images scaled down to `max_pixels`, then any sample whose full conversation is still
    longer than `max_length` tokens dropped. Returns (kept samples, number dropped). The same fitted images go to
    every engine (transformers and vLLM) so both see the same pixels."""
    kept, _, dropped = fit_and_measure(processor, samples, max_pixels, max_length)
    return kept, dropped


def fit_and_measure(processor, samples: list[ChatSample], max_pixels: int | None = DEFAULT_MAX_PIXELS,
                    max_length: int | None = DEFAULT_MAX_LENGTH) -> tuple[list[ChatSample], list[int | None], int]:
    """`fit_samples`, with each kept sample's token count (its full conversation as `encode` renders it; None
    without `max_length`, when nothing is encoded). Returns (kept samples, their token counts, number dropped)."""
    kept, lengths, dropped = [], [], 0
    for s in samples:
        if max_pixels is not None and s.images:
            s = ChatSample(s.messages, [fit_image(im, max_pixels) for im in s.images], s.answer, s.source)
        for im in s.images:
            if max(im.size) > MAX_ASPECT * min(im.size):
                raise FP8MixError(f"an image of {s.source} is {im.size[0]}x{im.size[1]} pixels: more than "
                                  f"{MAX_ASPECT} times as long as it is wide, which the model's image processor "
                                  "refuses; crop it or leave the sample out")
        n = None
        if max_length is not None:
            enc = processor(text=[_render(processor, s, False)], images=s.images or None, return_tensors="pt")
            n = int(enc["input_ids"].shape[1])
            if n > max_length:
                dropped += 1
                continue
        kept.append(s)
        lengths.append(n)
    return kept, lengths, dropped
