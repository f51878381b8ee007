#!/usr/bin/env python3
"""GPU benchmark: the cost of fp8mix's AutoQuant gradient scoring, against a plain training pass and ModelOpt.

Run on a CUDA machine, from the repository root::

    PYTHONPATH=src python3 benchmarks/bench_scoring.py --out bench_scoring.json

``--tiny`` runs the same code on a 2-layer small model with 2 batches (CPU or GPU), as a dry run;
``--skip-modelopt`` leaves out the ModelOpt phase.

Model: the full-size Qwen2.5-VL-3B architecture (``src/fp8mix/models/configs/qwen2_5_vl_3b.json``, the published
config.json), built with random BF16 weights directly on the GPU, SDPA attention. Speed does not depend on the
weight values; the scores of such a model mean nothing.

Data: 128 samples x 512 tokens, each with one 448x448 image, in 32 batches of 4 (plus 2 warm-up batches). The
tensors are synthesized directly instead of running the processor on real images: per sample
``<|im_start|>`` + 15 random text tokens + ``<|vision_start|>`` + 256 ``<|image_pad|>`` + ``<|vision_end|>`` +
random text tokens up to 512; labels on the last 128 tokens (the "assistant reply"), -100 elsewhere; no padding;
``pixel_values`` [4 x 1024, 1176] random normal BF16 (1024 patches of 3x2x14x14 per image) and
``image_grid_thw`` [[1, 32, 32]] per image, which is what the Qwen2.5-VL processor produces for a 448x448 image
(32x32 patches, merged 2x2 into 256 LM tokens), and ``mm_token_type_ids`` (1 on the image tokens) as the processor
returns it, so every phase computes the 3-D M-RoPE positions the served model uses. Token counts include image
tokens. (The figures in BENCHMARKS.md of 2026-11-22 were measured without ``mm_token_type_ids``: 1-D positions.)

Phases, one process, ``torch.cuda.synchronize`` around each timed region and the peak of
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (weights included):

* plain: forward + backward, training-style (every weight requires grad, ``loss.backward()``, grads zeroed with
  ``zero_grad(set_to_none=True)``); the reference for the goals.
* plain_frozen: the same with weights frozen and only the token embeddings' output requiring grad (what
  ``gradient_scores`` backpropagates through); for information.
* fp8mix ``gradient_scores`` for fp8_dynamic and fp8_static, each with the ``_scaled_mm`` fast path
  (``fp8mix.quant.fast``, the default on CUDA) and with the fp32 emulation (``fp8_linear_forward``, TF32
  off). The time covers the whole call: weight quantization, (static) calibration forwards, scoring.
* check: on one batch, for 14 LM linears, the fast path's FP8 output (hence its dY = Y_fp8 - Y) against the
  emulated one: >= 99% of the elements within one BF16 ulp, and every element within one ulp plus an
  accumulation allowance of 2^-12 x (|x_fp8| s_x)(|w_fp8| s_w)^T (the FP8 tensor cores accumulate with less
  than fp32 precision); and the Spearman rho of the 252 per-module scores, fast vs emulated, >= 0.99.
* ModelOpt ``mtq.auto_quantize`` on the same batches (text + images through ``forward_step``; text-only retry,
  on a fresh model, if that fails): FP8_DEFAULT_CFG candidates, ``method="gradient"``, effective_bits 12,
  ``*visual*`` / ``*lm_head*`` disabled and cost-excluded, ``num_calib_steps = num_score_steps = 32``. The JIT
  build of its FP8 CUDA extension is forced and timed first, apart from the call; the call is split into
  calibration (+ model conversion), scoring (``estimate_sensitivity_scores``) and search.

Writes the JSON after every phase (a timeout keeps what was measured), prints a table, and exits 1 if a check
failed.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from fp8mix.models import Qwen2_5_VLAdapter  # noqa: E402
from fp8mix.quant import fast as fast_fp8  # noqa: E402
from fp8mix.quant.numerics import FP8Format, quantize_input  # noqa: E402
from fp8mix.quant.weights import QuantizedWeights  # noqa: E402
from fp8mix.score.autoquant import frozen_weights_with_input_grads, gradient_scores  # noqa: E402

CONFIG = REPO / "src" / "fp8mix" / "models" / "configs" / "qwen2_5_vl_3b.json"
IM_START = 151644  # <|im_start|> in the Qwen2.5 tokenizer
TEXT_VOCAB = 151643  # ids below this are ordinary text tokens
GOALS = {"throughput_ratio_min": 0.7, "memory_ratio_max": 1.2, "modelopt_speedup_min": 3.0}
T0 = time.perf_counter()


# ---------------------------------------------------------------------------------------------- model and data
def load_config(tiny: bool, path: Path = CONFIG) -> dict:
    cfg = json.loads(path.read_text())
    if tiny:
        cfg.update(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_window_layers=2)
        cfg["vision_config"].update(depth=2, hidden_size=128, intermediate_size=256, num_heads=2,
                                    out_hidden_size=512, fullatt_block_indexes=[1])
        # a 2k vocabulary (the 152k one dominates a CPU run); special tokens moved to its top
        cfg.update(vocab_size=2048, bos_token_id=2040, eos_token_id=2041, vision_start_token_id=2042,
                   vision_end_token_id=2043, vision_token_id=2044, image_token_id=2045, video_token_id=2046)
    return cfg


def build_model(cfg: dict, device: torch.device):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig.from_dict(copy.deepcopy(cfg))
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16,
                                                                attn_implementation="sdpa")
    return model.eval()


def make_batches(cfg: dict, n: int, batch_size: int, seq: int, image: int, device: torch.device,
                 seed: int) -> list[dict]:
    vc = cfg["vision_config"]
    patch, merge, tps = vc["patch_size"], vc["spatial_merge_size"], vc["temporal_patch_size"]
    gh = gw = image // patch
    n_patches = gh * gw
    n_img = n_patches // merge**2
    patch_dim = vc.get("in_chans", 3) * tps * patch * patch
    prefix = 16
    reply = seq // 4
    if prefix + n_img + 2 + reply > seq:
        raise SystemExit(f"--seq {seq} is too short for a {image}px image ({n_img} tokens) and a {reply}-token reply")
    text_vocab = min(TEXT_VOCAB, cfg["bos_token_id"])
    im_start = IM_START if cfg["vocab_size"] > IM_START else text_vocab
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, text_vocab, (batch_size, seq), generator=g)
        ids[:, 0] = im_start
        ids[:, prefix] = cfg["vision_start_token_id"]
        ids[:, prefix + 1:prefix + 1 + n_img] = cfg["image_token_id"]
        ids[:, prefix + 1 + n_img] = cfg["vision_end_token_id"]
        labels = torch.full_like(ids, -100)
        labels[:, -reply:] = ids[:, -reply:]
        pixels = torch.randn(batch_size * n_patches, patch_dim, generator=g).to(torch.bfloat16)
        batch = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
            "pixel_values": pixels,
            "image_grid_thw": torch.tensor([[1, gh, gw]] * batch_size, dtype=torch.long),
            "mm_token_type_ids": (ids == cfg["image_token_id"]).int(),
        }
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


# ---------------------------------------------------------------------------------------------- measurement
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(device: torch.device, fn):
    """(result, seconds, peak GiB) of fn(), with memory reset before and synchronization around it."""
    reset_memory(device)
    sync(device)
    t = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t, peak_gib(device)


def n_tokens(batches: list[dict]) -> int:
    return int(sum(int(b["attention_mask"].sum()) for b in batches))


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def phase_record(tokens: int, seconds: float, peak: float | None, **extra) -> dict:
    rec = {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
           "peak_gib": None if peak is None else round(peak, 2)}
    rec.update(extra)
    return rec


# ---------------------------------------------------------------------------------------------- phases
def plain_step(model, batch) -> None:
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def run_plain(model, batches, warm, device, frozen: bool) -> dict:
    def loop(bs):
        for b in bs:
            plain_step(model, b)

    if frozen:
        with frozen_weights_with_input_grads(model):
            loop(warm)
            _, sec, pk = timed(device, lambda: loop(batches))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        loop(warm)
        _, sec, pk = timed(device, lambda: loop(batches))
    return phase_record(n_tokens(batches), sec, pk)


def run_fp8mix(model, groups, batches, warm, device, fmt: FP8Format, fast: bool, force: bool):
    with fast_fp8.fast_path(fast, force=force):
        gradient_scores(model, groups, warm, fmt)  # warm-up (kernels, allocator)
        fast_fp8.stats(reset=True)
        scores, sec, pk = timed(device, lambda: gradient_scores(model, groups, batches, fmt))
        st = fast_fp8.stats(reset=True)
    return scores, phase_record(n_tokens(batches), sec, pk, fast_fp8_calls=st)


def weight_quant_seconds(model, groups, device, fmt: FP8Format) -> float:
    _, sec, _ = timed(device, lambda: QuantizedWeights(model, [g.modules for g in groups], fmt))
    return round(sec, 3)


def bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """Spacing of BF16 numbers at |v| (8 significant bits): 2^(floor(log2|v|) - 7)."""
    _, e = torch.frexp(v.float().abs().clamp_min(2.0**-126))
    return torch.ldexp(torch.ones_like(v, dtype=torch.float32), e - 8)


@torch.no_grad()
def check_fast_vs_emulated(model, batch, groups, fmts, force: bool) -> dict:
    """The fast path's FP8 outputs (and dY) against the emulation's on real activations of one batch."""
    names = [n for g in groups for n in g.modules]
    cap = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: cap.__setitem__(n, a[0].detach().clone())) for n in names]
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    report = {}
    ok = True
    for fmt in fmts:
        qw = QuantizedWeights(model, [g.modules for g in groups], fmt)
        qw.calibrate(model, [batch])
        worst_ulps, in_ulp, total, rel_dy = 0.0, 0, 0, 0.0
        for n in names:
            x, mod = cap[n], model.get_submodule(n)
            y = mod(x)
            with fast_fp8.fast_path(True, force=force):
                fast_fp8.stats(reset=True)
                y_fast = qw.output(n, x)
                used = fast_fp8.stats(reset=True).get("fast", 0)
            with fast_fp8.fast_path(False):
                y_emul = qw.output(n, x)
            if not used:
                raise RuntimeError(f"fast path not taken for {n} ({fmt.value}): {fast_fp8.supported(x, qw.weights[n][0], fmt)}")
            a, b = y_fast.float(), y_emul.float()
            diff = (a - b).abs()
            ulp = bf16_ulp(torch.maximum(a.abs(), b.abs()))
            # fp32-accumulation allowance: 2^-12 of sum |x_q s_x| |w_q s_w| over K
            w_fp8, w_scale = qw.weights[n]
            x_fp8, x_scale = quantize_input(x, fmt, qw.input_scales[n])
            xs = (x_fp8.float() * x_scale).abs().reshape(-1, x.shape[-1])
            ws = (w_fp8.float() * w_scale.float().reshape(-1, 1)).abs()
            bound = ulp + (xs @ ws.T).reshape(diff.shape) * 2.0**-12
            ok_n = bool((diff <= bound).all())
            ok &= ok_n
            worst_ulps = max(worst_ulps, float((diff / ulp).max()))
            in_ulp += int((diff <= ulp).sum())
            total += diff.numel()
            dy_f, dy_e = (y_fast - y).float(), (y_emul - y).float()
            rel_dy = max(rel_dy, float((dy_f - dy_e).norm() / dy_e.norm().clamp_min(1e-30)))
            if not ok_n:
                print(f"  check FAILED for {n} ({fmt.value}): max diff {float(diff.max()):.3g}", flush=True)
        frac = in_ulp / total
        ok &= frac >= 0.99
        report[fmt.value] = {"modules": len(names), "elements": total,
                             "frac_bitwise_or_within_1_bf16_ulp": round(frac, 6),
                             "max_diff_in_bf16_ulps": round(worst_ulps, 3),
                             "max_rel_frobenius_diff_of_dY": float(f"{rel_dy:.3g}")}
    report["passed"] = bool(ok)
    return report


def run_modelopt(model, batches, device, text_only: bool) -> tuple[dict, dict]:
    import modelopt
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.algorithms import AutoQuantizeGradientSearcher

    rec = {"modelopt_version": modelopt.__version__, "inputs": "text only" if text_only else "text + images"}
    if device.type == "cuda":
        from modelopt.torch.quantization.extensions import get_cuda_ext_fp8

        t = time.perf_counter()
        ext = get_cuda_ext_fp8(raise_if_failed=False)
        rec["jit_build_s"] = round(time.perf_counter() - t, 1)
        rec["fp8_cuda_ext"] = ext is not None
    data = batches
    if text_only:
        data = [{k: v for k, v in b.items() if k not in ("pixel_values", "image_grid_thw", "mm_token_type_ids")} for b in batches]
    marks = {}
    original = AutoQuantizeGradientSearcher.estimate_sensitivity_scores

    def estimate(self):
        sync(device)
        marks["score_start"] = time.perf_counter()
        original(self)
        sync(device)
        marks["score_end"] = time.perf_counter()

    excluded = ["*visual*", "*lm_head*"]
    AutoQuantizeGradientSearcher.estimate_sensitivity_scores = estimate
    try:
        def call():
            return mtq.auto_quantize(
                model,
                constraints={"effective_bits": 12.0, "cost": {"excluded_module_name_patterns": excluded}},
                quantization_formats=["FP8_DEFAULT_CFG"],
                data_loader=data,
                forward_step=lambda m, b: m(**b, use_cache=False),
                loss_func=lambda out, b: out.loss,
                disabled_layers=excluded,
                num_calib_steps=len(data),
                num_score_steps=len(data),
                method="gradient",
                verbose=False,
            )
        reset_memory(device)
        sync(device)
        t0 = time.perf_counter()
        (_, state) = call()
        sync(device)
        t1 = time.perf_counter()
    finally:
        AutoQuantizeGradientSearcher.estimate_sensitivity_scores = original
    total = t1 - t0
    rec.update(phase_record(n_tokens(batches), total, peak_gib(device)))
    rec["calibration_s"] = round(marks["score_start"] - t0, 3)
    rec["scoring_s"] = round(marks["score_end"] - marks["score_start"], 3)
    rec["search_s"] = round(t1 - marks["score_end"], 3)
    groups = {}
    for st in state["candidate_stats"].values():
        if len(st["formats"]) >= 2:
            groups[tuple(st["module_names"])] = float(st["scores"][0])
    rec["groups_scored"] = len(groups)
    rec["effective_bits"] = state.get("best", {}).get("constraints", {}).get("effective_bits")
    return rec, groups


# ---------------------------------------------------------------------------------------------- report
def fmt_num(v, spec):
    return "-" if v is None else format(v, spec)


def table(res: dict) -> str:
    ph = res["phases"]
    plain = ph.get("plain")
    rows = [("phase", "time s", "tokens/s", "÷ plain", "peak GiB", "÷ plain")]
    for key, label in [("plain", "plain fwd+bwd (weights train)"),
                       ("plain_frozen", "plain fwd+bwd (weights frozen)"),
                       ("fp8mix_dynamic_fast", "fp8mix fp8_dynamic, _scaled_mm"),
                       ("fp8mix_dynamic_emulated", "fp8mix fp8_dynamic, fp32 emulation"),
                       ("fp8mix_static_fast", "fp8mix fp8_static, _scaled_mm"),
                       ("fp8mix_static_emulated", "fp8mix fp8_static, fp32 emulation"),
                       ("modelopt", "ModelOpt auto_quantize (excl. JIT)")]:
        r = ph.get(key)
        if not r or "seconds" not in r:
            continue
        tr = r["tokens_per_s"] / plain["tokens_per_s"] if plain else None
        mr = r["peak_gib"] / plain["peak_gib"] if plain and r.get("peak_gib") and plain.get("peak_gib") else None
        rows.append((label, f"{r['seconds']:.2f}", f"{r['tokens_per_s']:,.0f}", fmt_num(tr, ".2f"),
                     fmt_num(r.get("peak_gib"), ".1f"), fmt_num(mr, ".2f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    mo = ph.get("modelopt", {})
    if "jit_build_s" in mo:
        lines.append(f"ModelOpt JIT build of modelopt_cuda_ext_fp8: {mo['jit_build_s']} s (not in its time above); "
                     f"calibration {mo.get('calibration_s')} s, scoring {mo.get('scoring_s')} s, "
                     f"search {mo.get('search_s')} s; inputs: {mo.get('inputs')}")
    for k, v in res.get("goals", {}).items():
        lines.append(f"goal {k}: {v}")
    return "\n".join(lines)


def goals(res: dict) -> dict:
    ph = res["phases"]
    out = {}
    plain, dyn = ph.get("plain"), ph.get("fp8mix_dynamic_fast") or ph.get("fp8mix_dynamic_emulated")
    if plain and dyn:
        tr = dyn["tokens_per_s"] / plain["tokens_per_s"]
        out["throughput_ratio"] = {"value": round(tr, 3), "goal": f">= {GOALS['throughput_ratio_min']}",
                                   "met": tr >= GOALS["throughput_ratio_min"]}
        if plain.get("peak_gib") and dyn.get("peak_gib"):
            mr = dyn["peak_gib"] / plain["peak_gib"]
            out["memory_ratio"] = {"value": round(mr, 3), "goal": f"<= {GOALS['memory_ratio_max']}",
                                   "met": mr <= GOALS["memory_ratio_max"]}
    mo = ph.get("modelopt")
    if mo and "seconds" in mo and dyn:
        sp = mo["seconds"] / dyn["seconds"]
        out["modelopt_speedup"] = {"value": round(sp, 2), "goal": f">= {GOALS['modelopt_speedup_min']}",
                                   "met": sp >= GOALS["modelopt_speedup_min"],
                                   "vs": "fp8mix fp8_dynamic (default path) vs auto_quantize excl. JIT build"}
        st = ph.get("fp8mix_static_fast")
        if st:
            out["modelopt_speedup_like_for_like"] = {
                "value": round(mo["seconds"] / st["seconds"], 2), "goal": f">= {GOALS['modelopt_speedup_min']}",
                "met": mo["seconds"] / st["seconds"] >= GOALS["modelopt_speedup_min"],
                "vs": "fp8mix fp8_static (calibration + scoring) vs auto_quantize excl. JIT build"}
        if "scoring_s" in mo:
            out["modelopt_scoring_phase_only_vs_fp8mix_dynamic"] = {"value": round(mo["scoring_s"] / dyn["seconds"], 2)}
    return out


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--tiny", action="store_true", help="dry run: 2-layer small model (2k vocabulary), 2 batches of 2 x 160 tokens")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--image", type=int, help="image side in pixels (multiple of 28)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-modelopt", action="store_true")
    ap.add_argument("--skip-emulated", action="store_true", help="leave out the fp32-emulation phases")
    ap.add_argument("--force-fast", action="store_true",
                    help="use the _scaled_mm path off CUDA too (CPU dry runs); on CUDA it is the default")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="skip the ModelOpt text-only retry when less than ~120 s of this budget is left")
    args = ap.parse_args()
    tiny = args.tiny
    n_b = args.batches or (2 if tiny else 32)
    bs = args.batch_size or (2 if tiny else 4)
    seq = args.seq or (160 if tiny else 512)
    image = args.image or (224 if tiny else 448)
    device = torch.device(args.device)
    force = args.force_fast and device.type != "cuda"
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    import transformers

    res = {
        "benchmark": "fp8mix AutoQuant gradient scoring cost (benchmarks/bench_scoring.py)",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                    or platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "transformers": transformers.__version__,
                    "tf32_matmul": torch.backends.cuda.matmul.allow_tf32},
        "model": {"config": str(CONFIG.relative_to(REPO)), "tiny": tiny, "dtype": "bfloat16", "weights": "random",
                  "attention": "sdpa"},
        "data": {"batches": n_b, "batch_size": bs, "seq_len": seq, "image_px": image, "warmup_batches": args.warmup,
                 "synthesized": True},
        "phases": {},
        "checks": {},
        "errors": {},
    }

    def save():
        res["goals"] = goals(res)
        res["elapsed_s"] = round(time.perf_counter() - T0, 1)
        out_path.write_text(json.dumps(res, indent=1))

    cfg = load_config(tiny)
    t = time.perf_counter()
    model = build_model(cfg, device)
    sync(device)
    res["model"]["build_s"] = round(time.perf_counter() - t, 1)
    res["model"]["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    res["model"]["weights_gib"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 2)
    layout = Qwen2_5_VLAdapter().layout(model)
    groups = list(layout.groups)
    names = [m for g in groups for m in g.modules]
    res["model"]["scored_linears"] = len(names)
    batches = make_batches(cfg, n_b, bs, seq, image, device, seed=1)
    warm = make_batches(cfg, args.warmup, bs, seq, image, device, seed=2)
    res["data"]["tokens"] = n_tokens(batches)
    res["data"]["image_tokens_per_sample"] = int((batches[0]["input_ids"][0] == cfg["image_token_id"]).sum())
    print(f"[{time.perf_counter() - T0:.0f}s] model {res['model']['params_b']} B params built in "
          f"{res['model']['build_s']} s on {res['machine']['device']}; {n_b} batches x {bs} x {seq}", flush=True)
    save()

    # (a) plain training-style forward+backward, and the frozen-weights variant
    res["phases"]["plain"] = run_plain(model, batches, warm, device, frozen=False)
    print(f"[{time.perf_counter() - T0:.0f}s] plain: {res['phases']['plain']}", flush=True)
    res["phases"]["plain_frozen"] = run_plain(model, batches, warm, device, frozen=True)
    print(f"[{time.perf_counter() - T0:.0f}s] plain_frozen: {res['phases']['plain_frozen']}", flush=True)
    for p in model.parameters():
        p.requires_grad_(False)
    save()

    # check: fast path vs emulation on real activations
    n_layers = len(model.get_submodule(Qwen2_5_VLAdapter.blocks_path))
    check_groups = [g for g in groups if g.block in {0, n_layers - 1}]
    fast_ok = device.type == "cuda" or force
    if fast_ok:
        try:
            res["checks"]["fast_vs_emulated_outputs"] = check_fast_vs_emulated(
                model, batches[0], check_groups, [FP8Format.fp8_dynamic, FP8Format.fp8_static], force)
        except Exception as exc:  # no _scaled_mm on this GPU/torch: measure the emulation only
            res["errors"]["fast_path"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            fast_ok = False
        print(f"[{time.perf_counter() - T0:.0f}s] check: {res['checks'].get('fast_vs_emulated_outputs')}", flush=True)
    save()

    # (b) fp8mix gradient scores
    scores = {}
    for fmt in (FP8Format.fp8_dynamic, FP8Format.fp8_static):
        short = fmt.value.split("_")[1]
        modes = ([True] if fast_ok else []) + ([] if args.skip_emulated and fast_ok else [False])
        for fast in modes:
            key = f"fp8mix_{short}_{'fast' if fast else 'emulated'}"
            try:
                scores[key], rec = run_fp8mix(model, groups, batches, warm, device, fmt, fast, force)
                if fast:
                    rec["weight_quantization_s"] = weight_quant_seconds(model, groups, device, fmt)
            except Exception as exc:
                res["errors"][key] = f"{type(exc).__name__}: {str(exc)[:2000]}"
                traceback.print_exc()
                continue
            res["phases"][key] = rec
            print(f"[{time.perf_counter() - T0:.0f}s] {key}: {rec}", flush=True)
            save()
        fk, ek = f"fp8mix_{short}_fast", f"fp8mix_{short}_emulated"
        if fk in scores and ek in scores:
            rho = spearman([scores[fk][n] for n in names], [scores[ek][n] for n in names])
            res["checks"][f"spearman_fast_vs_emulated_{short}"] = {"rho": round(rho, 5), "passed": rho >= 0.99,
                                                                   "modules": len(names)}
    save()

    # (c) ModelOpt auto_quantize (modifies the model in place: last)
    if not args.skip_modelopt:
        for text_only in (False, True):
            if text_only and time.perf_counter() - T0 > args.budget_s - 120:
                res["errors"]["modelopt_text_only"] = "skipped: not enough time left for a retry"
                break
            try:
                rec, mo_groups = run_modelopt(model, batches, device, text_only)
            except Exception as exc:
                key = "modelopt_text_only" if text_only else "modelopt_text_images"
                res["errors"][key] = f"{type(exc).__name__}: {str(exc)[:2000]}"
                traceback.print_exc()
                save()
                if text_only:
                    break
                del model
                reset_memory(device)
                model = build_model(cfg, device)  # auto_quantize converted the old one in place
                for p in model.parameters():
                    p.requires_grad_(False)
                continue
            res["phases"]["modelopt"] = rec
            ref = scores.get("fp8mix_static_fast") or scores.get("fp8mix_static_emulated")
            if ref and mo_groups:
                keys = [k for k in mo_groups if all(m in ref for m in k)]
                if len(keys) >= 2:
                    rho = spearman([mo_groups[k] for k in keys], [sum(ref[m] for m in k) for k in keys])
                    res["checks"]["spearman_modelopt_vs_fp8mix_static_groups"] = {
                        "rho": round(rho, 4), "groups": len(keys),
                        "note": "information only: random weights, ModelOpt's static FP8 quantizers and its "
                                "grad-checkpointed backward differ from fp8mix's numerics"}
            print(f"[{time.perf_counter() - T0:.0f}s] modelopt: {rec}", flush=True)
            break
    save()

    print("\n" + table(res), flush=True)
    failed = [k for k, v in res["checks"].items() if isinstance(v, dict) and v.get("passed") is False]
    print(f"\nchecks: {json.dumps(res['checks'])}\nerrors: {json.dumps(res['errors'])}\nwrote {out_path}", flush=True)
    if failed:
        print(f"FAILED checks: {failed}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
