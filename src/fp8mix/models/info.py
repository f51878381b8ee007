"""`fp8mix info`: the model's structure, read from config.json on the meta device (no weights loaded)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from . import loading


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def describe(model: str | None, console: Console) -> dict:
    model_id, path = loading.resolve(model)
    net, adapter = loading.build_empty(path)
    layout = adapter.layout(net)
    has_weights = any(path.glob("*.safetensors"))
    if has_weights:
        loading.fingerprint(path)  # validates every safetensors header
    console.print(f"[bold]{model_id}[/]  ({layout.architecture}, family {layout.family})")
    console.print(f"folder: {path}" + ("" if has_weights else "  [yellow](config only: no weights)[/]"))

    table = Table(title=f"LM linear groups ({layout.n_blocks} blocks x {len(layout.groups) // layout.n_blocks})")
    for col in ("group kind", "modules", "shapes (out x in)", "params / block", "params, all blocks"):
        table.add_column(col, justify="right" if "params" in col else "left")
    first = layout.groups_of_block(0)
    for g in first:
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
    console.print(f"weights in BF16: {2 * total / 1e6:,.1f} MB; with every LM linear in FP8: {(2 * total - lm) / 1e6:,.1f} MB")
    return {"model": model_id, "blocks": layout.n_blocks, "groups": len(layout.groups), "lm_linear_params": lm,
            "total_params": total}
