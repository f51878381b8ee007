"""Helpers shared by the export tests (imported by name: tests/ has no packages)."""

import torch
from safetensors import safe_open


def read_safetensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (also tells -0.0 from 0.0 and compares NaNs), dtype and shape included."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


EMBEDDED_TO_DISK = (("model.language_model", "model"), ("model.visual", "visual"))


def disk_name(name: str) -> str:
    """In-memory name -> legacy on-disk name (the embedded model's mapping, spelled out independently)."""
    for mem, disk in EMBEDDED_TO_DISK:
        if name.startswith(mem + "."):
            return disk + name[len(mem):]
    return name


def restrict_plan(plan: dict, blocks: set[int]) -> dict:
    """The plan with only the FP8 modules of some blocks (the others join the ignore list): smaller, faster."""
    keep = [m for m in plan["fp8_modules"] if int(m.split(".")[3]) in blocks]
    dropped = [n for m in plan["fp8_modules"] if m not in keep for n in (disk_name(m), m)]
    plain = sorted([e for e in plan["ignore"] if e.startswith("model.")] + dropped)
    rest = [e for e in plan["ignore"] if not e.startswith("model.")]
    return {**plan, "fp8_modules": keep, "fp8_groups": [g for g in plan["fp8_groups"]
                                                        if int(g.split(".")[3]) in blocks],
            "ignore": plain + rest}
