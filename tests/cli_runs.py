"""The fp8mix command run as a user runs it, and its one-line errors read back (for tests of the CLI)."""

import subprocess
import sys


def fp8mix(*args, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "fp8mix", *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(r, after_progress: bool = False) -> str:
    """The `error: ...` line of a failed command: non-zero exit, no traceback, and on stderr nothing but that line
    (with `after_progress`, progress bars of the stages that ran may come before it; the error is the last line)."""
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    if after_progress:
        assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    else:
        assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return errors[0]
