"""Every stage on small random Qwen2-VL and Qwen3-VL models: score, study, plan, export (compressed-tensors and
ModelOpt), the static vLLM check, eval and the report; and, where vLLM's CPU build serves the family (it serves
both: measured with .venv-vllm, vLLM 0.32), the live check of the full scheme against the BF16 source served by
vLLM (two engine starts per family).

A two-scheme catalog keeps it quick: half the blocks and every block in FP8 (fp8_dynamic, the format vLLM's CPU
build runs)."""

import json
from fnmatch import fnmatch

import pytest
import torch
from safetensors import safe_open

from fp8mix.context import RunOptions
from fp8mix.models import adapter_for, loading
from random_models import qwen2_vl_config, qwen3_vl_config, random_model_folder

CATALOG = """version: 1
defaults:
  fp8_format: fp8_dynamic
  autoquant: {method: gradient, calib_samples: 2, seed: 0, with_images: true}
always_bf16: [vision_tower, lm_head, embeddings]
schemes:
  half: {rule: {blocks_fraction: 0.5}, rationale: half of the blocks}
  full: {rule: {blocks_fraction: 1.0}, rationale: every block}
"""
FAMILIES = {"qwen2_vl": (qwen2_vl_config, False, "Qwen2-VL"), "qwen3_vl": (qwen3_vl_config, True, "Qwen3-VL")}


@pytest.fixture(scope="module", params=list(FAMILIES))
def run(request, tmp_path_factory):
    """A run through score, study, plan and export (both formats) on a random model of the family (Qwen2-VL with
    an untied lm_head, Qwen3-VL with a tied one)."""
    from fp8mix.export.stage import stage_export
    from fp8mix.plan.stage import stage_plan
    from fp8mix.score.stage import stage_score, stage_study

    config, tied, title = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    folder = random_model_folder(root / "model", config(tie_word_embeddings=tied))
    (root / "catalog.yaml").write_text(CATALOG)
    opts = RunOptions(run=root / "run", model=str(folder), catalog=str(root / "catalog.yaml"),
                      score_overrides={"batch_size": 2, "max_pixels": 128 * 128})
    stage_score(opts)
    study = stage_study(opts, n_control=2)
    stage_plan(opts)
    ct = stage_export(opts)
    mo = stage_export(opts, fmt="modelopt")
    return {"opts": opts, "folder": folder, "family": request.param, "title": title, "tied": tied, "study": study,
            "ct": ct, "mo": mo}


def _plan(r, name):
    return json.loads((r["opts"].run / "plans" / f"{name}.json").read_text())


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def test_scores_plans_and_study_name_the_family(run):
    r = run
    sens = json.loads((r["opts"].run / "sensitivity.json").read_text())
    assert sens["model_layout"]["family"] == r["title"] and sens["n_blocks"] == 3 and len(sens["groups"]) == 12
    assert all(g["score"] >= 0 for g in sens["groups"]) and r["study"]["control_samples"] > 0
    half, full = _plan(r, "half"), _plan(r, "full")
    assert len(full["fp8_groups"]) == 12 and len(half["fp8_blocks"]) in (1, 2)
    for plan in (half, full):
        assert "re:.*visual.*" in plan["ignore"] and "lm_head" in plan["ignore"]
        assert not any("visual" in m or "norm" in m for m in plan["fp8_modules"])


def test_checkpoints_keep_the_family_naming_and_bf16_parts(run):
    """FP8 weights only for the plan's LM linears, under the family's on-disk names; the vision tower (every
    merger), the q/k norms, embeddings and an untied lm_head copied bit for bit."""
    r = run
    src = _tensors(r["folder"])
    ad = adapter_for(loading.architecture(loading.read_config(r["folder"])))
    plan = _plan(r, "full")
    for fmt in ("ct", "mo"):
        out = _tensors(r[fmt]["full"])
        fp8 = {k[:-len(".weight")] for k, t in out.items() if t.dtype == torch.float8_e4m3fn}
        assert fp8 == {ad.to_disk(m) for m in plan["fp8_modules"]}
        for k, t in src.items():
            if k[:-len(".weight")] not in fp8:
                assert out[k].dtype == torch.bfloat16 and torch.equal(out[k], t), k
        prefix = "model.layers." if r["family"] == "qwen2_vl" else "model.language_model.layers."
        assert all(m.startswith(prefix) for m in fp8)
    vision = [k for k in src if "visual" in k]
    assert any("merger" in k for k in vision)
    if r["family"] == "qwen3_vl":
        assert any("deepstack_merger_list" in k for k in vision)
        assert any(k.endswith("self_attn.q_norm.weight") for k in src)
    assert ("lm_head.weight" in src) != r["tied"]


