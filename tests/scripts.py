"""Running a script of experiments/ in a subprocess, as a user would, for the tests that check
its exit status, its output lines or the files it writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The child's environment: this checkout's sources, unbuffered UTF-8 output, no display, quiet TensorFlow.
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1", "PYTHONUTF8": "1",
       "MPLBACKEND": "Agg", "TF_CPP_MIN_LOG_LEVEL": "2"}


def run_experiment(script: str, *args: str, timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python experiments/<script>.py ARGS`` with captured text output (never raises on failure)."""
    return subprocess.run([sys.executable, str(REPO / "experiments" / f"{script}.py"), *args],
                          capture_output=True, encoding="utf-8", env=ENV, cwd=cwd, timeout=timeout)
