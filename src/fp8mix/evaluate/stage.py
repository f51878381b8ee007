"""`fp8mix eval`: BF16 and every exported scheme, each loaded from its checkpoint, on the held-out set."""

from __future__ import annotations

import time

from .. import manifest
from ..data import sources
from ..errors import FP8MixError
from ..pipeline import RunOptions, catalog_of, overrides, progress, _model_arg
from ..rundir import read_json, write_json
from ..score.batches import calibration_samples, make_batches
from .checkpoint import checkpoint_bytes, scheme_applied
from .metrics import compare, reference, reference_row

EVAL_SEED = 0


def eval_samples(data: str, n: int):
    return sources.load(data, "eval", n, EVAL_SEED)


def stage_eval(opts: RunOptions, n_eval: int = 64) -> dict:
    from ..models import loading

    t0 = time.time()
    catalog, _ = catalog_of(opts)
    over = overrides(opts)
    data = over.get("data", "embedded")
    samples = eval_samples(data, n_eval)
    calib = {s.fingerprint() for name in catalog.schemes for s in calibration_samples(catalog.settings(name, **over))}
    if calib & {s.fingerprint() for s in samples}:
        raise FP8MixError("the evaluation set shares samples with the calibration set; pass other --data")
    plans = {}
    for name in catalog.schemes:
        ckpt = opts.run / "checkpoints" / name
        if not (ckpt / "config.json").is_file():
            raise FP8MixError(f"{ckpt} is missing: run fp8mix export --run {opts.run} first")
        plans[name] = read_json(opts.run / "plans" / f"{name}.json", "plan")

    loaded = loading.load(_model_arg(opts), device=opts.device, device_map=opts.device_map)
    model, proc, adapter = loaded.model, loaded.processor, loaded.adapter
    batches = make_batches(proc, samples, 8, 1024, opts.device)
    lm_linears = set(adapter.all_lm_linears(model))
    ref = reference(model, proc, batches, samples)
    n_tokens = sum(int(t.numel()) for t in ref.top1)
    src_bytes = sum(f.stat().st_size for f in loaded.path.glob("*.safetensors"))
    rows = [{"scheme": "bf16", **reference_row(ref, n_tokens), "n_samples": len(samples),
             "lm_weight_bytes": 2 * loaded.layout.lm_linear_params, "checkpoint_bytes": src_bytes,
             "effective_bits": 16.0}]
    for name in progress(list(catalog.schemes), "evaluating schemes"):
        ckpt = opts.run / "checkpoints" / name
        with scheme_applied(model, ckpt, adapter) as fp8:
            if fp8 != plans[name]["fp8_modules"]:
                raise FP8MixError(f"{ckpt} does not hold the FP8 layers its plan names; re-export it")
            metrics = compare(model, proc, batches, samples, ref)
        lm_bytes, total = checkpoint_bytes(ckpt, adapter, lm_linears)
        rows.append({"scheme": name, **metrics, "n_samples": len(samples), "lm_weight_bytes": lm_bytes,
                     "checkpoint_bytes": total, "effective_bits": plans[name]["effective_bits"]})
    doc = {"model": loaded.model_id, "data": data, "n_samples": len(samples), "eval_seed": EVAL_SEED,
           "kl": "KL(p_BF16 || p_scheme) per token, nats, over every non-padding position",
           "ppl_tokens": "assistant reply tokens", "accuracy": "exact match of the greedy reply (samples with answers)",
           "rows": rows}
    write_json(opts.run / "eval.json", "eval", doc)
    manifest.update(opts.run, stages={"eval": {"seconds": round(time.time() - t0, 2), "n_samples": len(samples)}})
    return doc
