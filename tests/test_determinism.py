"""Same model, data and seed → byte-identical sensitivity.json and plans."""

import subprocess
import sys


def _run(out):
    r = subprocess.run([sys.executable, "-m", "fp8mix", "run", "--out", str(out), "--calib-samples", "8",
                        "--threads", "2", "--stop-after", "plan"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


def test_score_and_plans_are_byte_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a)
    _run(b)
    files = ["sensitivity.json"] + sorted(f"plans/{p.name}" for p in (a / "plans").iterdir())
    assert len(files) >= 4
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
