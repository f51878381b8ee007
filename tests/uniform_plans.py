"""Plans made without scoring: every group scores the same (for tests of what happens to a plan, not why)."""

import json
from pathlib import Path


def uniform_plan(model_dir, scheme: str = "fp8_autoquant_full") -> dict:
    """The catalog's `scheme` for the model at `model_dir` (None: the embedded one), from uniform scores."""
    from fp8mix.models import loading
    from fp8mix.plan.catalog import load_catalog
    from fp8mix.plan.planner import plan_scheme
    from fp8mix.score.sensitivity import build_document
    from fp8mix.score.settings import AutoQuantSettings

    net, adapter = loading.build_empty(Path(model_dir) if model_dir is not None else loading.EMBEDDED)
    layout = adapter.layout(net)
    scores = {m: 1.0 for g in layout.groups for m in g.modules}
    sens = build_document("m", "f", layout, AutoQuantSettings(), scores, 1, 1, adapter.plan_facts(net))
    catalog, _ = load_catalog(None)
    return plan_scheme(scheme, catalog, sens)


def write_uniform_plan(model_dir, path: Path, scheme: str = "fp8_autoquant_full") -> Path:
    path.write_text(json.dumps(uniform_plan(model_dir, scheme)))
    return path
