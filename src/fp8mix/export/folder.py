"""A checkpoint folder besides its weights, and its atomic swap.

``config.json`` is the source's with the writer's ``quantization_config`` added, checked after writing against the
plan's ignore list; processor, tokenizer, chat template and generation config come from the source folder and
``save_processor``. Everything is written into a hidden sibling folder that is renamed onto the destination at the
end (``staged_dir``): a failed export leaves nothing there, and any previous checkpoint untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import FP8MixError
from .source import Source

__all__ = ["AUX_FILES", "check_ignore", "staged_dir", "write_config", "write_side_files"]

# Files of the source folder that belong in a servable checkpoint besides weights and config.json.
AUX_FILES = ("generation_config.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
             "processor_config.json", "video_preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
             "*.tiktoken")


# ---- config and side files -------------------------------------------------------------------------------------

def write_config(src: Source, out_dir: Path, qconfig: dict) -> dict:
    cfg = json.loads(json.dumps(src.config))
    cfg["dtype"] = "bfloat16"
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = "bfloat16"
    cfg["quantization_config"] = qconfig
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def check_ignore(out_dir: Path, expected: list[str], key: str = "ignore") -> None:
    """The written config.json's ignore list must be the plan's, entry for entry."""
    got = json.loads((out_dir / "config.json").read_text())["quantization_config"].get(key)
    if got != list(expected):
        raise FP8MixError(f"config.json's quantization_config.{key} differs from the plan's ignore list "
                          f"({len(got or [])} vs {len(expected)} entries); refusing to write a checkpoint vLLM "
                          "would load with the wrong layers in FP8")


def write_side_files(src: Source, out_dir: Path) -> list[str]:
    """Processor, tokenizer, chat template and generation config: the source's files, then save_processor."""
    from ..models.processor import load_processor, save_processor

    copied = []
    for pattern in AUX_FILES:
        for f in sorted(src.path.glob(pattern)):
            if f.is_file():
                shutil.copyfile(f, out_dir / f.name)
                copied.append(f.name)
    if src.processor is None:  # loaded once for all the checkpoints written from this source
        src.processor = load_processor(src.path)
    processor = src.processor
    save_processor(processor, out_dir)
    if not (out_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        gen = src.generation_config
        if gen is None:
            from transformers import AutoConfig

            gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(src.path))
        gen.save_pretrained(out_dir)
    if not any((out_dir / n).is_file() for n in ("chat_template.jinja", "chat_template.json")):
        template = getattr(processor, "chat_template", None)
        if template:
            (out_dir / "chat_template.jinja").write_text(template)
    return copied


# ---- atomic folder ---------------------------------------------------------------------------------------------

def _public_modes(folder: Path) -> None:
    """mkdtemp and atomic writers create owner-only folders and files; a checkpoint gets the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


@contextmanager
def staged_dir(out_dir: Path) -> Iterator[Path]:
    """A hidden sibling folder that replaces out_dir on success and is deleted on failure."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    old = None
    try:
        yield tmp
        _public_modes(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
            os.replace(out_dir, old / "ckpt")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if (old / "ckpt").exists() and not out_dir.exists():  # stopped between the two moves: put it back
                os.replace(old / "ckpt", out_dir)
            if not (old / "ckpt").exists():
                shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
