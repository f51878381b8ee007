"""`fp8mix report`: report.md, figures/*.png and summary.json."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from .. import manifest
from ..check.live import folder_key
from ..context import RunOptions, catalog_of
from ..errors import FP8MixError
from ..rundir import read_json, write_json
from . import figures
from .markdown import CATALOG_COPY, eval_rows, quality_figures, render, served_rows
from .served import pairs
from .speed import current, points


def stage_report(opts: RunOptions) -> Path:
    t0 = time.time()
    run = opts.run
    catalog, cat_path = catalog_of(opts)
    sens = read_json(run / "sensitivity.json", "sensitivity", hint="run fp8mix score first")
    plans = {n: read_json(run / "plans" / f"{n}.json", "plan", hint="run fp8mix plan first") for n in catalog.schemes}
    checks = {n: read_json(run / "checks" / f"{n}.json", "check") for n in catalog.schemes
              if (run / "checks" / f"{n}.json").is_file()}
    ev = read_json(run / "eval.json", "eval", hint="run fp8mix eval first", versions=(1, 2, 3))
    rows, positions = eval_rows(ev)
    compared = pairs(rows, served_rows(ev))
    man = manifest.load(run)
    figs = {"heatmap": figures.heatmap(sens, run / "figures" / "heatmap.png"),
            "blocks": figures.block_bars(sens, plans, run / "figures" / "blocks.png"),
            "pareto": figures.pareto(list(rows.values()), sens.get("study"), positions, run / "figures" / "pareto.png")}
    if compared:
        figs["served"] = figures.served_vs_emulated(compared, run / "figures" / "served.png")
    bench = read_json(run / "bench.json", "bench") if (run / "bench.json").is_file() else None
    if bench:
        keys = {n: _key(run / "checkpoints" / n) for n in {r["scheme"] for r in bench["rows"]} - {"bf16"}}
        bench = current(bench, {**keys, "bf16": man.get("model", {}).get("fingerprint")})
    speed = points(bench, quality_figures(rows, served_rows(ev)))
    if speed:
        figs["speed"] = figures.speed_vs_quality(speed, "mixed", "reply top-k KL vs BF16 (served where measured)",
                                                 run / "figures" / "speed.png")
    if sens.get("study"):
        figs["stability"] = figures.stability(sens["study"], run / "figures" / "stability.png")
    copy = run / CATALOG_COPY
    if not (copy.is_file() and copy.samefile(cat_path)):
        shutil.copyfile(cat_path, copy)
    text, summary = render(run, sens, plans, checks, ev, man, cat_path,
                           {k: str(v.relative_to(run)) for k, v in figs.items()}, bench)
    fd, tmp = tempfile.mkstemp(dir=run, prefix=".report.md.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, run / "report.md")
    write_json(run / "summary.json", "summary", summary)
    manifest.update(run, stages={"report": {"seconds": round(time.time() - t0, 2)}})
    return run / "report.md"


def _key(folder: Path) -> str | None:
    """The key of the checkpoint at `folder` as bench.json records it (None: no readable checkpoint there)."""
    try:
        return folder_key(folder) if (folder / "config.json").is_file() else None
    except FP8MixError:
        return None
