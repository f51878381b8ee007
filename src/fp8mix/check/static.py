"""Static check of a checkpoint against vLLM's loading rules, without vLLM.

The rules come from vLLM's behaviour with compressed-tensors and ModelOpt checkpoints: fused layers (qkv_proj,
gate_up_proj) must be one format; ignore entries in HF naming are remapped to vLLM's names but regexes are not;
a vision tower that slips past the ignore list gets BF16 weights loaded into FP8 parameters; FP8 GEMMs need
dimensions that are multiples of 16 (128 for block scales). A ModelOpt checkpoint is judged by vLLM's ModelOpt
rules instead where they differ: its exclude list (`ModelOptExcludes`) and its scale shapes.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from pathlib import Path

from safetensors import safe_open
from torch import nn

from ..models import FamilyAdapter, ModelLayout
from ..quant.kv_cache import attention_modules

FP8 = "F8_E4M3"
HIGH = {"BF16", "F16", "F32"}


def _tensor_meta(folder: Path) -> dict[str, tuple[str, list[int]]]:
    meta = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                meta[k] = (sl.get_dtype(), list(sl.get_shape()))
    return meta


class Matcher:
    """A compressed-tensors ignore entry as vLLM reads it: `re:` regexes (re.match, never remapped) or plain
    module names (remapped from either HF naming, then equal to the layer name: a parent's name ignores none of its
    linears); a glob is recognised only to be refused."""

    def __init__(self, entry: str):
        self.entry = entry
        self.kind = "regex" if entry.startswith("re:") else "glob" if any(c in entry for c in "*?[") else "name"
        self.regex = None
        if self.kind == "regex":
            try:
                self.regex = re.compile(entry[3:])
            except re.error as exc:
                self.error = f"ignore entry {entry!r} is not a valid regex ({exc})"
                return
        self.error = None

    def matches(self, name: str) -> bool:
        if self.error:
            return False
        if self.kind == "regex":
            return self.regex.match(name) is not None  # vLLM: re.match against the layer name
        if self.kind == "glob":
            return fnmatch.fnmatchcase(name, self.entry) or fnmatch.fnmatchcase(name, self.entry + ".*")
        return name == self.entry


# vLLM's packed_modules_mapping for the Qwen VL families: the fused layer each unfused linear on disk loads into
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FUSED_OF = {shard: fused for fused, shards in PACKED.items() for shard in shards}
MODELOPT_ALGOS = {"FP8_PER_CHANNEL_PER_TOKEN": "channel", "FP8": "tensor"}  # the ModelOpt FP8 algos fp8mix writes


class ModelOptExcludes:
    """config.json's quantization_config.ignore as vLLM's ModelOpt loader applies it
    (vllm/model_executor/layers/quantization/modelopt.py, ModelOptQuantConfigBase). from_config reads ``ignore``
    from config.json's flat form; ``exclude_modules`` is the key of hf_quant_config.json's nested form, read only
    when config.json has no quantization_config (weight_utils.get_quant_config). apply_vllm_mapper splits
    ``path*`` into ``path`` and ``path.*`` and maps every entry through the model's hf_to_vllm_mapper.
    is_layer_excluded then takes vLLM's layer name (fused: qkv_proj, gate_up_proj) as excluded on an exact name
    (is_layer_skipped: a fused layer when its shards are listed, an error when only some are), else on substring
    containment (also with ``language_model.`` stripped), else on an fnmatch wildcard; ``re:`` regexes are not
    understood. Recent vLLM also keeps any ``*visual*`` layer unquantized unasked; older ones do not, so the list
    itself must exclude the vision tower."""

    def __init__(self, entries: list[str], adapter: FamilyAdapter):
        self.mapped = {}
        for e in entries:
            split = [e[:-1], e[:-1] + ".*"] if len(e) >= 2 and e[-1] == "*" and e[-2] != "." else [e]
            self.mapped[e] = [adapter.to_vllm(adapter.to_disk(x)) for x in split]

    @staticmethod
    def hit(patterns: list[str], name: str) -> bool:
        """Whether ``patterns`` (mapped entries) exclude the linear that vLLM names ``name`` (unfused)."""
        head, _, last = name.rpartition(".")
        layer = f"{head}.{FUSED_OF[last]}" if last in FUSED_OF else name
        if name in patterns:  # exact (for a fused layer: its own shard; the fused-group check sees partial lists)
            return True
        bare = layer.removeprefix("language_model.") if layer.startswith("language_model.") else None
        return any((p != layer and (p in layer or (bare is not None and p in bare))) or fnmatch.fnmatchcase(layer, p)
                   for p in patterns)

    def excluded(self, name: str) -> bool:
        return self.hit([p for ps in self.mapped.values() for p in ps], name)


def check_static(folder: Path, plan: dict, model: nn.Module, adapter: FamilyAdapter, layout: ModelLayout) -> dict:
    """Returns {"ok", "failures": [...], "warnings": [...], "facts": {...}}."""
    failures, warnings = [], []
    cfg = json.loads((folder / "config.json").read_text())
    qc = cfg.get("quantization_config") or {}
    method = qc.get("quant_method")
    entries = qc.get("ignore")  # both formats: vLLM reads config.json's `ignore` (ModelOpt too, see ModelOptExcludes)
    if method not in ("compressed-tensors", "modelopt"):
        failures.append(f"config.json quantization_config.quant_method is {method!r}; expected compressed-tensors "
                        "or modelopt")
        return {"ok": False, "failures": failures, "warnings": warnings, "facts": {}}
    entries = list(entries or [])
    modelopt = ModelOptExcludes(entries, adapter) if method == "modelopt" else None
    matchers = [] if modelopt else [Matcher(e) for e in entries]
    failures += [m.error for m in matchers if m.error]
    if modelopt:
        failures += _check_modelopt_config(folder, qc, entries)
    if method == "compressed-tensors" and any(m.kind == "glob" for m in matchers):
        failures += [f"ignore entry {m.entry!r} is a glob: compressed-tensors matches names or re: regexes only"
                     for m in matchers if m.kind == "glob"]

    linears = adapter.all_linears(model)
    namings = {n: {"memory": n, "disk": adapter.to_disk(n), "vllm": adapter.to_vllm(adapter.to_disk(n))}
               for n in linears}

    def ignored(name: str, naming: str) -> bool:
        if modelopt:  # vLLM maps the entries to its own names and matches only those
            return modelopt.excluded(namings[name]["vllm"])
        return any(m.matches(namings[name][naming]) for m in matchers)

    if modelopt:  # 1. every exclude entry excludes a real layer under vLLM's ModelOpt matching
        for e, patterns in modelopt.mapped.items():
            if e.startswith("re:"):
                failures.append(f"ignore entry {e!r} is a regex: vLLM's ModelOpt loader matches names, substrings "
                                "and fnmatch wildcards only")
            elif not any(modelopt.hit(patterns, namings[n]["vllm"]) for n in linears):
                failures.append(f"ignore entry {e!r} excludes no layer under vLLM's ModelOpt matching (mapped to "
                                f"{patterns}; exact name, substring or wildcard)")

    # 1. every ignore entry matches a real module; regexes must match the same modules under every naming
    for m in matchers:
        if m.error:
            continue
        if m.kind == "name":
            if not any(m.matches(v) for n in linears for v in namings[n].values()):
                failures.append(f"ignore entry {m.entry!r} matches no module in either HF naming")
            continue
        hits = {naming: {n for n in linears if m.matches(namings[n][naming])} for naming in ("memory", "disk", "vllm")}
        if not hits["vllm"]:
            failures.append(f"ignore entry {m.entry!r} matches no module under vLLM's names (e.g. "
                            f"{namings[linears[0]]['vllm']}); vLLM does not remap regexes")
        elif len({frozenset(v) for v in hits.values()}) > 1:
            failures.append(f"ignore entry {m.entry!r} matches {len(hits['memory'])} modules in memory naming, "
                            f"{len(hits['disk'])} on disk and {len(hits['vllm'])} under vLLM's names: vLLM does "
                            "not remap regexes, write one that matches all namings (e.g. re:.*visual.*)")

    # 2. the vision tower is excluded under vLLM's names
    vision = adapter.vision_linears(model)
    missed = [n for n in vision if not ignored(n, "vllm")]
    if missed:
        failures.append(f"{len(missed)} of {len(vision)} vision-tower linears are not ignored under vLLM's names "
                        f"(first: {namings[missed[0]]['vllm']}): vLLM would load BF16 weights into FP8 parameters")

    # 3. tensors agree with the config and the plan
    meta = _tensor_meta(folder)
    fp8_on_disk = set()
    groups = qc.get("config_groups", {})
    strategy = None
    dynamic = True
    if method == "compressed-tensors" and groups:
        g0 = next(iter(groups.values()))
        strategy = (g0.get("weights") or {}).get("strategy")
        dynamic = bool((g0.get("input_activations") or {}).get("dynamic", True))
    elif method == "modelopt":
        strategy = MODELOPT_ALGOS.get(str(qc.get("quant_algo")).upper())
        dynamic = strategy != "tensor"
    for n in linears:
        disk = namings[n]["disk"]
        w = meta.get(disk + ".weight")
        if w is None:
            if n == f"{adapter.lm_head_path}" and layout.tied_lm_head:
                # ModelOpt builds lm_head with its FP8 method unless excluded; tied, it would get the BF16 embedding
                if modelopt and not ignored(n, "vllm"):
                    failures.append(f"{disk} is not excluded: vLLM's ModelOpt loader would run the tied BF16 "
                                    "embedding matrix as FP8 weights")
                continue
            failures.append(f"{disk}.weight is missing from the checkpoint")
            continue
        is_fp8 = w[0] == FP8
        skip = ignored(n, "disk") or ignored(n, "vllm") or ignored(n, "memory")
        if is_fp8:
            fp8_on_disk.add(n)
            if skip:
                failures.append(f"{disk} is ignored by the config but stored in FP8")
            scale = meta.get(disk + ".weight_scale")
            if scale is None:
                failures.append(f"{disk} is FP8 but has no weight_scale")
            else:
                out_f, in_f = w[1]
                # ModelOpt per channel: ChannelQuantScaleParameter [out] (ModelOptFp8PcPtLinearMethod)
                want = {"channel": [[out_f]] if modelopt else [[out_f, 1]], "tensor": [[1], []],
                        "block": [[math.ceil(out_f / 128), math.ceil(in_f / 128)]]}.get(strategy)
                if want is not None and scale[1] not in want:
                    failures.append(f"{disk}.weight_scale has shape {scale[1]}, the {strategy} strategy needs {want[0]}")
                if scale[0] not in ("F32", "BF16", "F16"):
                    failures.append(f"{disk}.weight_scale has dtype {scale[0]}")
            has_in = disk + ".input_scale" in meta
            if dynamic and has_in:
                failures.append(f"{disk} has an input_scale but the config asks for dynamic activations")
            if not dynamic and not has_in:
                failures.append(f"{disk} has no input_scale but the config asks for static activations")
            out_f, in_f = w[1]
            mult = 128 if strategy == "block" else 16
            if out_f % mult or in_f % mult:
                failures.append(f"{disk} is {out_f}x{in_f}: FP8 {strategy} kernels need multiples of {mult}")
        else:
            if w[0] not in HIGH:
                failures.append(f"{disk}.weight has dtype {w[0]}")
            if not skip:
                failures.append(f"{disk} is BF16 but not ignored: vLLM would expect FP8 weights for it")

    # 4. fused groups are uniform
    for g in layout.groups:
        kinds = {m: (m in fp8_on_disk) for m in g.modules}
        if len(set(kinds.values())) > 1:
            fp8_m = [m.rsplit(".", 1)[1] for m, v in kinds.items() if v]
            bf_m = [m.rsplit(".", 1)[1] for m, v in kinds.items() if not v]
            failures.append(f"fused group {adapter.to_disk(g.name)} mixes FP8 ({', '.join(fp8_m)}) and BF16 "
                            f"({', '.join(bf_m)}): vLLM fuses them into one layer")
        ign = {m: ignored(m, "disk") or ignored(m, "vllm") for m in g.modules}
        if len(set(ign.values())) > 1:
            part = [m.rsplit(".", 1)[1] for m, v in ign.items() if v]
            failures.append(f"ignore list splits fused group {adapter.to_disk(g.name)}: only {', '.join(part)} "
                            "ignored")

    # 5. the plan's FP8 set is what the checkpoint holds
    if sorted(fp8_on_disk) != sorted(plan.get("fp8_modules", [])):
        extra = sorted(fp8_on_disk - set(plan["fp8_modules"]))
        lost = sorted(set(plan["fp8_modules"]) - fp8_on_disk)
        failures.append(f"checkpoint FP8 layers differ from the plan: {len(extra)} extra, {len(lost)} missing")

    # 6. an FP8 KV cache: a kv_cache_scheme vLLM accepts and a usable k_scale/v_scale for every attention layer
    kv_facts = _check_kv_cache(folder, qc, method, meta, layout, adapter, plan, failures)

    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if not (folder / name).is_file():
            failures.append(f"{name} is missing: vLLM needs it to serve images and chat")
    facts = {"quant_method": method, "strategy": strategy, "dynamic_activations": dynamic,
             "fp8_linears": len(fp8_on_disk), "ignore_entries": len(entries), **kv_facts}
    failures = list(dict.fromkeys(failures))
    return {"ok": not failures, "failures": failures, "warnings": warnings, "facts": facts}


def _check_modelopt_config(folder: Path, qc: dict, entries: list[str]) -> list[str]:
    """A quant_algo vLLM's ModelOptFp8Config runs as fp8mix writes it, and an hf_quant_config.json (what tools
    other than vLLM read) that says the same as config.json (what vLLM reads)."""
    failures = []
    algo = str(qc.get("quant_algo")).upper()
    if algo not in MODELOPT_ALGOS:
        failures.append(f"quantization_config.quant_algo is {qc.get('quant_algo')!r}; fp8mix's ModelOpt FP8 "
                        f"checkpoints are {' or '.join(MODELOPT_ALGOS)}")
    path = folder / "hf_quant_config.json"
    if path.is_file():
        hq = (json.loads(path.read_text()) or {}).get("quantization") or {}
        if str(hq.get("quant_algo")).upper() != algo or list(hq.get("exclude_modules") or []) != entries:
            failures.append("hf_quant_config.json's quant_algo/exclude_modules differ from config.json's "
                            "quant_algo/ignore (vLLM reads config.json)")
    return failures


KV_SCHEME = {"type": "float", "num_bits": 8, "symmetric": True, "dynamic": False, "strategy": "tensor"}


def _check_kv_cache(folder: Path, qc: dict, method: str, meta: dict, layout: ModelLayout, adapter: FamilyAdapter, plan: dict,
                    failures: list[str]) -> dict:
    """vLLM's CompressedTensorsKVCacheMethod takes float 8-bit symmetric scales (tensor or attn_head strategy);
    fp8mix writes static per-tensor ones. It loads ``<attention>.k_scale``/``v_scale`` (mapped to
    ``.self_attn.attn.k_scale``) and runs an fp8_e4m3 cache when kv_cache_dtype is auto. A missing scale stays at
    vLLM's placeholder (1.0, with only a warning); a non-positive one breaks its scale processing."""
    scheme = qc.get("kv_cache_scheme")
    attn = attention_modules(layout)
    stored = sorted(k for k in meta if k.endswith((".k_scale", ".v_scale")))
    wants = plan.get("kv_cache")
    if scheme is None:
        if wants == "fp8":
            failures.append("the plan asks for an FP8 KV cache but config.json has no kv_cache_scheme")
        if stored:
            failures.append(f"{len(stored)} k_scale/v_scale tensors but no kv_cache_scheme: vLLM would ignore them "
                            "unless told kv_cache_dtype=fp8")
        return {"kv_cache": None}
    if method != "compressed-tensors":
        failures.append("kv_cache_scheme is a compressed-tensors key; this checkpoint is " + str(method))
    if wants != "fp8":
        failures.append("config.json declares a kv_cache_scheme the plan does not ask for")
    if not isinstance(scheme, dict):
        failures.append(f"kv_cache_scheme is {type(scheme).__name__}, not a mapping")
        return {"kv_cache": "invalid"}
    for key, want in KV_SCHEME.items():
        if scheme.get(key) != want:
            failures.append(f"kv_cache_scheme.{key} is {scheme.get(key)!r}; vLLM's FP8 KV cache with per-layer "
                            f"scales needs {want!r}")
    seen = set()
    for a in attn:
        base = adapter.to_disk(a)
        for kind in ("k_scale", "v_scale"):
            name = f"{base}.{kind}"
            seen.add(name)
            m = meta.get(name)
            if m is None:
                failures.append(f"{name} is missing: vLLM would run that layer's FP8 KV cache with scale 1.0")
                continue
            dtype, shape = m
            if dtype != "F32" or shape not in ([1], []):
                failures.append(f"{name} is {dtype} {shape}; expected one float32 value [1]")
    extra = sorted(set(stored) - seen)
    if extra:
        failures.append(f"{len(extra)} k_scale/v_scale tensors belong to no LM attention layer (first: {extra[0]})")
    present = [n for n in sorted(seen) if n in meta]
    for name, value in _scale_values(folder, present).items():
        if not (math.isfinite(value) and value > 0.0):
            failures.append(f"{name} is {value}: a KV-cache scale must be finite and positive")
    return {"kv_cache": "fp8", "kv_scales": len(present)}


