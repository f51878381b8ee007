"""`fp8mix eval`: BF16 and every exported scheme on the held-out set, as fp8mix emulates them in transformers
(each checkpoint's FP8 layers loaded into the model) and as vLLM serves them (each checkpoint served)."""

from __future__ import annotations

import time
from contextlib import contextmanager

from .. import manifest
from ..data.sources import EVAL_SEED
from ..check.live import (CPU_FORMATS, Runner, engine_settings, folder_key, read_served, served_is_current,
                          vllm_python, vllm_version, write_served)
from ..distributed import release_gpu_cache
from ..errors import FP8MixError
from ..context import RunOptions, catalog_of, progress, model_arg
from ..rundir import read_json, write_json
from ..score.batches import make_batches
from ..timing import Phases
from .checkpoint import checkpoint_bytes, scheme_applied
from .heldout import eval_set
from .metrics import REFERENCE, TOP_K, evaluate, placeholder_ids
from .served import eval_requests, served_tally, throughput
from .vision import VisionReuse, touches

BATCH_SIZE = 8
VERSION = 3  # eval.json v3: one row per scheme and engine ("engine": "transformers" or "vllm"), top-k KL
ENGINES = ("auto", "transformers", "vllm")
# What each row's fields average over; written into eval.json so that the file explains itself.
POSITIONS = {
    "engine": "transformers: fp8mix's emulation (the checkpoint's FP8 layers run in fp8mix's FP8 numerics); "
              "vllm: the checkpoint served by vLLM, compared with the BF16 source served by vLLM",
    "kl_mean, kl_p99, top1_agreement, n_text_positions":
        "positions predicting a text token: the next token is real (not padding) and not an image/video "
        "placeholder or vision start/end marker; system prompt, user text and chat-template tokens included",
    "kl_reply_mean, kl_reply_p99, top1_reply_agreement, n_reply_positions":
        "positions predicting an assistant reply token (labelled, closing end-of-turn included)",
    "kl": "KL(p_BF16 || p_scheme) per position, nats, from the full distributions (transformers rows only)",
    "kl_topk_mean, kl_topk_reply_mean": f"KL per position coarse-grained onto the tokens in both models' top-{TOP_K} "
                                        "plus the actual token, and one bucket for the rest: a lower bound of the "
                                        "full KL, the one KL vLLM's top-k log-probabilities give (both engines)",
    "ppl, n_labelled_tokens": "perplexity over the labelled assistant reply tokens",
    "answer_accuracy": "greedy reply vs the sample's reference answer, normalised: first sentence, case folded, "
                       "punctuation dropped, whitespace collapsed (samples with an answer; n_answers)",
    "answer_exact_match": "greedy reply equal to the reference answer, stripped",
    "flips_vs_bf16": "samples whose normalised greedy reply differs from the BF16 model's on the same engine",
    "tokens_per_s": "vllm rows: tokens prefilled and generated per second of the engine's serve call (the "
                    "evaluation set and the live check's probes; eager mode: not a speed figure, see fp8mix bench)",
}


def _emulated(opts: RunOptions, loaded, es, plans: dict, names: list[str], phases: dict[str, Phases]
              ) -> dict[str, dict]:
    """Each model's metrics in transformers, the checkpoints' FP8 layers swapped into the BF16 model in turn;
    `phases` gets each model's seconds by phase."""
    model, proc, adapter = loaded.model, loaded.processor, loaded.adapter
    vision = VisionReuse(model, adapter.vision_path)  # the BF16 vision tower's outputs, for every model

    def applied(name: str):
        @contextmanager
        def swap():
            ckpt = opts.run / "checkpoints" / name
            changed = []
            with scheme_applied(model, ckpt, adapter, changed) as fp8:
                if fp8 != plans[name]["fp8_modules"]:
                    raise FP8MixError(f"{ckpt} does not hold the FP8 layers its plan names; re-export it")
                with vision.suspended(touches(changed, adapter.vision_path)):
                    yield
        return swap

    batch_samples = [es.samples[k:k + BATCH_SIZE] for k in range(0, len(es.samples), BATCH_SIZE)]
    with vision:
        return evaluate(model, proc, batch_samples,
                        lambda chunk: make_batches(proc, chunk, len(chunk), es.max_length, opts.device)[0],
                        {name: applied(name) for name in names}, progress=progress, phases=phases)


def _served(opts: RunOptions, source, es, processor, config, plans: dict, names: list[str]) -> dict[str, dict]:
    """Each model as vLLM serves it: outputs the check stage kept (same requests) or served now, one engine start
    per model, all in one vLLM process (`Runner`, started only when a model must be served). A model whose format
    vLLM cannot run here gets a row that says so."""
    requests = eval_requests(es.samples)
    key = requests.key()
    engine = engine_settings(es.max_length)
    on_gpu = not opts.device.startswith("cpu")
    version = vllm_version(vllm_python())
    docs, rows = {}, {}
    with Runner() as runner:
        for name in progress([REFERENCE, *names], "serving the evaluation set in vLLM"):
            fmt = plans[name]["fp8_format"] if name != REFERENCE else None
            if fmt is not None and not on_gpu and fmt not in CPU_FORMATS:
                rows[name] = {"served": False, "reason": f"not served here: vLLM's CPU build has no kernels for {fmt}"}
                continue
            folder = source if name == REFERENCE else opts.run / "checkpoints" / name
            model_key = folder_key(folder)
            doc = read_served(opts.run, name)
            if (not doc or (doc.get("extra_key"), doc.get("model_key")) != (key, model_key) or not doc.get("outputs")
                    or not served_is_current(doc, version)):
                res = runner.serve(folder, requests, engine=engine)
                if not res.get("outputs") or not res.get("ok"):
                    why = "; ".join(res.get("errors") or [res.get("reason") or "unknown"])[:300]
                    rows[name] = {"served": False, "error": f"vLLM failed to serve {name}: {why}"}
                    continue
                doc = {"model": str(folder), "model_key": model_key, "vllm_version": res.get("vllm_version"),
                       "extra_key": key, "timings_s": res.get("timings_s", {}), "outputs": res["outputs"]}
                write_served(opts.run, name, doc)
            docs[name] = doc
    if REFERENCE not in docs:
        why = rows[REFERENCE].get("error")
        return {n: {"served": False, "error": f"no served BF16 reference ({why})"} for n in [REFERENCE, *names]}
    placeholders = placeholder_ids(config)
    ref = docs[REFERENCE]["outputs"]
    tallies = {n: served_tally(d["outputs"], ref, es.samples, processor, placeholders, n) for n, d in docs.items()}
    ref_replies = tallies[REFERENCE].replies
    for n, d in docs.items():
        rows[n] = {"served": True, **tallies[n].row(es.samples, ref_replies), "vllm_version": d.get("vllm_version"),
                   **throughput(d)}
    return rows


