import pytest
import torch
import typer

from fp8mix import distributed
from fp8mix.cli import app
from fp8mix.context import RunOptions
from fp8mix.errors import FP8MixError


def test_auto_device_is_the_cpu_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert RunOptions(run=tmp_path, device="auto").device == "cpu"
    assert distributed.init("auto") == "cpu"


def test_auto_device_picks_cuda_when_present(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # nothing runs on it: resolving only
    assert RunOptions(run=tmp_path, device="auto").device == "cuda"
    assert distributed.init("auto") == "cuda"
    assert RunOptions(run=tmp_path, device="cpu").device == "cpu"
    assert RunOptions(run=tmp_path, device="cuda:1").device == "cuda:1"


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:0", ""])
def test_unknown_device_is_one_clear_line(tmp_path, device):
    with pytest.raises(FP8MixError, match="unknown --device"):
        RunOptions(run=tmp_path, device=device)


def test_every_stage_defaults_to_the_auto_device():
    commands = typer.main.get_command(app).commands
    for name in ("score", "export", "check", "eval", "run"):
        option = next(p for p in commands[name].params if p.name == "device")
        assert option.default == "auto", name


def _jsonl(path, answer):
    import json

    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{answer} {i}."}]}
            for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_edited_data_file_gives_other_scoring_settings(tmp_path):
    from fp8mix.context import catalog_of, overrides

    data = tmp_path / "data.jsonl"
    _jsonl(data, "It is")
    opts = RunOptions(run=tmp_path / "run", device="cpu", score_overrides={"data": str(data)})
    catalog, _ = catalog_of(opts)
    name = next(iter(catalog.schemes))
    before = catalog.settings(name, **overrides(opts))
    _jsonl(data, "It was")
    after = catalog.settings(name, **overrides(opts))
    assert before.key("m") != after.key("m")
    assert before.model_dump() != after.model_dump()  # the export's calibration key of fp8_static/KV schemes