def test_static_check_passes_both_formats(run):
    from fp8mix.check.stage import stage_check

    results = stage_check(run["opts"], live=False)
    assert set(results) == {"half", "full", "half-modelopt", "full-modelopt"}
    assert results["full-modelopt"]["static"]["facts"]["quant_method"] == "modelopt"
    for name, res in results.items():
        assert res["static"]["ok"], (name, res["static"]["failures"])


def test_modelopt_exclude_list_keeps_the_vision_tower_bf16_in_vllm(run):
    """vLLM's ModelOpt config maps each exclude entry through the model's hf_to_vllm_mapper (`path*` split into
    `path` and `path.*`) and matches vLLM's layer names by substring or fnmatch: every vision linear, mergers
    included, must be excluded that way, and no LM linear the plan puts in FP8."""
    r = run
    net, ad = loading.build_empty(r["folder"])
    exclude = json.loads((r["mo"]["full"] / "config.json").read_text())["quantization_config"]["ignore"]
    split = [x for e in exclude for x in ((e[:-1], e[:-1] + ".*") if e.endswith("*") else (e,))]
    mapped = [ad.to_vllm(e[:-2]) + ".*" if e.endswith(".*") else ad.to_vllm(e) for e in split]

    def excluded(vllm_name):
        return any(e == vllm_name or e in vllm_name or fnmatch(vllm_name, e) for e in mapped)

    vision = ad.vision_linears(net)
    assert vision and all(excluded(ad.to_vllm(ad.to_disk(n))) for n in vision)
    assert not any(excluded(ad.to_vllm(ad.to_disk(m))) for m in _plan(r, "full")["fp8_modules"])


def test_eval_and_report_name_the_family(run, monkeypatch):
    from fp8mix.evaluate.stage import stage_eval
    from fp8mix.report.stage import stage_report

    r = run
    resolved, real_resolve = [], loading.resolve
    monkeypatch.setattr(loading, "resolve", lambda *a, **k: resolved.append(a) or real_resolve(*a, **k))
    stage_eval(r["opts"], n_eval=3, engine="transformers")
    assert len(resolved) == 1  # the model argument (a hub lookup when it is an id) is resolved once
    rows = {row["scheme"]: row for row in json.loads((r["opts"].run / "eval.json").read_text())["rows"]}
    assert {"bf16", "half", "full"} <= set(rows)
    assert rows["full"]["lm_weight_bytes"] < rows["half"]["lm_weight_bytes"] < rows["bf16"]["lm_weight_bytes"]
    text = stage_report(r["opts"]).read_text()
    assert r["title"] in text


@pytest.mark.vllm
def test_live_vllm_serves_the_full_scheme_like_the_bf16_source(run):
    """vLLM (CPU build) loads the family's FP8 checkpoint with one FP8 layer per fused group and the vision tower
    BF16, and its outputs on the probes stay within the live check's tolerances of the BF16 source's. The same
    engines serve the evaluation set, and the served eval reads it: vLLM renders the family's chat with the token
    ids fp8mix's processor gives (else served_tally stops), at every reply position."""
    from fp8mix.check.fidelity import probe_requests
    from fp8mix.check.live import engine_settings, serve, vllm_python
    from fp8mix.check.stage import check_folder
    from fp8mix.evaluate.heldout import eval_set
    from fp8mix.evaluate.metrics import placeholder_ids
    from fp8mix.evaluate.served import eval_requests, served_tally
    from fp8mix.models.processor import load_processor

    if vllm_python() is None:
        pytest.skip("vLLM not importable and .venv-vllm missing: make vllm-env builds it")
    proc = load_processor(run["folder"])
    es = eval_set(run["opts"], 3, proc)
    extra, engine = eval_requests(es.samples), engine_settings(es.max_length)
    reference = serve(run["folder"], probe_requests(None).extend(extra), engine=engine)
    assert reference["ran"] and reference["ok"], reference.get("errors")
    net, ad = loading.build_empty(run["folder"])
    plan = _plan(run, "full")
    res, served = check_folder(run["ct"]["full"], plan, net, ad, ad.layout(net), True, False, lambda: reference,
                               extra, engine)
    ref_replies = [reference["outputs"][f"eval/{i}/reply"]["text"].strip() for i in range(len(es.samples))]
    row = served_tally(served["outputs"], reference["outputs"], es.samples, proc, placeholder_ids(net.config),
                       "full").row(es.samples, ref_replies)
    assert row["n_reply_positions"] > 0 and row["kl_topk_reply_mean"] >= 0 and row["top1_reply_agreement"] > 0.8, row
    live = res["live"]
    assert res["ok"] and live["ran"] and live["ok"], (live.get("errors"), live.get("reason"))
    fp8 = {n for n, info in live["layers"].items() if info["weight_dtype"] == "float8_e4m3fn"}
    assert len(fp8) == len(plan["fp8_groups"]) and all(n.startswith("language_model.model.layers.") for n in fp8)
    assert any(n.startswith("visual.") and "merger" in n and info["weight_dtype"] == "bfloat16"
               for n, info in live["layers"].items())