def stage_eval(opts: RunOptions, n_eval: int = 64, engine: str = "auto") -> dict:
    """Rows of eval.json: BF16 and every scheme, on each engine `engine` asks for ("auto": transformers, and
    vLLM where it is importable)."""
    from ..models import loading
    from ..models.processor import load_processor

    if engine not in ENGINES:
        raise FP8MixError(f"unknown --engine {engine!r}; engines: {', '.join(ENGINES)}")
    t0 = time.time()
    phases, per_model = Phases(), {}
    catalog, _ = catalog_of(opts)
    names = list(catalog.schemes)
    plans = {}
    for name in names:
        ckpt = opts.run / "checkpoints" / name
        if not (ckpt / "config.json").is_file():
            raise FP8MixError(f"{ckpt} is missing: run fp8mix export --run {opts.run} first")
        plans[name] = read_json(opts.run / "plans" / f"{name}.json", "plan")
    has_vllm = vllm_python() is not None
    if engine == "vllm" and not has_vllm:
        raise FP8MixError("--engine vllm: vLLM is not importable here and .venv-vllm is missing (make vllm-env "
                          "builds it)")
    engines = {"transformers": engine in ("auto", "transformers"), "vllm": engine == "vllm" or
               (engine == "auto" and has_vllm)}

    with phases("load"):  # the model argument is resolved once (a hub id is a lookup)
        if engines["transformers"]:
            loaded = loading.load(model_arg(opts), device=opts.device, device_map=opts.device_map)
            net, proc, adapter, layout = loaded.model, loaded.processor, loaded.adapter, loaded.layout
            model_id, path = loaded.model_id, loaded.path
        else:
            model_id, path = loading.resolve(model_arg(opts))
            net, adapter = loading.build_empty(path)
            proc, layout = load_processor(path), adapter.layout(net)
    with phases("eval_set"):
        es = eval_set(opts, n_eval, proc)
    config = net.config
    lm_linears = set(adapter.all_lm_linears(net))
    sizes = {REFERENCE: {"lm_weight_bytes": 2 * layout.lm_linear_params,
                         "checkpoint_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")),
                         "effective_bits": 16.0}}
    with phases("sizes"):
        for name in names:
            lm_bytes, total = checkpoint_bytes(opts.run / "checkpoints" / name, adapter, lm_linears)
            sizes[name] = {"lm_weight_bytes": lm_bytes, "checkpoint_bytes": total,
                           "effective_bits": plans[name]["effective_bits"]}

    rows, seconds = [], {}
    if engines["transformers"]:
        t = time.time()
        metrics = _emulated(opts, loaded, es, plans, names, per_model)
        seconds["transformers"] = round(time.time() - t, 2)
        loaded = net = None  # the GPU memory goes to vLLM's engines
        release_gpu_cache()
        rows += [{"scheme": n, "engine": "transformers", **metrics[n], "n_samples": len(es.samples), **sizes[n]}
                 for n in [REFERENCE, *names]]
    if engines["vllm"]:
        t = time.time()
        served = _served(opts, path, es, proc, config, plans, names)
        seconds["vllm"] = round(time.time() - t, 2)
        rows += [{"scheme": n, "engine": "vllm", **served[n], "n_samples": len(es.samples), **sizes[n]}
                 for n in [REFERENCE, *names]]
    doc = {"model": model_id, "data": es.data, "n_samples": len(es.samples), "n_dropped": es.n_dropped,
           "eval_seed": EVAL_SEED, "top_k": TOP_K, "positions": POSITIONS,
           "engines": {k: ({"ran": True} if v else {"ran": False, "reason": "vLLM is not importable here"
                                                     if k == "vllm" and not has_vllm else "not asked for"})
                       for k, v in engines.items()},
           "rows": rows}
    write_json(opts.run / "eval.json", "eval", doc, version=VERSION)
    manifest.update(opts.run, stages={"eval": {"seconds": round(time.time() - t0, 2), "n_samples": len(es.samples),
                                               "engine_seconds": seconds, "phases": phases.rounded(),
                                               "models": {n: ph.rounded() for n, ph in per_model.items()}}})
    return doc


def served_errors(doc: dict) -> list[str]:
    """The vLLM rows that failed (not those vLLM cannot run here)."""
    return [r["error"] for r in doc["rows"] if r.get("engine") == "vllm" and r.get("error")]
