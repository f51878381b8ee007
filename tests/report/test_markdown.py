import json
import shutil

import pytest

from fp8mix.errors import FP8MixError
from fp8mix.report.stage import stage_report
from fp8mix.rundir import read_json, write_json


def _copy(small_run, tmp_path):
    opts, _ = small_run
    run = shutil.copytree(opts.run, tmp_path / "run", ignore=shutil.ignore_patterns("*.safetensors"))
    return type(opts)(**{**opts.__dict__, "run": run}), run


def _rewrite(path, kind, **changes):
    doc = json.loads(path.read_text())
    version = int(doc.pop("schema").rsplit("/v", 1)[1])
    write_json(path, kind, {**doc, **changes}, version=version)


def test_one_consistently_sensitive_block_is_it_not_them(small_run, tmp_path):
    opts, run = _copy(small_run, tmp_path)
    sens = read_json(run / "sensitivity.json", "sensitivity")
    _rewrite(run / "sensitivity.json", "sensitivity", study={**sens["study"], "consistently_sensitive_blocks": [3]})
    text = stage_report(opts).read_text()
    assert "Block 3 is sensitive under every config: a hand-written scheme should keep it BF16." in text


def test_a_skipped_live_check_says_skipped_once(small_run, tmp_path):
    opts, run = _copy(small_run, tmp_path)
    text = stage_report(opts).read_text()
    assert json.loads((run / "checks" / "fp8_autoquant_full.json").read_text())["live"]["reason"] == \
        "skipped (--no-live)"
    assert "| skipped (--no-live) |" in text and "skipped (skipped" not in text


def test_dropped_samples_are_reported(small_run, tmp_path):
    """Samples longer than --max-length are left out and counted in sensitivity.json and eval.json; the report
    says how many, for calibration and for evaluation."""
    opts, run = _copy(small_run, tmp_path)
    sens = read_json(run / "sensitivity.json", "sensitivity")
    _rewrite(run / "sensitivity.json", "sensitivity", calibration={**sens["calibration"], "n_dropped_too_long": 3})
    _rewrite(run / "eval.json", "eval", n_dropped=1)
    text = stage_report(opts).read_text()
    cal = next(ln for ln in text.splitlines() if ln.startswith("| calibration |"))
    ev = next(ln for ln in text.splitlines() if ln.startswith("| evaluation |"))
    assert "3 samples left out (longer than --max-length 1024 tokens)" in cal
    assert "1 sample left out (longer than --max-length" in ev
    _rewrite(run / "eval.json", "eval", n_dropped=0)
    text = stage_report(opts).read_text()
    assert "left out" not in next(ln for ln in text.splitlines() if ln.startswith("| evaluation |"))


def test_an_eval_json_of_vllm_rows_only_makes_a_report(small_run, tmp_path):
    """`fp8mix eval --engine vllm`: no emulated row, and a scheme vLLM could not serve has no figures. The report
    uses the served top-k KL, shows the unserved scheme as n/a and recommends it nowhere."""
    opts, run = _copy(small_run, tmp_path)
    ev = json.loads((run / "eval.json").read_text())
    served = []
    for r in (r for r in ev["rows"] if r["engine"] == "transformers"):
        keep = ("scheme", "n_samples", "lm_weight_bytes", "checkpoint_bytes", "effective_bits")
        if r["scheme"] == "fp8_autoquant_full":
            served.append({**{k: r[k] for k in keep}, "engine": "vllm", "served": False, "error": "vLLM failed"})
            continue
        s = {k: v for k, v in r.items() if not k.startswith("kl_") or k.startswith("kl_topk")}
        served.append({**s, "engine": "vllm", "served": True, "vllm_version": "0.0-test", "tokens_per_s": 1.0})
    _rewrite(run / "eval.json", "eval", rows=served)
    text = stage_report(opts).read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert "fp8_autoquant_full" not in summary["recommendations"].values()
    line = next(ln for ln in text.splitlines() if ln.startswith("| fp8_autoquant_full | least"))
    assert "| n/a | n/a | n/a |" in line
    bits12 = next(r for r in served if r["scheme"] == "fp8_autoquant_bits12")
    assert f"`fp8_autoquant_bits12` has mean top-k KL {bits12['kl_topk_mean']:.3g}" in text
    # no emulation ran: the served quality section compares nothing with it
    assert "yes, within noise" not in text and not summary["recommendations"]["served_departs"]
    line = next(ln for ln in text.splitlines() if ln.startswith("| fp8_autoquant_bits12 | n/a |"))
    assert f"| {bits12['kl_topk_reply_mean']:.3g} |" in line


def test_a_scheme_with_no_eval_row_is_one_clear_error(small_run, tmp_path):
    opts, run = _copy(small_run, tmp_path)
    ev = json.loads((run / "eval.json").read_text())
    _rewrite(run / "eval.json", "eval", rows=[r for r in ev["rows"] if r["scheme"] != "fp8_autoquant_top50"])
    with pytest.raises(FP8MixError, match="eval.json has no row for fp8_autoquant_top50; run fp8mix eval"):
        stage_report(opts)
