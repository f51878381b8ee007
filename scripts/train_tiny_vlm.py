"""Train the embedded tiny Qwen2.5-VL that ships inside fp8mix (src/fp8mix/models/embedded/).

    python scripts/train_tiny_vlm.py --out src/fp8mix/models/embedded [--steps 3000] [--device cuda]

Seeded; runs on CPU or GPU. Steps:
1. a byte-level BPE tokenizer (8,192 ids, Qwen2.5-VL's special tokens appended like Qwen's) trained on the real text
   and the task text;
2. a real Qwen2_5_VLConfig architecture: 8 LM blocks, GQA, tied embeddings, a 4-block vision tower with merge 2;
3. training on the image-grounded shapes task (answers need the picture), real photo captions and real-text
   continuation, with the loss on the assistant replies only;
4. held-out answer accuracy with the true images and with the images shuffled across samples;
5. the model (bf16 safetensors), processor and tokenizer files, and a model card with the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fp8mix.data import real, shapes  # noqa: E402
from fp8mix.data.samples import encode  # noqa: E402
from fp8mix.evaluate.accuracy import answer_accuracy  # noqa: E402
from fp8mix.models.processor import CHAT_TEMPLATE, ImageOnlyQwen2_5_VLProcessor, save_processor  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
           "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
           "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
           "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
            r"""\s+(?!\S)|\s+""")
VOCAB = 8192
MIN_PIXELS, MAX_PIXELS = 56 * 56, 168 * 168


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    texts = list(real.text_paragraphs("calib")) + list(real.text_paragraphs("eval"))
    texts += [c for c, _ in real.PHOTOS.values()]
    texts += [m["content"][-1]["text"] for i in range(2000) for m in shapes.sample("train", i).messages]
    texts += ["You are a helpful assistant.", "Describe this photo.", "Continue the text:", "system user assistant"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PAT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB - len(SPECIAL), min_frequency=2,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.add_special_tokens(SPECIAL)
    hf = Qwen2Tokenizer(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                        bos_token=None, clean_up_tokenization_spaces=False, split_special_tokens=False)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_processor(tokenizer):
    from fp8mix.models.processor import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return ImageOnlyQwen2_5_VLProcessor(image_processor=ip, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_config(tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True),
        vision_config=dict(depth=4, hidden_size=128, intermediate_size=512, num_heads=4, out_hidden_size=256,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1, 3]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)


def train_sample(rng: random.Random, i: int):
    r = rng.random()
    if r < 0.80:
        return shapes.sample("train", i)
    if r < 0.88:
        return real.photo_sample("train", i)
    return real.text_sample("train", i)


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, processor, batch_size: int, seed: int):
        self.processor, self.batch_size, self.seed = processor, batch_size, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        step = wid
        while True:
            rng = random.Random(f"{self.seed}:{step}")
            base = step * self.batch_size
            yield encode(self.processor, [train_sample(rng, base + j) for j in range(self.batch_size)])
            step += nw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("src/fp8mix/models/embedded"))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-samples", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds")
    ap.add_argument("--tokenizer-only", action="store_true", help="write the tokenizer and processor files, then stop")
    args = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    args.out.mkdir(parents=True, exist_ok=True)
    if (args.out / "tokenizer.json").is_file():  # the committed tokenizer is reused, so ids stay stable
        tokenizer = AutoTokenizer.from_pretrained(args.out)
    else:
        tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    save_processor(processor, args.out)
    if args.tokenizer_only:
        return
    config = build_config(tokenizer)
    model = Qwen2_5_VLForConditionalGeneration(config).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f} M on {args.device}", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / args.steps)).item()))
    loader = torch.utils.data.DataLoader(Stream(processor, args.batch_size, args.seed), batch_size=None,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)
    model.train()
    running = None
    for step, batch in zip(range(args.steps), loader):
        batch = {k: v.to(args.device) for k, v in batch.items()}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if args.time_budget and time.time() - t0 > args.time_budget:
            print(f"time budget reached at step {step}", flush=True)
            break
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0

    model.eval()
    held_out = shapes.samples("eval", args.eval_samples)
    acc = answer_accuracy(model, processor, held_out, batch_size=64)
    acc_shuffled = answer_accuracy(model, processor, held_out, shuffle_images=True, batch_size=64)
    print(f"held-out answer accuracy {acc:.3f}; images shuffled {acc_shuffled:.3f}", flush=True)

    model = model.to(torch.bfloat16).cpu()
    model.generation_config.do_sample = False
    model.save_pretrained(args.out)
    save_processor(processor, args.out)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    facts = {"steps": step + 1, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
             "params": n_params, "device": device_name, "train_seconds": round(train_s, 1),
             "torch": torch.__version__, "transformers": __import__("transformers").__version__,
             "eval_samples": args.eval_samples, "answer_accuracy": round(acc, 4),
             "answer_accuracy_images_shuffled": round(acc_shuffled, 4), "final_train_loss": round(running, 4)}
    (args.out / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps(facts), flush=True)


if __name__ == "__main__":
    main()
