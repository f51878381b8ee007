"""`fp8mix info`: the model's structure and what each stage will need, read from config.json on the meta device
(no weights loaded): a folder, a config file, a hub id, or one of the shipped family configs."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import loading, sizing


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def locate(model: str | None) -> tuple[str, Path, str]:
    """(model id, folder or config file, where it came from). Shipped family configs need no network."""
    for hub_id, file in loading.FIXTURES.items():
        if model is not None and model.lower() in (hub_id.lower(), file.stem, file.name):
            return hub_id, file, "published config shipped with fp8mix (no weights)"
    if model is not None and model.endswith(".json"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise loading.FP8MixError(f"config file {path} does not exist")
        return str(path), path, "config file (no weights)"
    model_id, path = loading.resolve(model, patterns=["config.json"])
    return model_id, path, str(path)


def describe(model: str | None, console: Console, batch_size: int = 8, max_length: int = 1024) -> dict:
    model_id, path, origin = locate(model)
    net, adapter = loading.build_empty(path)
    layout = adapter.layout(net)
    shards = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if shards:
        loading.fingerprint(path)  # validates every safetensors header
    console.print(f"[bold]{model_id}[/]  ({layout.architecture}, family {layout.family})")
    console.print(f"from: {origin}" + ("" if shards or not path.is_dir() else "  [yellow](config only: no weights)[/]"))

    table = Table(title=f"LM linear groups ({layout.n_blocks} blocks x {len(layout.groups) // layout.n_blocks})")
    for col in ("group kind", "modules", "shapes (out x in)", "params / block", "params, all blocks"):
        table.add_column(col, justify="right" if "params" in col else "left")
    for g in layout.groups_of_block(0):
        same = [x for x in layout.groups if x.kind == g.kind]
        table.add_row(g.kind, ", ".join(m.rsplit(".", 1)[1] for m in g.modules),
                      ", ".join(f"{o}x{i}" for o, i in g.shapes), _fmt(g.params), _fmt(sum(x.params for x in same)))
    console.print(table)

    kept = Table(title="Always BF16")
    for col in ("part", "params", "why"):
        kept.add_column(col, justify="right" if col == "params" else "left")
    for part in layout.kept_bf16:
        kept.add_row(part.name, _fmt(part.params), part.reason)
    console.print(kept)

    lm, total = layout.lm_linear_params, layout.total_params
    console.print(f"FP8-eligible LM linear weights: {_fmt(lm)} of {_fmt(total)} parameters ({100 * lm / total:.1f} %), "
                  f"{len(layout.groups)} groups in {layout.n_blocks} blocks")
    console.print(f"weights in BF16: {_gb(2 * total)}; with every LM linear in FP8: {_gb(2 * total - lm)}")

    tokens = batch_size * max_length
    largest = max((f.stat().st_size for f in shards), default=None)
    stages = sizing.needs(layout, sizing.Dims.of(net.config), tokens, largest)
    mem = Table(title=f"Memory by stage (estimates; scoring batches of {batch_size} x {max_length} tokens)")
    for col in ("stage", "where", "needs", "holds"):
        mem.add_column(col, justify="right" if col == "needs" else "left")
    for s in stages:
        mem.add_row(s.stage, s.where, _gb(s.bytes) if s.bytes else "-", s.holds)
    console.print(mem)
    gpus = sizing.gpus_needed(next(s.bytes for s in stages if s.stage == "score --low-memory"))
    console.print("scoring (--low-memory) fits on " + " or ".join(f"{n} x {name} GPU" + ("s" if n > 1 else "")
                                                    for name, n in gpus.items())
                  + (" with --device-map auto" if max(gpus.values()) > 1 else "")
                  + "; data parallel (--gpus N) multiplies that per replica. Smaller --batch-size or --max-length "
                    "lowers the activation share.")
    return {"model": model_id, "blocks": layout.n_blocks, "groups": len(layout.groups), "lm_linear_params": lm,
            "total_params": total, "tokens_per_batch": tokens,
            "stages": {s.stage: {"where": s.where, "bytes": s.bytes} for s in stages}, "gpus_for_scoring": gpus}
