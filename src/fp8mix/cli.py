"""fp8mix command line: `fp8mix info | score | schemes | plan | export | check | eval | bench | report | run`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import FP8MixError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Sensitivity-guided FP8 mixed precision for vision-language models served by vLLM.")
console = Console()
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id or local folder; default: the embedded "
                                                                      "tiny Qwen2.5-VL")]


def _version(value: bool) -> None:
    if value:
        console.print(f"fp8mix {__version__}")
        raise typer.Exit()


@app.callback()
def _root(ctx: typer.Context,
          version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    from . import distributed

    if distributed.launched() and ctx.invoked_subcommand != "score":
        raise FP8MixError(f"only `fp8mix score` runs under torchrun; run `fp8mix {ctx.invoked_subcommand}` as one "
                          "process (it can still use several GPUs with --device-map auto)")


@app.command()
def info(model: Annotated[Optional[str], typer.Option(
            "--model", "-m", help="Hub id, local folder or config.json; the Qwen2.5-VL 3B/7B/32B/72B hub ids use the "
                                  "shipped configs (no network); default: the embedded tiny Qwen2.5-VL")] = None,
         batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Scoring batch size to size for")] = 8,
         max_length: Annotated[int, typer.Option("--max-length", min=16, help="Tokens per sample to size for")]
         = 1024) -> None:
    """Show the model as fp8mix sees it (LM blocks, fused linear groups, what stays BF16 and why) and the memory
    each stage will need. Reads config.json only."""
    from .models.info import describe

    describe(model, console, batch_size, max_length)


Run = Annotated[Path, typer.Option("--run", "--out", "-o", help="Run directory")]
CatalogOpt = Annotated[Optional[str], typer.Option("--catalog", help="Scheme catalog YAML (default: the built-in one)")]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch")]
Force = Annotated[bool, typer.Option("--force", help="Redo the stage even if its outputs exist")]
CalibSamples = Annotated[Optional[int], typer.Option("--calib-samples", help="Override the catalog's sample count")]
Data = Annotated[Optional[str], typer.Option("--data", help="Calibration data: embedded, real, FILE.jsonl, an image "
                                                            "folder or hf:NAME (default: embedded for the embedded "
                                                            "model, real for any other)")]
TextOnly = Annotated[bool, typer.Option("--text-only", help="Drop the images from calibration (for comparison)")]
Method = Annotated[Optional[str], typer.Option("--method", help="gradient (default) or kl_div")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Calibration seed")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Calibration batch size")]
MaxLength = Annotated[Optional[int], typer.Option(
    "--max-length", min=16, help="Tokens per sample (default 1024); longer samples are dropped and counted, never cut")]
MaxPixels = Annotated[Optional[int], typer.Option(
    "--max-pixels", min=784, help="Larger images are scaled down to this many pixels first (default 401408 = 512 "
                                  "image tokens)")]
DeviceMap = Annotated[Optional[str], typer.Option("--device-map", help="auto: spread the model over the GPUs "
                                                                       "(accelerate), for models larger than one GPU")]


def _options(run, model=None, catalog=None, device="auto", force=False, calib_samples=None, data=None,
             text_only=False, method=None, seed=None, batch_size=None, device_map=None, max_length=None,
             max_pixels=None):
    from pydantic import ValidationError

    from .context import RunOptions
    from .score.settings import AutoQuantSettings

    if run.exists() and not run.is_dir():
        raise FP8MixError(f"run directory {run} is a file; pass a new or existing directory")
    overrides = {"calib_samples": calib_samples, "data": data, "method": method, "seed": seed,
                 "batch_size": batch_size, "with_images": False if text_only else None, "max_length": max_length,
                 "max_pixels": max_pixels}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        AutoQuantSettings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]).replace("_", "-")
        raise FP8MixError(f"--{name} {err.get('input')!r}: {err['msg']}") from None
    return RunOptions(run=run, model=model, catalog=catalog, device=device, device_map=device_map, force=force,
                      score_overrides=overrides)


@app.command()
def score(run: Run, model: ModelOpt = None, catalog: CatalogOpt = None, device: Device = "auto",
          calib_samples: CalibSamples = None, data: Data = None, text_only: TextOnly = False, method: Method = None,
          seed: Seed = None, batch_size: BatchSize = None, threads: Threads = None, force: Force = False,
          max_length: MaxLength = None, max_pixels: MaxPixels = None,
          study: Annotated[bool, typer.Option("--study", help="Also score under the study's configs (seeds, "
                                                              "sample counts, text only, KL) and run the control")]
          = False, device_map: DeviceMap = None,
          low_memory: Annotated[bool, typer.Option("--low-memory", help="Quantize each weight to FP8 when it is "
                                                                        "used instead of keeping FP8 copies of all "
                                                                        "LM linears (same scores, ~0.5 byte per "
                                                                        "parameter less memory, a little slower)")]
          = False,
          gpus: Annotated[Optional[int], typer.Option("--gpus", help="Data-parallel processes, one per GPU (launches "
                                                                     "torchrun); with --device-map auto the visible "
                                                                     "GPUs are split evenly among them")] = None) -> None:
    """Score every LM linear group's FP8 sensitivity (AutoQuant) once per distinct catalog setting.

    Data parallel: `fp8mix score --gpus N …`, or `torchrun --nproc-per-node N -m fp8mix score …` (CPU: gloo)."""
    from .context import set_threads
    from .score.stage import stage_score, stage_study
    from . import distributed

    if gpus is not None and not distributed.launched():
        raise typer.Exit(_launch_torchrun(gpus))
    set_threads(threads)
    device = distributed.init(device)
    opts = _options(run, model, catalog, device, force, calib_samples, data, text_only, method, seed, batch_size,
                    device_map, max_length, max_pixels)
    opts.low_memory = low_memory
    main, n = distributed.is_main(), distributed.world_size()
    try:
        done = stage_score(opts)
        if study:
            stage_study(opts)
    except BaseException:
        distributed.leave()  # no barrier: the other ranks may be waiting in a collective; torchrun stops them
        raise
    distributed.close()
    if main:
        console.print(f"wrote {run / 'sensitivity.json'} ({len(done)} scoring pass(es) in {run / 'scores'}"
                      + (f", {n} processes)" if n > 1 else ")"))


def _launch_torchrun(n: int) -> int:
    """Re-run this command under torchrun with n processes, one or more GPUs each; returns its exit status."""
    import subprocess

    import torch

    if n < 1:
        raise FP8MixError("--gpus must be at least 1")
    if not torch.cuda.is_available() or torch.cuda.device_count() < n:
        raise FP8MixError(f"--gpus {n} needs {n} CUDA GPU(s); this machine has {torch.cuda.device_count()}. "
                          "On CPUs run `torchrun --nproc-per-node N -m fp8mix score …` instead")
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            args.append(a)
    if not any(a == "--device" or a.startswith("--device=") for a in args):
        args += ["--device", "cuda"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "fp8mix",
           *args]
    return subprocess.call(cmd)


@app.command()
def plan(run: Run, catalog: CatalogOpt = None, calib_samples: CalibSamples = None, data: Data = None,
         text_only: TextOnly = False, method: Method = None, seed: Seed = None,
         batch_size: BatchSize = None) -> None:
    """Decide FP8 or BF16 for every fused group, for every scheme of the catalog."""
    from .context import require_run
    from .plan.stage import stage_plan

    require_run(run)
    plans = stage_plan(_options(run, None, catalog, "cpu", False, calib_samples, data, text_only, method, seed,
                                batch_size))
    table = Table(title="plans")
    for col in ("scheme", "FP8 blocks", "FP8 groups", "eff. bits", "predicted loss increase"):
        table.add_column(col)
    from .rundir import read_json

    for name, path in plans.items():
        p = read_json(path, "plan")
        c = p["coverage"]
        table.add_row(name, f"{c['blocks_fp8']}/{c['blocks_total']}", f"{c['groups_fp8']}/{c['groups_total']}",
                      f"{p['effective_bits']:.2f}", f"{p['predicted_loss_increase']:.3g}")
    console.print(table)


@app.command()
def export(run: Run, scheme: Annotated[Optional[str], typer.Option("--scheme", help="One scheme (default: all)")] = None,
           fmt: Annotated[str, typer.Option("--format", help="compressed-tensors or modelopt")] = "compressed-tensors",
           device: Device = "auto", force: Force = False, device_map: DeviceMap = None) -> None:
    """Write one vLLM-loadable checkpoint per plan to checkpoints/<scheme>/ (streamed from the source files; the
    model is loaded only to calibrate fp8_static input scales, on --device / --device-map)."""
    from .export.stage import stage_export
    from .context import require_run

    require_run(run)
    if fmt not in ("compressed-tensors", "modelopt"):
        raise FP8MixError(f"unknown --format {fmt!r}; use compressed-tensors or modelopt")
    stage_export(_options(run, device=device, force=force, device_map=device_map), scheme=scheme, fmt=fmt)
    console.print(f"checkpoints in {run / 'checkpoints'}")


@app.command()
def check(run: Run, live: Annotated[bool, typer.Option("--live/--no-live", help="Also load and run each checkpoint "
                                                                               "in vLLM where vLLM is importable")]
          = True, device: Device = "auto",
          eval_samples: Annotated[int, typer.Option("--eval-samples", help="Held-out samples the live check's "
                                                                           "engines also serve for the served eval "
                                                                           "(0: none)")] = 64) -> None:
    """Check every checkpoint against vLLM's loading rules, then in vLLM itself; non-zero exit on a failure."""
    from .check.stage import stage_check
    from .context import require_run

    require_run(run)
    results = stage_check(_options(run, device=device), live=live, n_eval=eval_samples)
    table = Table(title="vLLM compatibility")
    for col in ("scheme", "static", "live", "reasons"):
        table.add_column(col)
    for name, r in results.items():
        live_r = r["live"]
        table.add_row(name, "pass" if r["static"]["ok"] else "FAIL",
                      "pass" if live_r["ok"] else "FAIL" if live_r["ok"] is False else "skipped",
                      "; ".join(r["static"]["failures"][:2] + live_r.get("errors", [])[:2]
                                + ([live_r["reason"]] if live_r.get("reason") else [])))
    console.print(table)
    failed = [n for n, r in results.items() if not r["ok"]]
    if failed:
        raise FP8MixError(f"{len(failed)} checkpoint(s) failed the vLLM check: {', '.join(failed)} (see {run / 'checks'})")


