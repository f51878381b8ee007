"""Find a model (embedded, local folder or hub id), check it, and load it in BF16 with its processor.

Safetensors only (never pickles); `trust_remote_code` stays off unless the caller asks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FP8MixError
from . import FamilyAdapter, ModelLayout, adapter_for

EMBEDDED = Path(__file__).parent / "embedded"
EMBEDDED_ID = "embedded:fp8mix-tiny-qwen2.5-vl"
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: object
    adapter: FamilyAdapter
    layout: ModelLayout
    model_id: str      # what the user passed (or the embedded id)
    path: Path         # local folder the files came from
    fingerprint: str   # sha256 over config.json, the safetensors headers and each tensor's first and last 4 KiB


def resolve(model: str | None, patterns: list[str] = HUB_FILES) -> tuple[str, Path]:
    """(model id, local folder). No model means the embedded tiny Qwen2.5-VL. A hub id is downloaded (the files
    matching `patterns`)."""
    if model is None or model in ("embedded", EMBEDDED_ID):
        return EMBEDDED_ID, EMBEDDED
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FP8MixError(f"{path} is a file; pass the model's folder (with config.json and *.safetensors)")
        return str(path), path
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise FP8MixError(f"model path {model} does not exist; pass a folder with config.json or a hub id like "
                          "Qwen/Qwen2.5-VL-3B-Instruct")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(model, allow_patterns=patterns)
    except Exception as exc:  # offline, unknown repo, gated…
        raise FP8MixError(f"cannot fetch {model} from the Hugging Face hub ({type(exc).__name__}); "
                          "download it first and pass the local folder") from None
    return model, Path(local)


CONFIGS = Path(__file__).parent / "configs"
# Published configs shipped as architecture fixtures (configs/README.md), by hub id
FAMILY_SIZES = {"Qwen2.5-VL": ("3B", "7B", "32B", "72B"), "Qwen2-VL": ("2B", "7B", "72B"),
                "Qwen3-VL": ("2B", "4B", "8B", "32B")}
FIXTURES = {f"Qwen/{family}-{size}-Instruct": CONFIGS / f"{family.lower().replace('.', '_').replace('-', '_')}_"
            f"{size.lower()}.json" for family, sizes in FAMILY_SIZES.items() for size in sizes}


def config_file(path: Path) -> Path:
    """config.json of a model folder, or the path itself when it is a config file."""
    return path if path.suffix == ".json" else path / "config.json"


def read_config(path: Path) -> dict:
    cfg_file = config_file(path)
    if not cfg_file.is_file():
        raise FP8MixError(f"{path} has no config.json; pass a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise FP8MixError(f"{cfg_file} is not valid JSON (line {exc.lineno}): the checkpoint is corrupt") from None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if qc:  # scores, plans and exports of an already-quantized model would describe its rounding, not FP8's
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise FP8MixError(f"{path} is already quantized (quantization_config, quant_method {method}): fp8mix "
                          "starts from the unquantized model (BF16, FP16 or FP32); pass that instead")
    return cfg


def architecture(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    if not archs:
        raise FP8MixError("config.json names no architecture ('architectures' is empty)")
    return archs[0]


def safetensors_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {', '.join(pickles)}: fp8mix never loads pickles; re-save it with safetensors)" if pickles else ""
        raise FP8MixError(f"{path} has no *.safetensors weights{hint}")
    return files


SAMPLE_BYTES = 4096  # of each tensor's data, from its start and from its end, in the fingerprint


def fingerprint(path: Path) -> str:
    """sha256 over config.json and each safetensors file's header, size and the first and last SAMPLE_BYTES of
    every tensor's data: cheap, and changes with the weights' layout and with their values (another fine-tune of
    the same architecture); the embedded model is hashed in full."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in safetensors_files(path):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = fh.read(n) if 0 < n <= 100_000_000 else b""
            try:
                spans = sorted((int(a), int(b)) for k, v in json.loads(header).items() if k != "__metadata__"
                               for a, b in [v["data_offsets"]])
            except (ValueError, TypeError, KeyError, AttributeError):
                raise FP8MixError(f"{f} is not a valid safetensors file (bad header): the checkpoint is "
                                  "corrupt") from None
            h.update(header)
            for start, end in spans:
                for at in sorted({start, max(start, end - SAMPLE_BYTES)}):
                    fh.seek(8 + n + at)
                    h.update(fh.read(min(SAMPLE_BYTES, end - at)))
        h.update(str(f.stat().st_size).encode())
        if path == EMBEDDED:
            h.update(f.read_bytes())
    return h.hexdigest()


