"""The staged folder swapped onto a checkpoint's destination."""

import os

import pytest


def test_an_interrupted_swap_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Interrupted between moving the previous checkpoint aside and moving the new one in: the previous one is back
    at its path, and no staged or set-aside folder is left."""
    from fp8mix.export import folder

    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "config.json").write_text("old")
    real, calls = os.replace, []

    def replace(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(a, b)

    with pytest.raises(KeyboardInterrupt):
        with folder.staged_dir(dest) as tmp:
            (tmp / "config.json").write_text("new")
            monkeypatch.setattr(folder.os, "replace", replace)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert (dest / "config.json").read_text() == "old"