Engine = Annotated[str, typer.Option("--engine", help="transformers (fp8mix's emulation), vllm (each checkpoint "
                                                      "served by vLLM) or auto (both where vLLM is importable)")]


def _eval_table(doc: dict) -> Table:
    table = Table(title=f"quality vs BF16 ({doc['n_samples']} held-out samples; KL and top-1 over text positions; "
                        f"top-{doc['top_k']} KL: a lower bound of the KL, the one vLLM gives)")
    for col in ("scheme", "engine", "eff. bits", "mean KL", "top-k KL", "top-1", "reply top-k KL", "reply top-1",
                "ppl", "accuracy", "flips", "LM MB"):
        table.add_column(col)
    for r in doc["rows"]:
        if r.get("served") is False:
            table.add_row(r["scheme"], r["engine"], f"{r['effective_bits']:.2f}", r.get("error") or r["reason"])
            continue
        table.add_row(r["scheme"], r["engine"], f"{r['effective_bits']:.2f}",
                      f"{r['kl_mean']:.3g}" if "kl_mean" in r else "-", f"{r['kl_topk_mean']:.3g}",
                      f"{r['top1_agreement']:.4f}", f"{r['kl_topk_reply_mean']:.3g}",
                      f"{r['top1_reply_agreement']:.4f}", f"{r['ppl']:.4f}", f"{r['answer_accuracy']:.3f}",
                      f"{r['flips_vs_bf16']}/{r['n_samples']}", f"{r['lm_weight_bytes'] / 1e6:.2f}")
    return table