def served_kv_cache_errors(folder: Path, plan: dict, attention: dict, layout: ModelLayout,
                           adapter: FamilyAdapter) -> list[str]:
    """vLLM's LM attention layers as it serves the checkpoint (`attention`: vLLM name -> kv_cache_dtype, k_scale,
    v_scale, read in the engine) against the plan: with an FP8 KV cache, each runs an fp8 cache at exactly the k/v
    scales the checkpoint stores (a scale vLLM did not load is 1.0, with only a log line); without one, none does."""
    errors, wants = [], plan.get("kv_cache") == "fp8"
    mods = attention_modules(layout)
    stored = _scale_values(folder, [f"{adapter.to_disk(a)}.{k}" for a in mods for k in ("k_scale", "v_scale")])
    for a in mods:
        served = attention.get(f"{adapter.to_vllm(adapter.to_disk(a))}.attn")
        if served is None:
            errors.append(f"vLLM has no attention layer for {a}")
        elif not wants:
            if served["kv_cache_dtype"].startswith("fp8"):
                errors.append(f"vLLM runs {a} with an {served['kv_cache_dtype']} KV cache the plan does not ask for")
        elif not served["kv_cache_dtype"].startswith("fp8"):
            errors.append(f"vLLM runs {a} with a {served['kv_cache_dtype']} KV cache; the plan asks for fp8")
        else:
            for kind in ("k_scale", "v_scale"):
                want = stored.get(f"{adapter.to_disk(a)}.{kind}")
                if want is None or served[kind] != want:
                    errors.append(f"vLLM runs {a} with {kind} {served[kind]!r}; the checkpoint stores {want!r} (a "
                                  "scale vLLM did not load is 1.0)")
    return errors[:1] + ([f"... and {len(errors) - 1} more"] if len(errors) > 1 else [])


