import json
import re

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
        assert cells[6] == (format(row["kl_mean"], ".3g") if row["scheme"] != "bf16" else "0")
        assert cells[8] == (format(row["top1_agreement"], ".4f") if row["scheme"] != "bf16" else "1")
        assert cells[9] == format(row["ppl"], ".4f")
        assert cells[10] == format(row["answer_accuracy"], ".3f")
        assert cells[5] == f"{row['lm_weight_bytes'] / 1e6:,.2f}"
        if row["scheme"] != "bf16":
            assert summary["schemes"][row["scheme"]]["kl_mean"] == row["kl_mean"]
    assert re.search(r"\| bf16 \| — \| 0/8 \|", text)


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
    run_all(forced, None, {**args, "eval": {"n_eval": 8}})
    assert (opts.run / "report.md").stat().st_mtime_ns != before["report.md"]