@app.command(name="eval")
def eval_(run: Run, eval_samples: Annotated[int, typer.Option("--eval-samples", help="Held-out samples")] = 64,
          engine: Engine = "auto", device: Device = "auto", threads: Threads = None, device_map: DeviceMap = None,
          max_length: MaxLength = None, max_pixels: MaxPixels = None) -> None:
    """Evaluate BF16 and every exported scheme on the held-out set, as emulated and as vLLM serves them: KL,
    top-1 agreement, perplexity, accuracy, flips."""
    from .evaluate.stage import served_errors, stage_eval
    from .context import require_run, set_threads

    require_run(run)
    set_threads(threads)
    doc = stage_eval(_options(run, device=device, device_map=device_map, max_length=max_length,
                              max_pixels=max_pixels), eval_samples, engine)
    console.print(_eval_table(doc))
    errors = served_errors(doc)
    if errors:
        raise FP8MixError(f"{len(errors)} served evaluation(s) failed: {errors[0]} (see {run / 'eval.json'})")


@app.command()
def bench(run: Run, repeats: Annotated[int, typer.Option("--repeats", help="Timed repeats per workload (>= 3)")] = 3,
          scheme: Annotated[Optional[list[str]], typer.Option("--scheme", help="Only these (repeatable; bf16 for "
                                                                              "the source)")] = None,
          time_budget: Annotated[Optional[float], typer.Option("--time-budget", help="Start no engine after this "
                                                                                     "many seconds")] = None) -> None:
    """Served speed in vLLM on a CUDA GPU: the BF16 source and every checkpoint, CUDA graphs on, three workloads
    (prefill with images, small-batch decode, mixed), engine start timed apart; writes bench.json."""
    from .bench.stage import stage_bench

    doc = stage_bench(_options(run), repeats=repeats, schemes=scheme, time_budget=time_budget)
    table = Table(title=f"served speed, vLLM {doc['vllm_version']} on {doc['device']['name']} (median of "
                        f"{doc['repeats']}; x BF16; ± spread = (max − min) / median, as in the report)")
    for col in ("scheme", "engine start s", *doc["workloads"], "error"):
        table.add_column(col)

    def cell(m: dict, speedup: float | None) -> str:
        spread = "-" if m.get("spread") is None else f"{m['spread']:.1%}"
        ratio = "-" if speedup is None else f"{speedup:.2f}x"
        return f"{m['median']:.0f} tok/s ({ratio}, ±{spread})"

    for r in doc["rows"]:
        cells = [cell(r["workloads"][w], r["speedup_vs_bf16"].get(w)) if w in r["workloads"] else "-"
                 for w in doc["workloads"]]
        start = r.get("engine_start_s")
        table.add_row(r["scheme"], "-" if start is None else f"{start:.0f}", *cells, (r.get("error") or "")[:80])
    console.print(table)
    failed = [r["scheme"] for r in doc["rows"] if not r["ok"]]
    if failed:
        raise FP8MixError(f"{len(failed)} model(s) not measured: {', '.join(failed)} (see {run / 'bench.json'})")


