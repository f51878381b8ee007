"""Reference AutoQuantize "gradient" scores from NVIDIA ModelOpt, for the fp8mix parity test.

Runs ONLY in the ModelOpt environment (``make modelopt-env`` builds ``.venv-modelopt``); it never imports
fp8mix::

    .venv-modelopt/bin/python tests/parity/modelopt_scores.py \
        --model DIR --batches batches.safetensors --out scores.json [--dtype float32|bfloat16] \
        [--codes codes.safetensors]

Inputs
------
``--model DIR``: a ``Qwen2_5_VLForConditionalGeneration`` checkpoint (``save_pretrained`` layout; transformers
5.14 in the ModelOpt venv loads configs written by 5.23). Loaded with ``--dtype`` (default float32: on CPU
fp32 is ~4x faster than bf16, and fp32 makes the reference numerics reproducible outside ModelOpt).

``--batches FILE``: a safetensors file with three int64 tensors of identical shape
``[n_batches, batch_size, seq_len]``:

* ``input_ids``      token ids (text only: no pixel_values, no image tokens);
* ``attention_mask`` 1 = real token, 0 = padding;
* ``labels``         target ids, ``-100`` = ignored. Unshifted, like HF: the model shifts them itself
  (logit at position t is scored against ``labels[t+1]``).

Batch i is ``{k: tensor[i] for k in (input_ids, attention_mask, labels)}``, fed as ``model(**batch,
use_cache=False)``; the loss that ModelOpt backprops is ``output.loss`` (HF ForCausalLMLoss: fp32
cross-entropy, mean over all non-ignored shifted label tokens of the whole batch).
``num_calib_steps = num_score_steps = n_batches``: the same batches calibrate the static FP8 amax and score.

What it runs
------------
``mtq.auto_quantize(model, quantization_formats=["FP8_DEFAULT_CFG"], method="gradient",
disabled_layers=["*visual*", "*lm_head*"], constraints={"effective_bits": 12.0,
"cost": {"excluded_module_name_patterns": ["*visual*", "*lm_head*"]}}, ...)``. The bit budget only drives
ModelOpt's final LP selection, which this script does not use.

Output JSON
-----------
``{"modelopt_version", "transformers_version", "torch_version", "dtype", "n_batches", "batch_shape",
"grad_checkpointing", "quantizer": {"input": {...}, "weight": {...}},
"groups": {first_module_name: {"modules": [...], "score": float,
           "amax": {module_name: {"input": float, "weight": float}}}}}``

``score`` is ``candidate_stats[...]["scores"][0]`` (the FP8 score of the group: sum over its modules and over all
score batches of ``sum((dL/dY * (Y_fp8 - Y))**2)``); ``amax`` are the calibrated per-tensor FP8 amax values of
that group's quantizers. Only searchable groups (not disabled) are listed.

FP8 codes (``--codes FILE``)
----------------------------
The FP8 operands ModelOpt's scoring actually used, so that a comparison can tell a tie rounded the other way from a
different computation. Every call of an enabled, quantizing (not calibrating) ``TensorQuantizer`` is recorded; in the
gradient method that is exactly the FP8-recipe forward that computes ``Y_fp8 - Y``, once per module and score batch
(with HF gradient checkpointing, in the recomputation during backward). The fake-quantized output
``code * (1 / (448 / amax))`` is turned back into its E4M3 code by ``* (448 / amax)`` and a round-to-nearest cast,
which is exact: the round trip moves a code by a few float32 ulps, the nearest other E4M3 value is >= 1/16 away.
Saved as uint8 bit patterns (``.view(torch.float8_e4m3fn)`` reads them), one tensor per module:

* ``input/<module>``  ``[n_batches, batch_size, seq_len, in_features]``, the codes of the module's input in batch
  order;
* ``weight/<module>`` ``[out_features, in_features]`` (the same in every call; the script checks it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings


def _scalar(t):
    return float(t.detach().float().reshape(-1)[0]) if t.numel() == 1 else [float(v) for v in t.float().reshape(-1)]


def _describe_quantizer(meta: dict, sd: dict) -> dict:
    num_bits = meta.get("_num_bits")
    return {
        "num_bits": list(num_bits) if isinstance(num_bits, tuple) else num_bits,
        "axis": meta.get("_axis"),
        "block_sizes": meta.get("_block_sizes"),
        "dynamic": bool(meta.get("_dynamic", False)),
        "enabled": not meta.get("_disabled", False),
        "amax": "static per-tensor (max calibration)" if "_amax" in sd and sd["_amax"].numel() == 1
        else ("static per-channel" if "_amax" in sd else "dynamic"),
        "amax_dtype": str(sd["_amax"].dtype) if "_amax" in sd else None,
    }


class _CodeRecorder:
    """Records the E4M3 codes every quantizing TensorQuantizer of `model` produces (see "FP8 codes" above)."""

    def __init__(self, model):
        self.model, self.names, self.calls = model, {}, {}

    def _name(self, quantizer) -> str:
        if id(quantizer) not in self.names:  # the recipe's quantizers are swapped in as children: look again
            self.names.update({id(m): n for n, m in self.model.named_modules()})
        return self.names[id(quantizer)]

    def __enter__(self):
        import torch
        from modelopt.torch.quantization.nn import TensorQuantizer

        self.cls, self.orig = TensorQuantizer, TensorQuantizer.forward
        recorder = self

        def forward(quantizer, inputs):
            out = recorder.orig(quantizer, inputs)
            if quantizer.is_enabled and quantizer._if_quant and not quantizer._if_calib:
                if quantizer.block_sizes is not None or quantizer.num_bits != (4, 3) or quantizer.amax.numel() != 1:
                    raise SystemExit(f"{recorder._name(quantizer)}: not a per-tensor E4M3 quantizer")
                amax = quantizer.amax.detach().float()
                codes = (out.detach().float() * (448.0 / amax)).to(torch.float8_e4m3fn)
                recorder.calls.setdefault(recorder._name(quantizer), []).append(codes.view(torch.uint8).clone())
            return out

        TensorQuantizer.forward = forward
        return self

    def __exit__(self, *exc):
        self.cls.forward = self.orig

    def tensors(self, modules: list[str], n_batches: int) -> dict:
        import torch

        out = {}
        for m in modules:
            for kind in ("input", "weight"):
                calls = self.calls.get(f"{m}.{kind}_quantizer", [])
                if len(calls) != n_batches:
                    raise SystemExit(f"{m}.{kind}_quantizer quantized {len(calls)} times, expected one per score "
                                     f"batch ({n_batches})")
                if kind == "weight":
                    if any(not torch.equal(c, calls[0]) for c in calls):
                        raise SystemExit(f"{m}: the FP8 weight codes changed between batches")
                    out[f"weight/{m}"] = calls[0].contiguous()
                else:
                    out[f"input/{m}"] = torch.stack(calls).contiguous()
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--codes", help="also save the FP8 input and weight codes of every scored module here")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave default)")
    ap.add_argument("--no-grad-checkpointing", action="store_true",
                    help="debug: drop ModelOpt's HF grad-checkpointing support (all params get requires_grad)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    import torch
    import transformers
    from safetensors.torch import load_file

    import modelopt
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.algorithms import AutoQuantizeGradientSearcher

    if args.threads:
        torch.set_num_threads(args.threads)
    t_import = time.perf_counter() - t0

    dtype = getattr(torch, args.dtype)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model, dtype=dtype)
    model.eval()

    raw = load_file(args.batches)
    keys = ("input_ids", "attention_mask", "labels")
    for k in keys:
        if k not in raw:
            raise SystemExit(f"{args.batches}: missing tensor {k!r}")
        if raw[k].dim() != 3 or raw[k].shape != raw["input_ids"].shape:
            raise SystemExit(f"{args.batches}: {k} must be [n_batches, batch, seq] like input_ids")
    n_batches = raw["input_ids"].shape[0]
    data = [{k: raw[k][i].long() for k in keys} for i in range(n_batches)]

    excluded = ["*visual*", "*lm_head*"]
    saved_support = list(AutoQuantizeGradientSearcher._custom_support)
    if args.no_grad_checkpointing:
        AutoQuantizeGradientSearcher._custom_support.clear()
    t1 = time.perf_counter()
    recorder = _CodeRecorder(model)
    try:
        with warnings.catch_warnings(), (recorder if args.codes else contextlib.nullcontext()):
            warnings.simplefilter("ignore")
            model, state = mtq.auto_quantize(
                model,
                constraints={"effective_bits": 12.0, "cost": {"excluded_module_name_patterns": excluded}},
                quantization_formats=["FP8_DEFAULT_CFG"],
                data_loader=data,
                forward_step=lambda m, b: m(**b, use_cache=False),
                loss_func=lambda out, b: out.loss,
                disabled_layers=excluded,
                num_calib_steps=n_batches,
                num_score_steps=n_batches,
                method="gradient",
                verbose=False,
            )
    finally:
        AutoQuantizeGradientSearcher._custom_support[:] = saved_support
    t_aq = time.perf_counter() - t1

    # Calibrated quantizer state of the FP8 recipe (all groups were calibrated together in it).
    (fp8_recipe,) = [r for r in state["quantizer_states"] if str(r).startswith("FP8_DEFAULT_CFG")]
    qmeta = state["quantizer_states"][fp8_recipe]["metadata"]
    qsd = state["quantizer_states"][fp8_recipe]["state_dict"]

    groups, quantizer = {}, {}
    for hp_name, st in state["candidate_stats"].items():
        if len(st["formats"]) < 2:  # disabled group: NONE only
            continue
        if not str(st["formats"][0]).startswith("FP8_DEFAULT_CFG") or "NONE" not in str(st["formats"][-1]):
            raise SystemExit(f"unexpected formats for {hp_name}: {st['formats']}")
        mods = list(st["module_names"])
        amax = {}
        for m in mods:
            amax[m] = {}
            for kind in ("input", "weight"):
                qn = f"{m}.{kind}_quantizer"
                amax[m][kind] = _scalar(qsd[qn]["_amax"])
                desc = _describe_quantizer(qmeta[qn], qsd[qn])
                if quantizer.setdefault(kind, desc) != desc:
                    raise SystemExit(f"{qn}: quantizer config differs from others: {desc}")
        groups[mods[0]] = {"modules": mods, "score": float(st["scores"][0]), "amax": amax}

    if args.codes:
        from safetensors.torch import save_file

        save_file(recorder.tensors([m for g in groups.values() for m in g["modules"]], n_batches), args.codes)

    out = {
        "modelopt_version": modelopt.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "dtype": args.dtype,
        "n_batches": int(n_batches),
        "batch_shape": list(raw["input_ids"].shape[1:]),
        "grad_checkpointing": not args.no_grad_checkpointing,
        "quantizer": quantizer,
        "groups": groups,
        "timing_s": {"import": round(t_import, 2), "auto_quantize": round(t_aq, 2)},
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}: {len(groups)} groups; import {t_import:.1f}s, auto_quantize {t_aq:.1f}s")


if __name__ == "__main__":
    main()