def model_class(arch: str):
    import transformers

    cls = getattr(transformers, arch, None)
    if cls is None:
        raise FP8MixError(f"transformers {transformers.__version__} has no class {arch}")
    return cls


def build_empty(path: Path):
    """The model skeleton on the meta device, from config.json alone (no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    cfg = read_config(path)
    arch = architecture(cfg)
    adapter = adapter_for(arch)
    config = AutoConfig.from_pretrained(config_file(path), trust_remote_code=False)
    with init_empty_weights():
        model = model_class(arch)._from_config(config, dtype=torch.bfloat16)
    return model, adapter


def compute_dtype(device: str) -> torch.dtype:
    """BF16 on accelerators. On CPUs without BF16 matrix units BF16 runs 20x slower than FP32, so the CPU
    computes in FP32 on the BF16 weights (exactly representable): the reference is still the BF16 model."""
    return torch.bfloat16 if not str(device).startswith("cpu") else torch.float32


def _placement(device: str, device_map: str | None) -> dict:
    """from_pretrained's placement arguments. "auto": accelerate balances the layers over this process's GPUs
    (all of them, or under torchrun this rank's share), never onto the CPU or disk."""
    if device_map is None:
        return {"device_map": device}
    if device_map != "auto":
        raise FP8MixError(f"unknown --device-map {device_map!r}; the one supported value is auto")
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        raise FP8MixError("--device-map auto spreads the model over CUDA GPUs: pass --device cuda on a GPU machine")
    from ..distributed import local_gpus

    gpus = local_gpus()
    return {"device_map": "auto",
            "max_memory": {i: torch.cuda.get_device_properties(i).total_memory for i in gpus}}


def load(model: str | None = None, *, device: str = "cpu", dtype: torch.dtype | None = None,
         device_map: str | None = None, trust_remote_code: bool = False) -> LoadedModel:
    from .processor import load_processor

    dtype = dtype or compute_dtype(device)
    model_id, path = resolve(model)
    cfg = read_config(path)
    adapter = adapter_for(architecture(cfg))
    digest = fingerprint(path)
    placement = _placement(device, device_map)
    try:
        net, info = model_class(architecture(cfg)).from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, output_loading_info=True,
            **placement)
    except FP8MixError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise FP8MixError(f"cannot load the model from {path}: {first}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers would fill them with random values (e.g. a checkpoint in a naming it does not read)
        raise FP8MixError(f"cannot load the model from {path}: {len(missing)} weights missing from the checkpoint "
                          f"(first: {missing[0]}); is it a {adapter.title} checkpoint in the naming transformers reads?")
    spilled = sorted({str(d) for d in (getattr(net, "hf_device_map", None) or {}).values()} - {str(i) for i in range(64)})
    if device_map and spilled:
        raise FP8MixError(f"the model does not fit this process's GPUs (parts went to {', '.join(spilled)}); "
                          "use more GPUs per process (fewer processes) or a larger machine")
    net.eval()
    try:
        processor = load_processor(path)
    except Exception as exc:
        raise FP8MixError(f"cannot load the processor/tokenizer from {path}: {type(exc).__name__}: {exc}") from None
    return LoadedModel(net, processor, adapter, adapter.layout(net), model_id, path, digest)