@app.command()
def report(run: Run) -> None:
    """Write report.md, figures/*.png and summary.json from the run's files."""
    from .context import require_run
    from .report.stage import stage_report

    require_run(run)
    console.print(f"report: {stage_report(_options(run))}")


@app.command()
def schemes(catalog: CatalogOpt = None, model: ModelOpt = None) -> None:
    """List the catalog's schemes: rule, expected coverage on the model, rationale."""
    from .models import loading
    from .plan.catalog import load_catalog
    from .plan.planner import blocks_for_fraction

    from .models.info import locate

    cat, path = load_catalog(catalog)
    _, mpath, _ = locate(model)  # config only: the shipped family configs need no network
    net, adapter = loading.build_empty(mpath)
    layout = adapter.layout(net)
    table = Table(title=f"schemes of {path} (version {cat.version})", show_lines=True)
    for col in ("scheme", "rule", "expected coverage", "target bits", "scoring", "rationale"):
        table.add_column(col)
    for name, s in cat.schemes.items():
        if s.rule.blocks_fraction is not None:
            k = blocks_for_fraction(s.rule.blocks_fraction, layout.n_blocks)
            cover = f"{k}/{layout.n_blocks} blocks"
        else:
            share = (16 - s.rule.effective_bits) / 8
            cover = f">= {share:.0%} of LM linear params ({s.rule.granularity}s chosen by the solver)"
        st = cat.settings(name)
        scoring = f"{st.method}, {st.calib_samples} samples, {st.fp8_format.value}" + (
            "" if st.with_images else ", text only")
        table.add_row(name, s.rule.describe(), cover, f"{cat.target_bits(name):g}", scoring, s.rationale)
    console.print(table)


