import json
import os
import shutil
import subprocess
import sys

from cli_runs import fp8mix, one_line_error

from fp8mix import __version__
from fp8mix.models.loading import EMBEDDED


def test_version():
    r = fp8mix("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fp8mix {__version__}"


def test_info_embedded():
    r = fp8mix("info")
    assert r.returncode == 0, r.stderr
    assert "8 blocks x 4" in r.stdout and "gate_up" in r.stdout and "tied to the embeddings" in r.stdout


def test_missing_path(tmp_path):
    assert "does not exist" in one_line_error(fp8mix("info", "--model", str(tmp_path / "nope")))


def test_corrupt_checkpoint(tmp_path):
    for f in EMBEDDED.iterdir():
        shutil.copy(f, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    assert "corrupt" in one_line_error(fp8mix("info", "--model", str(tmp_path)))


def test_pickle_only_checkpoint_is_refused(tmp_path):
    shutil.copy(EMBEDDED / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    from fp8mix.errors import FP8MixError
    from fp8mix.models import loading

    try:
        loading.load(str(tmp_path))
    except FP8MixError as exc:
        assert "never loads pickles" in str(exc)
    else:
        raise AssertionError("a pickle checkpoint was loaded")


def test_unsupported_model(tmp_path):
    cfg = json.loads((EMBEDDED / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    line = one_line_error(fp8mix("info", "--model", str(tmp_path)))
    assert "unsupported architecture 'LlamaForCausalLM'" in line and "Qwen2_5_VLForConditionalGeneration" in line


def test_schemes_for_a_shipped_family_config_needs_no_network():
    r = subprocess.run([sys.executable, "-m", "fp8mix", "schemes", "--model", "Qwen/Qwen2.5-VL-72B-Instruct"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200",
                                                                          "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "20/80 blocks" in r.stdout and "40/80 blocks" in r.stdout and "80/80 blocks" in r.stdout


def test_an_already_quantized_model_is_refused_as_a_source(tmp_path):
    from fp8mix.export import export_checkpoint
    from uniform_plans import uniform_plan

    ckpt = export_checkpoint(None, uniform_plan(None), tmp_path / "full")  # a real compressed-tensors FP8 export
    for cmd in (("info", "--model", str(ckpt)), ("score", "--model", str(ckpt), "--out", str(tmp_path / "run"))):
        line = one_line_error(fp8mix(*cmd))
        assert "already quantized" in line and "compressed-tensors" in line, line
    assert not (tmp_path / "run" / "sensitivity.json").exists()


def test_a_run_directory_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    for cmd in ("run", "score"):
        assert "is a file" in one_line_error(fp8mix(cmd, "--out", str(f), "--no-live" if cmd == "run" else "--force"))


def test_an_out_of_range_scoring_option_is_one_line_naming_it(tmp_path):
    for args, name in ((("--method", "foo"), "--method"), (("--seed", "-1"), "--seed"),
                       (("--calib-samples", "0"), "--calib-samples"), (("--batch-size", "0"), "--batch-size")):
        line = one_line_error(fp8mix("run", "--out", str(tmp_path / "r"), "--no-live", *args))
        assert name in line, line
    assert not (tmp_path / "r").exists()
