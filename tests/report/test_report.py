import json
import re

import pytest

from fp8mix.plan.catalog import load_catalog

SECTIONS = ["## Overview", "## Setup", "## Schemes at a glance", "## Sensitivity study", "## vLLM compatibility",
            "## Recommendations", "## Reproduce", "## Out of scope"]


def test_report_has_every_section_scheme_and_figure(small_run):
    opts, _ = small_run
    text = (opts.run / "report.md").read_text()
    for s in SECTIONS:
        assert s in text, s
    for name in load_catalog()[0].schemes:
        assert f"## {name}\n" in text
        assert f"| {name} |" in text
    for fig in ("heatmap", "blocks", "pareto", "stability"):
        png = opts.run / "figures" / f"{fig}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"figures/{fig}.png" in text
    assert "Consistently sensitive blocks" in text and "random" in text


def test_report_numbers_equal_eval_json(small_run):
    opts, _ = small_run
    text = (opts.run / "report.md").read_text()
    ev = json.loads((opts.run / "eval.json").read_text())
    summary = json.loads((opts.run / "summary.json").read_text())
    for row in ev["rows"]:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {row['scheme']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        scheme = row["scheme"] != "bf16"
        assert cells[6] == (format(row["kl_mean"], ".3g") if scheme else "0")
        assert cells[8] == (format(row["top1_agreement"], ".4f") if scheme else "1")
        assert cells[9] == (format(row["kl_reply_mean"], ".3g") if scheme else "0")
        assert cells[10] == (format(row["top1_reply_agreement"], ".4f") if scheme else "1")
        assert cells[11] == format(row["ppl"], ".4f")
        assert cells[12] == format(row["answer_accuracy"], ".3f")
        assert cells[13] == (f"{row['flips_vs_bf16']}/{row['n_samples']}" if scheme else "0")
        assert cells[5] == f"{row['lm_weight_bytes'] / 1e6:,.2f}"
        if scheme:
            assert summary["schemes"][row["scheme"]]["kl_mean"] == row["kl_mean"]
            assert summary["schemes"][row["scheme"]]["flips_vs_bf16"] == row["flips_vs_bf16"]
            assert row["n_reply_positions"] < row["n_text_positions"]
    assert re.search(r"\| bf16 \| — \| 0/8 \|", text)


def test_report_reads_a_v1_eval_json(small_run, tmp_path):
    """An eval.json written before v2 (KL over every non-padding position, exact-match accuracy, no reply metrics
    or flips) still makes a report, which says what its figures cover."""
    import shutil

    from fp8mix.report.stage import stage_report
    from fp8mix.rundir import write_json

    opts, _ = small_run
    run = shutil.copytree(opts.run, tmp_path / "run")
    ev = json.loads((run / "eval.json").read_text())
    v1_fields = ("scheme", "kl_mean", "kl_p99", "top1_agreement", "ppl", "answer_accuracy", "n_samples",
                 "lm_weight_bytes", "checkpoint_bytes", "effective_bits")
    rows = [{**{k: r[k] for k in v1_fields}, "n_tokens": r["n_text_positions"] + 5} for r in ev["rows"]]
    doc = {k: ev[k] for k in ("model", "data", "n_samples", "eval_seed")}
    write_json(run / "eval.json", "eval", {**doc, "rows": rows})
    stage_report(type(opts)(**{**opts.__dict__, "run": run}))
    text = (run / "report.md").read_text()
    assert "over every non-padding position" in text and "eval.json v1" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| fp8_autoquant_full |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    full = next(r for r in rows if r["scheme"] == "fp8_autoquant_full")
    assert cells[6] == format(full["kl_mean"], ".3g")
    assert cells[9] == cells[10] == cells[12] == cells[13] == "n/a"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["schemes"]["fp8_autoquant_full"]["answer_exact_match"] == full["answer_accuracy"]


def test_run_resumes_and_force_redoes(small_run):
    from fp8mix.pipeline import run_all

    opts, args = small_run
    watched = ["sensitivity.json", "eval.json", "report.md", "summary.json", "plans/fp8_autoquant_top25.json",
               "checks/fp8_autoquant_top25.json", "checkpoints/fp8_autoquant_top25/model.safetensors"]
    before = {f: (opts.run / f).stat().st_mtime_ns for f in watched}
    run_all(opts, None, args)
    after = {f: (opts.run / f).stat().st_mtime_ns for f in watched}
    assert before == after  # nothing rewritten: every stage was skipped
    evaluated = (opts.run / "eval.json").read_bytes()
    (opts.run / "eval.json").unlink()
    run_all(opts, None, args)  # only eval is redone; it is deterministic, so the report's inputs are unchanged
    assert (opts.run / "eval.json").read_bytes() == evaluated
    assert (opts.run / "report.md").stat().st_mtime_ns == before["report.md"]
    forced = type(opts)(**{**opts.__dict__, "force": True})
    run_all(forced, "plan", args)
    assert (opts.run / "plans/fp8_autoquant_top25.json").read_bytes()  # redone, same bytes (deterministic)
    run_all(forced, None, {**args, "eval": {"n_eval": 8, "engine": "transformers"}})
    assert (opts.run / "report.md").stat().st_mtime_ns != before["report.md"]


def test_quick_run_without_the_study(tmp_path):
    """`fp8mix run --no-study`: no study is scored, the report has no study section and says how to run it; the
    default device ("auto") is recorded resolved, as run.json and the report show it."""
    from typer.testing import CliRunner

    from fp8mix import distributed
    from fp8mix.cli import app

    run = tmp_path / "quick"
    result = CliRunner().invoke(app, ["run", "--out", str(run), "--calib-samples", "4", "--batch-size", "4",
                                      "--eval-samples", "4", "--no-live", "--no-study"])
    assert result.exit_code == 0, result.output
    assert "study" not in json.loads((run / "sensitivity.json").read_text())
    text = (run / "report.md").read_text()
    assert "## Sensitivity study" not in text and "Consistently sensitive blocks" not in text
    assert "The sensitivity study was skipped" in text
    assert f"`fp8mix score --run {run} --study`" in text and "without `--no-study`" in text
    device = distributed.resolve_device("auto")
    assert json.loads((run / "run.json").read_text())["device"] == device
    assert f"| device | {device} (" in text


def test_report_links_resolve_in_a_copied_run(small_run, tmp_path):
    """Every link and figure of report.md is relative to the run directory: a copied report keeps working."""
    import shutil

    opts, _ = small_run
    copy = shutil.copytree(opts.run, tmp_path / "elsewhere")
    text = (copy / "report.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert len(links) > 10 and any(t.startswith("figures/") for t in links)
    for target in links:
        assert not target.startswith("/") and str(opts.run) not in target, target
        assert (copy / target).exists(), target
    assert (copy / "catalog.yaml").read_bytes() == load_catalog()[1].read_bytes()


@pytest.mark.parametrize("blocks, phrase", [([0], "Block 0 is sensitive"), ([0, 3], "Blocks 0, 3 are sensitive")])
def test_report_counts_agree_with_their_nouns(small_run, tmp_path, blocks, phrase):
    import shutil

    from fp8mix.context import RunOptions
    from fp8mix.report.stage import stage_report
    from fp8mix.rundir import read_json, write_json

    opts, _ = small_run
    run = shutil.copytree(opts.run, tmp_path / "run", ignore=shutil.ignore_patterns("*.safetensors"))
    sens = read_json(run / "sensitivity.json", "sensitivity")
    sens.pop("schema")
    sens["study"]["consistently_sensitive_blocks"] = blocks
    sens["study"]["control_samples"] = 1
    write_json(run / "sensitivity.json", "sensitivity", sens)
    text = stage_report(RunOptions(run=run)).read_text()
    assert phrase in text
    assert "Blocks 0 is" not in text and "Block 0, 3" not in text
    assert "**Control** on 1 held-out sample:" in text


def test_report_puts_served_beside_emulated_and_flags_a_departure(small_run, tmp_path):
    """With vLLM rows in eval.json, the report shows served beside emulated per scheme, draws one against the
    other, flags a scheme whose served quality departs beyond the engines' noise and recommends it nowhere."""
    import shutil

    from fp8mix.report.served import DEPARTURE
    from fp8mix.report.stage import stage_report
    from fp8mix.rundir import write_json

    opts, _ = small_run
    run = shutil.copytree(opts.run, tmp_path / "run")
    ev = json.loads((run / "eval.json").read_text())
    emulated = [r for r in ev["rows"] if r["engine"] == "transformers"]
    served = []
    for r in emulated:
        s = {k: v for k, v in r.items() if not k.startswith("kl_") or k.startswith("kl_topk")}
        s.update(engine="vllm", served=True, vllm_version="0.0-test", tokens_per_s=100.0)
        if r["scheme"] == "fp8_autoquant_top50":
            s["top1_reply_agreement"] = r["top1_reply_agreement"] - 2 * DEPARTURE["top1_reply_drop"]
        served.append(s)
    doc = {k: v for k, v in ev.items() if k not in ("schema", "rows")}
    write_json(run / "eval.json", "eval", {**doc, "rows": emulated + served}, version=3)
    stage_report(type(opts)(**{**opts.__dict__, "run": run}))
    text = (run / "report.md").read_text()
    assert "## Served quality: emulated vs vLLM" in text and "figures/served.png" in text
    assert (run / "figures" / "served.png").read_bytes()[:4] == b"\x89PNG"
    lines = {ln.split("|")[1].strip(): ln for ln in text.splitlines()
             if ln.startswith("| fp8_autoquant_") and ("yes, within noise" in ln or "**DEPARTS**" in ln)}
    assert "**DEPARTS**" in lines["fp8_autoquant_top50"]
    assert sum("yes, within noise" in ln for ln in lines.values()) == len(emulated) - 2  # all but bf16 and top50
    assert "`fp8_autoquant_top50` is not recommended" in text
    summary = json.loads((run / "summary.json").read_text())
    rec = summary["recommendations"]
    assert list(rec["served_departs"]) == ["fp8_autoquant_top50"] and rec["used_served_figures"]
    assert "fp8_autoquant_top50" not in (rec["serve_default"], rec["smallest"], rec["closest_to_bf16"])
    assert summary["schemes"]["fp8_autoquant_full"]["served"]["tokens_per_s"] == 100.0


def test_report_shows_served_speed_from_bench_json(small_run, tmp_path):
    """A bench.json in the run (fp8mix bench on a GPU) gives the report a speed table, a speed-vs-quality figure
    and the speed-ups in summary.json; a model that did not run says why."""
    import shutil

    from fp8mix.bench.stage import BENCH_VERSION, add_speedups
    from fp8mix.report.stage import stage_report
    from fp8mix.rundir import write_json

    opts, _ = small_run
    run = shutil.copytree(opts.run, tmp_path / "run")
    names = ["bf16", "fp8_autoquant_top25", "fp8_autoquant_full", "fp8_autoquant_bits12"]
    rows = _bench_rows(run, names)
    rows.append({"scheme": "fp8_autoquant_bits10", "ok": False, "error": "not run: time budget", "workloads": {}})
    add_speedups(rows)
    write_json(run / "bench.json", "bench", {"device": {"name": "GPU", "count": 1}, "vllm_version": "0.0-test",
                                            "repeats": 3, "rows": rows}, version=BENCH_VERSION)
    stage_report(type(opts)(**{**opts.__dict__, "run": run}))
    text = (run / "report.md").read_text()
    assert "## Served speed (vLLM)" in text and "figures/speed.png" in text
    full = next(ln for ln in text.splitlines() if ln.startswith("| fp8_autoquant_full |") and "×" not in ln
                and "(±" in ln)
    assert "1,200 (±2.0%)" in full and "| 1.20 |" in full
    assert "not run: time budget" in text
    summary = json.loads((run / "summary.json").read_text())
    assert summary["speed"]["fp8_autoquant_full"]["speedup_vs_bf16"]["mixed"] == pytest.approx(1.2)
    assert (run / "figures" / "speed.png").read_bytes()[:4] == b"\x89PNG"


def _bench_rows(run, names, keys=None):
    """bench.json rows (before add_speedups) for `names`, 1000, 1100, ... tok/s on every workload, each row keyed by
    the model it measured: by default the run's own source and checkpoints."""
    from fp8mix import manifest
    from fp8mix.check.live import folder_key

    rows = []
    for i, name in enumerate(names):
        key = (manifest.load(run)["model"]["fingerprint"] if name == "bf16"
               else folder_key(run / "checkpoints" / name))
        rows.append({"scheme": name, "ok": True, "error": None, "engine_start_s": 60.0, "kv_cache": None,
                     "model_key": (keys or {}).get(name, key),
                     "workloads": {w: {"median": 1000.0 * (1 + 0.1 * i), "spread": 0.02, "metric": "total_tok_s"}
                                   for w in ("prefill_images", "decode", "mixed")}})
    return rows


def _speed_lines(text):
    """The speed table's rows of report.md by scheme."""
    part = text.split("## Served speed (vLLM)")[1].split("\n## ")[0]
    return {ln.split("|")[1].strip(): ln for ln in part.splitlines() if ln.startswith("| ") and "---" not in ln}


def test_report_speed_rows_of_other_models_are_stale_and_missing_schemes_show(small_run, tmp_path):
    """A bench.json row measured on another checkpoint than the run's (re-exported since, another model) or that
    does not say which one is shown as stale, with no speed-up and outside the figure; a stale BF16 row leaves no
    speed-up at all; a scheme of the run without a bench row shows as not measured; the KL column is named as the
    figure it holds."""
    import shutil

    from fp8mix.bench.stage import BENCH_VERSION, add_speedups
    from fp8mix.report.stage import stage_report
    from fp8mix.rundir import write_json

    opts, _ = small_run
    run = shutil.copytree(opts.run, tmp_path / "run", ignore=shutil.ignore_patterns("*.safetensors"))
    names = ["bf16", "fp8_autoquant_top25", "fp8_autoquant_full", "fp8_autoquant_bits12"]

    def report(keys):
        rows = _bench_rows(run, names, keys)
        add_speedups(rows)
        write_json(run / "bench.json", "bench", {"device": {"name": "GPU", "count": 1}, "vllm_version": "0.0-test",
                                                "repeats": 3, "rows": rows}, version=BENCH_VERSION)
        stage_report(type(opts)(**{**opts.__dict__, "run": run}))
        return _speed_lines((run / "report.md").read_text()), json.loads((run / "summary.json").read_text())

    lines, summary = report({"fp8_autoquant_full": "0" * 64, "fp8_autoquant_bits12": None})
    head = lines["scheme"]
    assert "reply top-k KL" in head and "mean KL" not in head
    assert "| 1.10 |" in lines["fp8_autoquant_top25"] and "stale" not in lines["fp8_autoquant_top25"]
    for name in ("fp8_autoquant_full", "fp8_autoquant_bits12"):
        assert "stale" in lines[name] and "1,200" not in lines[name] and "1.20" not in lines[name], lines[name]
        assert not summary["speed"][name]["ok"] and summary["speed"][name]["speedup_vs_bf16"] == {}
    assert "not measured" in lines["fp8_autoquant_top50"]   # a scheme of the run that bench.json lacks
    assert summary["speed"]["fp8_autoquant_top25"]["speedup_vs_bf16"]["mixed"] == pytest.approx(1.1)

    lines, summary = report({"bf16": "0" * 64})
    assert "stale" in lines["bf16"]
    assert all(not s["speedup_vs_bf16"] for s in summary["speed"].values())
    assert "1,100" in lines["fp8_autoquant_top25"] and "1.10" not in lines["fp8_autoquant_top25"]
    assert not (run / "figures" / "speed.png").exists() or "figures/speed.png" not in (run / "report.md").read_text()