@app.command()
def run(out: Run, model: ModelOpt = None, catalog: CatalogOpt = None, device: Device = "auto",
        calib_samples: CalibSamples = None, data: Data = None, text_only: TextOnly = False, method: Method = None,
        seed: Seed = None, batch_size: BatchSize = None, threads: Threads = None, force: Force = False,
        stop_after: Annotated[Optional[str], typer.Option("--stop-after", help="Last stage to run")] = None,
        eval_samples: Annotated[int, typer.Option("--eval-samples", help="Held-out samples for eval")] = 64,
        live: Annotated[bool, typer.Option("--live/--no-live", help="vLLM where it is importable: the live check and "
                                                                    "the served eval (--no-live: neither)")]
        = True,
        control_samples: Annotated[int, typer.Option("--control-samples", help="Held-out samples for the study's "
                                                                               "control")] = 32,
        device_map: DeviceMap = None, max_length: MaxLength = None, max_pixels: MaxPixels = None,
        no_study: Annotated[bool, typer.Option("--no-study", help="Quick run: leave out the sensitivity study "
                                                                 "(run it later with fp8mix score --study)")]
        = False) -> None:
    """Every stage in order: score, study, plan, export, check, eval, report."""
    from .context import set_threads
    from .pipeline import run_all

    set_threads(threads)
    opts = _options(out, model, catalog, device, force, calib_samples, data, text_only, method, seed, batch_size,
                    device_map, max_length, max_pixels)
    run_all(opts, stop_after, {"eval": {"n_eval": eval_samples, "engine": "auto" if live else "transformers"},
                               "check": {"live": live, "n_eval": eval_samples},
                               "study": {"n_control": control_samples}}, study=not no_study)
    console.print(f"run directory: {out}")
    if (out / "report.md").is_file() and stop_after in (None, "report"):
        console.print(f"[bold]report: {out / 'report.md'}[/]")
    failed = sorted(p.stem for p in (out / "checks").glob("*.json") if '"ok": false' in p.read_text())
    if failed and stop_after in (None, "check", "eval", "report"):
        raise FP8MixError(f"vLLM check failed for {', '.join(failed)}: see {out / 'checks'} and the report")
    if (out / "eval.json").is_file() and stop_after in (None, "eval", "report"):
        from .evaluate.stage import served_errors
        from .rundir import read_json

        errors = served_errors(read_json(out / "eval.json", "eval", versions=(1, 2, 3)))
        if errors:
            raise FP8MixError(f"{len(errors)} served evaluation(s) failed: {errors[0]} (see {out / 'eval.json'})")


def main() -> None:
    try:
        app()
    except FP8MixError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
