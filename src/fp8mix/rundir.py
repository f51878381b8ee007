"""The run directory's files: JSON written atomically (write, then rename) with a schema tag, read back checked."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import FP8MixError

SCHEMA = "fp8mix/{kind}/v{version}"


def dumps(doc: dict) -> str:
    """Canonical JSON: sorted keys, fixed indentation, so equal documents are equal bytes."""
    return json.dumps(doc, indent=2, sort_keys=True, allow_nan=True) + "\n"


def write_json(path: Path, kind: str, doc: dict, version: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA.format(kind=kind, version=version), **doc}
    text = dumps(doc)
    if path.is_file() and path.read_text() == text:  # unchanged: keep the file (and its time) as it is
        return path
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: Path, kind: str, hint: str = "", versions: tuple[int, ...] = (1,)) -> dict:
    """The document at `path`, which must be a `kind` file of one of `versions`."""
    path = Path(path)
    if not path.is_file():
        raise FP8MixError(f"{path} not found{'; ' + hint if hint else ''}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FP8MixError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); delete it and rerun the stage") from None
    wanted = [SCHEMA.format(kind=kind, version=v) for v in versions]
    if doc.get("schema") not in wanted:
        raise FP8MixError(f"{path} is not a {' or '.join(wanted)} file (schema {doc.get('schema')!r})")
    return doc


def schema_version(doc: dict) -> int:
    """The version number of a document read by `read_json`."""
    return int(doc["schema"].rsplit("/v", 1)[1])
