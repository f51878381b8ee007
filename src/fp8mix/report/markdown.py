"""report.md and summary.json from the run directory's files."""

from __future__ import annotations

from pathlib import Path

from . import served as served_part
from . import speed as speed_part
from .figures import group_kinds
from ..errors import FP8MixError
from ..rundir import schema_version

# Thresholds for the recommendations: FP8 W8A8 is expected to sit near llama.cpp's Q8_0 regime
# (mean KL ~2e-4, >99 % top-1 agreement); an answer-accuracy drop within 1 point is noise at these sizes.
KL_NEAR_LOSSLESS = 1e-3
ACC_TOLERANCE = 0.01

# The report links only into the run directory, so that a copied run keeps its links: the catalog is copied there.
CATALOG_COPY = "catalog.yaml"


# eval.json fields added in v2; a v1 file (older fp8mix) reads them as missing ("n/a").
EVAL_V2_FIELDS = ("kl_reply_mean", "kl_reply_p99", "top1_reply_agreement", "n_text_positions", "n_reply_positions",
                  "n_labelled_tokens", "answer_exact_match", "n_answers", "flips_vs_bf16")


# A row's figures; a vLLM row has no full KL, and a model vLLM did not serve has none of them.
ROW_METRICS = ("kl_mean", "kl_p99", "kl_reply_mean", "kl_reply_p99", "kl_topk_mean", "kl_topk_reply_mean",
               "top1_agreement", "top1_reply_agreement", "ppl", "answer_accuracy", "answer_exact_match",
               "flips_vs_bf16", "n_text_positions", "n_reply_positions", "n_labelled_tokens", "n_answers")


def eval_rows(ev: dict) -> tuple[dict[str, dict], str]:
    """eval.json's emulated rows by scheme in the current shape (the served rows where the eval ran vLLM only),
    and what their kl_mean/top1_agreement average over. In a v1 file those cover every non-padding position and
    `answer_accuracy` is the exact match."""
    if schema_version(ev) >= 3:
        emulated = {r["scheme"]: r for r in ev["rows"] if r["engine"] == "transformers"}
        return emulated or {n: {**dict.fromkeys(ROW_METRICS), **r}
                            for n, r in served_rows(ev).items()}, "text positions"
    if schema_version(ev) >= 2:
        return {r["scheme"]: r for r in ev["rows"]}, "text positions"
    rows = {}
    for r in ev["rows"]:
        rows[r["scheme"]] = {**dict.fromkeys(EVAL_V2_FIELDS), **r, "answer_accuracy": None,
                             "answer_exact_match": r["answer_accuracy"], "n_text_positions": r.get("n_tokens")}
    return rows, "every non-padding position"


def served_rows(ev: dict) -> dict[str, dict]:
    """eval.json's vLLM rows by scheme (none before v3, or where vLLM did not run)."""
    if schema_version(ev) < 3:
        return {}
    return {r["scheme"]: r for r in ev["rows"] if r["engine"] == "vllm"}


def quality_figures(rows: dict[str, dict], served: dict[str, dict]) -> dict[str, float]:
    """Each scheme's reply top-k KL vs BF16: as served where vLLM served it, else as emulated."""
    out = {}
    for n, r in rows.items():
        s = served.get(n, {})
        kl = s.get("kl_topk_reply_mean") if s.get("served") else r.get("kl_topk_reply_mean")
        if kl is not None:
            out[n] = kl
    return out


def _kl(r: dict) -> float | None:
    """A row's mean KL: the full KL where the emulation ran, else the served top-k KL (a lower bound); None for a
    model vLLM did not serve."""
    return r["kl_mean"] if r.get("kl_mean") is not None else r.get("kl_topk_mean")


def _kl_named(r: dict) -> str:
    """"mean KL 0.00123", or "mean top-k KL 0.00123" where only vLLM's top-k KL was measured."""
    return f"mean {'KL' if r.get('kl_mean') is not None else 'top-k KL'} {_fmt(_kl(r))}"