def _scale_values(folder: Path, names: list[str]) -> dict[str, float]:
    """The values of the one-element tensors ``names``, read from the checkpoint's files."""
    want, out = set(names), {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                if k in want:
                    out[k] = float(fh.get_tensor(k).float().reshape(-1)[0])
    return out


def cpu_fp8_kv_cache_reason(head_dim: int) -> str | None:
    """Why vLLM's CPU build cannot run an fp8 KV cache on this machine, or None when it can: its CPU attention
    (v1/attention/backends/cpu_attn.py, _get_attn_isa) needs x86 AVX-512 or AMX, and a head size divisible by 32."""
    if head_dim % 32:
        return f"vLLM's CPU build runs an FP8 KV cache only for head sizes divisible by 32 (this model: {head_dim})"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if not flags & {"avx512f", "amx_tile"}:
        return "vLLM's CPU build runs an FP8 KV cache only on x86 CPUs with AVX-512 or AMX; this CPU has neither"
    return None


def kv_head_dim(model: nn.Module, layout: ModelLayout) -> int:
    """The head size of the LM attention (what vLLM's KV cache stores per head)."""
    attn = model.get_submodule(next(g.name.rsplit(".", 1)[0] for g in layout.groups if g.kind == "qkv"))
    return int(attn.head_dim)
