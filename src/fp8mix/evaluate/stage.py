"""`fp8mix eval`: BF16 and every exported scheme, each loaded from its checkpoint, on the held-out set."""

from __future__ import annotations

import time
from contextlib import contextmanager

from .. import manifest
from ..data import sources
from ..errors import FP8MixError
from ..context import RunOptions, catalog_of, overrides, progress, model_arg
from ..rundir import read_json, write_json
from ..score.batches import calibration_samples, fitted, make_batches
from .checkpoint import checkpoint_bytes, scheme_applied
from .metrics import REFERENCE, evaluate

BATCH_SIZE = 8
VERSION = 2  # eval.json v2: metrics over text and reply positions, normalised accuracy, flips vs BF16
# What each row's fields average over; written into eval.json so that the file explains itself.
POSITIONS = {
    "kl_mean, kl_p99, top1_agreement, n_text_positions":
        "positions predicting a text token: the next token is real (not padding) and not an image/video "
        "placeholder or vision start/end marker; system prompt, user text and chat-template tokens included",
    "kl_reply_mean, kl_reply_p99, top1_reply_agreement, n_reply_positions":
        "positions predicting an assistant reply token (labelled, closing end-of-turn included)",
    "kl": "KL(p_BF16 || p_scheme) per position, nats, from the full distributions",
    "ppl, n_labelled_tokens": "perplexity over the labelled assistant reply tokens",
    "answer_accuracy": "greedy reply vs the sample's reference answer, normalised: first sentence, case folded, "
                       "punctuation dropped, whitespace collapsed (samples with an answer; n_answers)",
    "answer_exact_match": "greedy reply equal to the reference answer, stripped",
    "flips_vs_bf16": "samples whose normalised greedy reply differs from the BF16 model's (every sample)",
}


def stage_eval(opts: RunOptions, n_eval: int = 64) -> dict:
    from ..models import loading

    t0 = time.time()
    catalog, _ = catalog_of(opts)
    over = overrides(opts)
    data = over.get("data", "embedded")
    samples = sources.held_out(data, n_eval)
    calib = {s.fingerprint() for name in catalog.schemes for s in calibration_samples(catalog.settings(name, **over))}
    if calib & {s.fingerprint() for s in samples}:
        raise FP8MixError("the evaluation set shares samples with the calibration set; pass other --data")
    plans = {}
    for name in catalog.schemes:
        ckpt = opts.run / "checkpoints" / name
        if not (ckpt / "config.json").is_file():
            raise FP8MixError(f"{ckpt} is missing: run fp8mix export --run {opts.run} first")
        plans[name] = read_json(opts.run / "plans" / f"{name}.json", "plan")

    loaded = loading.load(model_arg(opts), device=opts.device, device_map=opts.device_map)
    model, proc, adapter = loaded.model, loaded.processor, loaded.adapter
    base = catalog.settings(next(iter(catalog.schemes)), **over)
    samples, dropped = fitted(proc, samples, base.max_pixels, base.max_length, "evaluation")
    lm_linears = set(adapter.all_lm_linears(model))

    def applied(name: str):
        @contextmanager
        def swap():
            ckpt = opts.run / "checkpoints" / name
            with scheme_applied(model, ckpt, adapter) as fp8:
                if fp8 != plans[name]["fp8_modules"]:
                    raise FP8MixError(f"{ckpt} does not hold the FP8 layers its plan names; re-export it")
                yield
        return swap

    batch_samples = [samples[k:k + BATCH_SIZE] for k in range(0, len(samples), BATCH_SIZE)]
    metrics = evaluate(model, proc, batch_samples,
                       lambda chunk: make_batches(proc, chunk, len(chunk), base.max_length, opts.device)[0],
                       {name: applied(name) for name in catalog.schemes}, progress=progress)
    src_bytes = sum(f.stat().st_size for f in loaded.path.glob("*.safetensors"))
    rows = [{"scheme": REFERENCE, **metrics[REFERENCE], "n_samples": len(samples),
             "lm_weight_bytes": 2 * loaded.layout.lm_linear_params, "checkpoint_bytes": src_bytes,
             "effective_bits": 16.0}]
    for name in catalog.schemes:
        lm_bytes, total = checkpoint_bytes(opts.run / "checkpoints" / name, adapter, lm_linears)
        rows.append({"scheme": name, **metrics[name], "n_samples": len(samples), "lm_weight_bytes": lm_bytes,
                     "checkpoint_bytes": total, "effective_bits": plans[name]["effective_bits"]})
    doc = {"model": loaded.model_id, "data": data, "n_samples": len(samples), "n_dropped": dropped,
           "eval_seed": sources.EVAL_SEED, "positions": POSITIONS, "rows": rows}
    write_json(opts.run / "eval.json", "eval", doc, version=VERSION)
    manifest.update(opts.run, stages={"eval": {"seconds": round(time.time() - t0, 2), "n_samples": len(samples)}})
    return doc
