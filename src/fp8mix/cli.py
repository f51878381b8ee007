"""fp8mix command line: `fp8mix info | score | schemes | plan | export | check | eval | report | run`."""

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
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass


@app.command()
def info(model: ModelOpt = None) -> None:
    """Show the model as fp8mix sees it: LM blocks, fused linear groups, what stays BF16 and why."""
    from .models.info import describe

    describe(model, console)


Run = Annotated[Path, typer.Option("--run", "--out", "-o", help="Run directory")]
CatalogOpt = Annotated[Optional[str], typer.Option("--catalog", help="Scheme catalog YAML (default: the built-in one)")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch")]
Force = Annotated[bool, typer.Option("--force", help="Redo the stage even if its outputs exist")]
CalibSamples = Annotated[Optional[int], typer.Option("--calib-samples", help="Override the catalog's sample count")]
Data = Annotated[Optional[str], typer.Option("--data", help="Calibration data: embedded, FILE.jsonl, an image folder "
                                                            "or hf:NAME")]
TextOnly = Annotated[bool, typer.Option("--text-only", help="Drop the images from calibration (for comparison)")]
Method = Annotated[Optional[str], typer.Option("--method", help="gradient (default) or kl_div")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Calibration seed")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Calibration batch size")]


def _options(run, model=None, catalog=None, device="cpu", force=False, calib_samples=None, data=None,
             text_only=False, method=None, seed=None, batch_size=None):
    from .pipeline import RunOptions

    overrides = {"calib_samples": calib_samples, "data": data, "method": method, "seed": seed,
                 "batch_size": batch_size, "with_images": False if text_only else None}
    return RunOptions(run=run, model=model, catalog=catalog, device=device, force=force,
                      score_overrides={k: v for k, v in overrides.items() if v is not None})


@app.command()
def score(run: Run, model: ModelOpt = None, catalog: CatalogOpt = None, device: Device = "cpu",
          calib_samples: CalibSamples = None, data: Data = None, text_only: TextOnly = False, method: Method = None,
          seed: Seed = None, batch_size: BatchSize = None, threads: Threads = None, force: Force = False) -> None:
    """Score every LM linear group's FP8 sensitivity (AutoQuant) once per distinct catalog setting."""
    from .pipeline import set_threads, stage_score

    set_threads(threads)
    done = stage_score(_options(run, model, catalog, device, force, calib_samples, data, text_only, method, seed,
                                batch_size))
    console.print(f"wrote {run / 'sensitivity.json'} ({len(done)} scoring pass(es) in {run / 'scores'})")


@app.command()
def plan(run: Run, catalog: CatalogOpt = None, calib_samples: CalibSamples = None, data: Data = None,
         text_only: TextOnly = False, method: Method = None, seed: Seed = None,
         batch_size: BatchSize = None) -> None:
    """Decide FP8 or BF16 for every fused group, for every scheme of the catalog."""
    from .pipeline import require_run, stage_plan

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
def schemes(catalog: CatalogOpt = None, model: ModelOpt = None) -> None:
    """List the catalog's schemes: rule, expected coverage on the model, rationale."""
    from .models import loading
    from .plan.catalog import load_catalog
    from .plan.planner import blocks_for_fraction

    cat, path = load_catalog(catalog)
    _, mpath = loading.resolve(model)
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
def run(out: Run, model: ModelOpt = None, catalog: CatalogOpt = None, device: Device = "cpu",
        calib_samples: CalibSamples = None, data: Data = None, text_only: TextOnly = False, method: Method = None,
        seed: Seed = None, batch_size: BatchSize = None, threads: Threads = None, force: Force = False,
        stop_after: Annotated[Optional[str], typer.Option("--stop-after", help="Last stage to run")] = None) -> None:
    """Every stage in order: score, plan, export, check, eval, report."""
    from .pipeline import run_all, set_threads

    set_threads(threads)
    opts = _options(out, model, catalog, device, force, calib_samples, data, text_only, method, seed, batch_size)
    run_all(opts, stop_after)
    console.print(f"run directory: {out}")


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