def _num(x) -> float:
    return float("nan") if x is None else x


def _fmt(x, spec=".3g"):
    return "n/a" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def _flips(r: dict) -> str:
    return "n/a" if r.get("flips_vs_bf16") is None else f"{r['flips_vs_bf16']}/{r['n_samples']}"


def _count(n, noun: str) -> str:
    """"1 sample", "4 samples"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _blocks_are(blocks: list[int]) -> str:
    """"Block 3 is", "Blocks 3, 5 are"."""
    listed = ", ".join(map(str, blocks))
    return f"Block {listed} is" if len(blocks) == 1 else f"Blocks {listed} are"


def _dropped(n, max_length) -> str:
    """", 2 samples left out (longer than --max-length 1024 tokens)", or nothing when none was."""
    if not n:
        return ""
    return f", {_count(n, 'sample')} left out (longer than --max-length {max_length} tokens)"


def _mb(n):
    return f"{n / 1e6:,.2f}"


def _verdict(check: dict | None, part: str) -> str:
    if not check:
        return "not run"
    res = check[part]
    if part == "static":
        return "pass" if res["ok"] else "FAIL: " + "; ".join(res["failures"][:2])
    if not res.get("ran"):
        reason = res.get("reason") or ""
        return reason if reason.startswith("skipped") else f"skipped ({reason})"
    return "pass" if res["ok"] else "FAIL: " + "; ".join((res.get("errors") or [res.get("reason", "")])[:2])


def recommendations(rows: dict[str, dict], plans: dict[str, dict], checks: dict[str, dict],
                    served: dict[str, dict] | None = None) -> dict:
    """Schemes to name. Where vLLM served the evaluation, its figures decide: answer accuracy as served against
    BF16 as served, and no scheme whose served quality departs from its emulation."""
    bf16 = rows["bf16"]
    served = served or {}
    departed = served_part.flagged(rows, served)
    passing = [n for n in plans if checks.get(n, {}).get("ok", False)]
    ok = [n for n in passing if n not in departed and _kl(rows[n]) is not None]

    def acc_ok(n):
        if served.get(n, {}).get("served") and served.get("bf16", {}).get("served"):
            a, b = _num(served[n]["answer_accuracy"]), _num(served["bf16"]["answer_accuracy"])
        else:
            a, b = _num(rows[n]["answer_accuracy"]), _num(bf16["answer_accuracy"])
        return a != a or b != b or a >= b - ACC_TOLERANCE

    safe = [n for n in ok if _kl(rows[n]) <= KL_NEAR_LOSSLESS and acc_ok(n)]
    smallest_safe = min(safe, key=lambda n: (plans[n]["effective_bits"], _kl(rows[n]))) if safe else None
    smallest = min(ok, key=lambda n: (plans[n]["effective_bits"], _kl(rows[n]))) if ok else None
    closest = min(ok, key=lambda n: _kl(rows[n])) if ok else None
    return {"serve_default": smallest_safe, "smallest": smallest, "closest_to_bf16": closest,
            "passing_checks": sorted(passing), "near_lossless": sorted(safe), "served_departs": departed,
            "used_served_figures": bool(served)}


def render(run: Path, sens: dict, plans: dict[str, dict], checks: dict[str, dict], ev: dict, manifest: dict,
           catalog_path: Path, figures: dict[str, str], bench: dict | None = None) -> tuple[str, dict]:
    rows, positions = eval_rows(ev)
    missing = [n for n in ("bf16", *plans) if n not in rows]
    if missing:
        raise FP8MixError(f"{run / 'eval.json'} has no row for {', '.join(missing)}; run fp8mix eval --run {run}")
    served = served_rows(ev)
    bf16 = rows["bf16"]
    rec = recommendations(rows, plans, checks, served)
    study = sens.get("study")
    versions = manifest.get("versions", {})
    model = manifest.get("model", {})
    cal = sens["calibration"]
    L = []
    add = L.append
    add(f"# fp8mix report: {sens['model']}\n")
    add("## Overview\n")
    add("FP8 halves the memory of a weight and runs matrix products on FP8 tensor cores, but not every layer of a "
        "language model tolerates it equally. This report scores how much each language-model linear of the model "
        "hurts the loss when it alone runs in FP8 (the AutoQuant loss-Fisher score Σ(∂L/∂Y ⊙ (Y_fp8 − Y))², as "
        "NVIDIA ModelOpt's auto_quantize defines it), with **image+text** calibration data, and compares the FP8 "
        "schemes derived from that one scoring pass: their coverage, their quality against BF16 on held-out data, "
        "and whether vLLM loads and runs them. It weighs the comparison above naming a single winner.\n")
    add(f"- Schemes: {len(plans)}; passing every vLLM check: {len(rec['passing_checks'])}.")
    n_served = sum(1 for n, r in served.items() if n != "bf16" and r.get("served"))
    if served:
        departs = rec["served_departs"]
        add(f"- Served by vLLM and compared with the emulation: {n_served} of {len(plans)}; "
            + (f"**served quality departs from the emulation for {', '.join(departs)}** (see Served quality)."
               if departs else "every served scheme within the noise between the engines."))
    if rec["serve_default"]:
        r = rows[rec["serve_default"]]
        add(f"- Smallest near-lossless scheme: **{rec['serve_default']}** ({_fmt(plans[rec['serve_default']]['effective_bits'], '.2f')} "
            f"effective bits, {_kl_named(r)} and top-1 agreement {_fmt(r['top1_agreement'], '.4f')} over "
            f"{positions}, {_flips(r)} answers changed against BF16).")
    if study:
        add(f"- Blocks in the most sensitive quartile under every scoring config: "
            f"{', '.join(map(str, study['consistently_sensitive_blocks'])) or 'none'}.")
    else:
        add(f"- The sensitivity study was skipped (rank stability across scoring configs and the control against "
            f"random block choices). Run it with `fp8mix score --run {run} --study` and then `fp8mix report --run "
            f"{run}`, or with `fp8mix run` without `--no-study`.")
    add("")

    add("## Setup\n")
    add("| | |\n|---|---|")
    add(f"| model | `{sens['model']}` ({model.get('fingerprint', '')[:12]}) |")
    layout = sens.get("model_layout", {})
    if layout.get("family"):
        add(f"| family | {layout['family']} (`{layout.get('architecture', '')}`) |")
    add(f"| LM blocks | {sens['n_blocks']} ({len(sens['groups'])} fused linear groups: qkv, o, gate_up, down) |")
    add("| always BF16 | vision tower, embeddings, lm_head |")
    add(f"| calibration | {cal['source']}: {_count(cal['n_samples'], 'sample')}, {_count(cal['n_tokens'], 'token')}, "
        f"{'with images' if cal['with_images'] else 'text only'}, seed {cal['seed']}, batch {cal['batch_size']}"
        f"{_dropped(cal.get('n_dropped_too_long'), cal.get('max_length'))} |")
    add(f"| loss | {cal['loss']} |")
    add(f"| AutoQuant | method {sens['method']}, FP8 format {sens['fp8_format']}, granularity {sens['granularity']}, "
        f"settings key `{sens['settings_key']}` |")
    add(f"| evaluation | {ev['data']}: {_count(ev['n_samples'], 'held-out sample')} (never used for calibration), "
        f"{_fmt(bf16['n_text_positions'], 'd')} positions counted ({positions}), "
        f"{_fmt(bf16['n_reply_positions'], 'd')} of them in replies, "
        f"{_fmt(bf16['n_answers'], 'd')} reference answers{_dropped(ev.get('n_dropped'), sens['settings'].get('max_length'))} |")
    add(f"| device | {manifest.get('device', 'cpu')} ({manifest.get('hardware', 'hardware not recorded')}) |")
    add("| versions | " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + " |")
    live_versions = sorted({c["live"].get("vllm_version") for c in checks.values() if c["live"].get("vllm_version")})
    add(f"| vLLM (live check) | {', '.join(live_versions) or 'not available'} |")
    add(f"| catalog | [{CATALOG_COPY}]({CATALOG_COPY}) (a copy of `{catalog_path}`) |\n")

    add("## Schemes at a glance\n")
    add("| scheme | rule | FP8 blocks | FP8 groups | eff. bits | LM weights MB | mean KL | p99 KL | top-1 agree | "
        "reply mean KL | reply top-1 | ppl | answer acc. | flips vs BF16 | vLLM static | vLLM live |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    add(f"| bf16 | — | 0/{sens['n_blocks']} | 0/{len(sens['groups'])} | 16.00 | {_mb(bf16['lm_weight_bytes'])} | 0 | 0 | 1 | "
        f"0 | 1 | {_fmt(bf16['ppl'], '.4f')} | {_fmt(bf16['answer_accuracy'], '.3f')} | 0 | — | — |")
    for name, p in plans.items():
        r, c = rows[name], checks.get(name)
        cov = p["coverage"]
        add(f"| {name} | {_rule(p)} | {cov['blocks_fp8']}/{cov['blocks_total']} | {cov['groups_fp8']}/{cov['groups_total']} | "
            f"{p['effective_bits']:.2f} | {_mb(r['lm_weight_bytes'])} | {_fmt(r['kl_mean'])} | {_fmt(r['kl_p99'])} | "
            f"{_fmt(r['top1_agreement'], '.4f')} | {_fmt(r['kl_reply_mean'])} | {_fmt(r['top1_reply_agreement'], '.4f')} | "
            f"{_fmt(r['ppl'], '.4f')} | {_fmt(r['answer_accuracy'], '.3f')} | {_flips(r)} | "
            f"{_verdict(c, 'static')} | {_verdict(c, 'live')} |")
    add("")
    add(f"Mean KL(BF16 ‖ scheme) in nats, p99 KL and top-1 agreement are over {positions}"
        + (" (the next token is real and not an image placeholder or vision marker; system prompt, user text and "
           "chat-template tokens count); the reply columns over the positions that predict the assistant's reply. "
           if positions == "text positions" else " (eval.json v1: rerun `fp8mix eval` for text and reply positions). ")
        + "Perplexity is over the reply tokens. Answer accuracy compares the greedy reply with the reference answer "
        "after normalisation (first sentence, case, punctuation, whitespace); flips count the samples whose "
        "normalised greedy reply differs from the BF16 model's, reference answer or not.\n")
    for key, caption in (("heatmap", "Sensitivity per block and group kind"),
                         ("blocks", "Per-block sensitivity and the chosen sets"),
                         ("pareto", "Quality against effective bits" + (", with the controls" if study else ""))):
        if key in figures:
            add(f"![{caption}]({figures[key]})\n")

    for name, p in plans.items():
        r, c = rows[name], checks.get(name)
        cov = p["coverage"]
        add(f"## {name}\n")
        add(f"Rule: {_rule(p)} (target {p['target_effective_bits']:g} effective bits). {p['rationale']}\n")
        add("| | FP8 | BF16 | total |\n|---|---|---|---|")
        add(f"| LM blocks (all groups FP8) | {cov['blocks_fp8']} | {cov['blocks_total'] - cov['blocks_fp8']} | {cov['blocks_total']} |")
        add(f"| fused groups | {cov['groups_fp8']} | {cov['groups_total'] - cov['groups_fp8']} | {cov['groups_total']} |")
        add(f"| linears | {cov['linears_fp8']} | {cov['linears_total'] - cov['linears_fp8']} | {cov['linears_total']} |")
        frac = cov["lm_params_fp8_fraction"]
        add(f"| LM linear parameters | {frac:.1%} | {1 - frac:.1%} | 100 % |\n")
        kinds = {k: sum(1 for g in p['fp8_groups'] if g.endswith('.' + k)) for k in group_kinds(sens)}
        add(f"Effective bits {p['effective_bits']:.2f}; predicted loss increase (sum of chosen scores) "
            f"{p['predicted_loss_increase']:.3g}. FP8 blocks: {', '.join(map(str, p['fp8_blocks'])) or 'none'}. "
            f"FP8 groups by kind: " + ", ".join(f"{k} {v}" for k, v in kinds.items()) + ".\n")
        add(f"Quality vs BF16 over {positions}: mean KL {_fmt(r['kl_mean'])}, p99 KL {_fmt(r['kl_p99'])}, top-1 "
            f"agreement {_fmt(r['top1_agreement'], '.4f')}; over reply positions: mean KL {_fmt(r['kl_reply_mean'])}, "
            f"p99 KL {_fmt(r['kl_reply_p99'])}, top-1 agreement {_fmt(r['top1_reply_agreement'], '.4f')}. Perplexity "
            f"{_fmt(r['ppl'], '.4f')} (BF16 {_fmt(bf16['ppl'], '.4f')}), answer accuracy {_fmt(r['answer_accuracy'], '.3f')} "
            f"(BF16 {_fmt(bf16['answer_accuracy'], '.3f')}; exact match {_fmt(r['answer_exact_match'], '.3f')}), "
            f"greedy answers changed against BF16: {_flips(r)}. "
            f"LM weights {_mb(r['lm_weight_bytes'])} MB (BF16 {_mb(bf16['lm_weight_bytes'])} MB), checkpoint "
            f"{_mb(r['checkpoint_bytes'])} MB. Files: [plan](plans/{name}.json), [checkpoint](checkpoints/{name}/), "
            f"[check](checks/{name}.json).\n")

    if study:
        add("## Sensitivity study\n")
        st = study["stability"]
        runs = {r["label"]: r for r in sens["runs"]}
        add("The base setting was scored again under other configs, one change at a time:\n")
        add("| config | method | samples | images | seed |\n|---|---|---|---|---|")
        for label in st["labels"]:
            s = runs[label]["settings"]
            add(f"| {label} | {s['method']} | {s['calib_samples']} | {'yes' if s['with_images'] else 'no'} | {s['seed']} |")
        add("")
        add("Rank stability of the block scores (Spearman ρ / Kendall τ against the base config):\n")
        add("| config | Spearman ρ | Kendall τ | Spearman ρ over groups |\n|---|---|---|---|")
        for i, label in enumerate(st["labels"]):
            add(f"| {label} | {st['spearman_blocks'][0][i]:.3f} | {st['kendall_blocks'][0][i]:.3f} | "
                f"{st['spearman_groups'][0][i]:.3f} |")
        add("")
        if "stability" in figures:
            add(f"![Rank stability]({figures['stability']})\n")
        cs = study["consistently_sensitive_blocks"]
        add(f"**Consistently sensitive blocks** (in the most sensitive quartile under every config): "
            f"{', '.join(map(str, cs)) or 'none'}. Keep these in BF16 whatever the budget.\n")
        pat = study["patterns"]
        add("Per-kind pattern (base config): share of the total score and mean score per parameter:\n")
        add("| kind | share of score | score per parameter |\n|---|---|---|")
        for k in group_kinds(sens):
            add(f"| {k} | {pat['kind_share'][k]:.1%} | {pat['kind_score_per_param'][k]:.3g} |")
        add("")
        add("Depth pattern: " + ", ".join(f"{part} blocks {pat['depth_blocks'][part][0]}–{pat['depth_blocks'][part][-1]} "
                                          f"hold {pat['depth_share'][part]:.1%}" for part in ("early", "middle", "late")
                                          if pat['depth_blocks'][part]) + ".\n")
        add(f"**Control** on {_count(study['control_samples'], 'held-out sample')}: mean KL(BF16 ‖ FP8) of the "
            "AutoQuant block choice against 20 random choices of as many blocks, and the first-K / last-K "
            "heuristics:\n")
        add("| coverage | blocks | AutoQuant | random (mean) | AutoQuant better than | first-K | last-K |")
        add("|---|---|---|---|---|---|---|")
        for frac, c in study["control"].items():
            add(f"| {float(frac):.0%} | {c['blocks']} | {c['autoquant']:.3g} | {c['random_mean']:.3g} | "
                f"{c['autoquant_beats_random']}/{len(c['random'])} random | {c['first_k']:.3g} | {c['last_k']:.3g} |")
        add("")

    L.extend(served_part.section(rows, served, ev.get("top_k", 0), figures.get("served")))
    L.extend(speed_part.section(bench, quality_figures(rows, served), list(plans)))
    if "speed" in figures:
        L.append(f"![Speed vs quality]({figures['speed']})\n")

    add("## vLLM compatibility\n")
    add("| scheme | checkpoint | static rule check | live vLLM load + generate | vLLM |\n|---|---|---|---|---|")
    for name in plans:
        c = checks.get(name)
        add(f"| {name} | [checkpoints/{name}](checkpoints/{name}/) | {_verdict(c, 'static')} | {_verdict(c, 'live')} | "
            f"{(c or {}).get('live', {}).get('vllm_version') or '—'} |")
    add("\nThe static check applies vLLM's loading rules without vLLM: fused q/k/v and gate/up uniform, every ignore "
        "entry matching a real module in either HF naming, no regex that vLLM would not remap, the vision tower "
        "excluded, tensor dtypes, shapes and scales agreeing with the config, FP8 dimensions suiting the kernels. "
        "The live check loads the checkpoint in vLLM, verifies that every planned FP8 layer holds FP8 weights and "
        "every BF16 layer BF16, and generates greedily for an image+text and a text prompt. vLLM's CPU build runs "
        "per-channel/per-token FP8 only; other formats get the static check there.\n")

    add("## Recommendations\n")
    if rec["serve_default"]:
        add(f"- **Serving with vLLM, quality first:** `{rec['serve_default']}` — the smallest scheme whose mean KL stays "
            f"under {KL_NEAR_LOSSLESS:g} nats/token and whose answer accuracy is within {ACC_TOLERANCE:.0%} of BF16.")
    else:
        add("- **Serving with vLLM, quality first:** no scheme met the near-lossless bar "
            f"(mean KL ≤ {KL_NEAR_LOSSLESS:g}, accuracy within {ACC_TOLERANCE:.0%}); stay in BF16 or use the closest scheme below.")
    if rec["smallest"]:
        r = rows[rec["smallest"]]
        add(f"- **Memory or throughput first:** `{rec['smallest']}` ({plans[rec['smallest']]['effective_bits']:.2f} bits, "
            f"{_kl_named(r)}, accuracy {_fmt(r['answer_accuracy'], '.3f')} vs {_fmt(bf16['answer_accuracy'], '.3f')}, "
            f"{_flips(r)} answers changed).")
    if rec["closest_to_bf16"]:
        add(f"- **Closest to BF16:** `{rec['closest_to_bf16']}`.")
    budget = [n for n in plans if "effective_bits" in plans[n]["rule"]]
    for n in budget:
        twin = [m for m in plans if "blocks_fraction" in plans[m]["rule"]
                and abs(plans[m]["effective_bits"] - plans[n]["effective_bits"]) < 0.05]
        for m in twin:
            if _kl(rows[n]) is None or _kl(rows[m]) is None:
                continue
            better = _kl(rows[n]) < _kl(rows[m])
            add(f"- At {plans[n]['effective_bits']:.0f} bits, group-level `{n}` has {_kl_named(rows[n])} "
                f"against whole-block `{m}` {_fmt(_kl(rows[m]))}: "
                f"{'prefer the group-level budget' if better else 'whole blocks do as well here'}.")
    if study and study["consistently_sensitive_blocks"]:
        add(f"- {_blocks_are(study['consistently_sensitive_blocks'])} sensitive under every config: "
            f"a hand-written scheme should keep {'it' if len(study['consistently_sensitive_blocks']) == 1 else 'them'} "
            "BF16.")
    if rec["used_served_figures"]:
        add("- Answer accuracy above is as vLLM serves each scheme (against BF16 served by vLLM).")
    for n, why in rec["served_departs"].items():
        add(f"- `{n}` is not recommended: as served it departs from its emulation ({'; '.join(why)}).")
    add("- Schemes that fail a vLLM check must not be served; the check file names the reason.\n")

    add("## Reproduce\n")
    add("```")
    add(manifest.get("command", "fp8mix run"))
    add(f"fp8mix report --run {run}")
    add("```\n")
    add(f"Catalog: [{CATALOG_COPY}]({CATALOG_COPY}), a copy of `{catalog_path}`. Run files: [run.json](run.json), "
        "[sensitivity.json](sensitivity.json), [eval.json](eval.json), [summary.json](summary.json), plans/, checks/.\n")
    add("## Out of scope\n")
    add("This report covers the language model. The vision tower, the embeddings and lm_head stay BF16 in every "
        "scheme; quantizing the vision tower (whose MLP width is not a multiple of 16 in the released Qwen2.5-VL "
        "models) is future work. Quality figures on the embedded tiny model show the method and the pipeline, not "
        "the behaviour of a production model.\n")

    summary = {
        "model": sens["model"], "n_blocks": sens["n_blocks"], "recommendations": rec,
        "consistently_sensitive_blocks": study["consistently_sensitive_blocks"] if study else None,
        "eval_positions": positions,
        "speed": {r["scheme"]: {"ok": r.get("ok"), "speedup_vs_bf16": r.get("speedup_vs_bf16", {}),
                                "medians": {w: m.get("median") for w, m in r.get("workloads", {}).items()}}
                  for r in bench["rows"]} if bench else None,
        "bf16": {k: bf16[k] for k in ("ppl", "answer_accuracy", "answer_exact_match", "lm_weight_bytes")},
        "schemes": {n: {"effective_bits": plans[n]["effective_bits"], "coverage": plans[n]["coverage"],
                        **{k: rows[n][k] for k in ("kl_mean", "kl_p99", "top1_agreement", "kl_reply_mean",
                                                   "kl_reply_p99", "top1_reply_agreement", "ppl", "answer_accuracy",
                                                   "answer_exact_match", "flips_vs_bf16", "lm_weight_bytes",
                                                   "checkpoint_bytes")},
                        "served": {k: served[n].get(k) for k in ("served", "reason", "error", "kl_topk_mean",
                                                                  "kl_topk_reply_mean", "top1_agreement",
                                                                  "top1_reply_agreement", "ppl", "answer_accuracy",
                                                                  "flips_vs_bf16", "tokens_per_s")} if n in served
                        else None,
                        "vllm_static_ok": checks.get(n, {}).get("static", {}).get("ok"),
                        "vllm_live_ok": checks.get(n, {}).get("live", {}).get("ok")} for n in plans},
    }
    return "\n".join(L), summary


def _rule(p: dict) -> str:
    r = p["rule"]
    if "blocks_fraction" in r:
        return f"least-sensitive {r['blocks_fraction']:.0%} of blocks"
    return f"≤ {r['effective_bits']:g} bits by {r.get('granularity', 'block')}"
