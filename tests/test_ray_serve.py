"""The Ray Serve application (deploy/ray/app.py) for real: a local Ray instance, two replicas of the embedded
models, requests through Ray's HTTP proxy reaching both, one replica killed and the application recovering
(deploy/ray/check.py, run in a process of its own so Ray's workers never share this one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[1]


def test_two_replicas_serve_and_recover_from_a_killed_one(cache_dir: Path) -> None:
    pytest.importorskip("ray.serve", reason='Ray is not installed (pip install -e ".[test]" installs it)')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "LLM_CACHE_DIR": str(cache_dir)}
    run = subprocess.run(
        [sys.executable, "deploy/ray/check.py", "--timeout", "600"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    timings = json.loads(run.stdout[run.stdout.index("{") :])
    first, replacement = timings["replicas"]["first"], timings["replicas"]["replacement"]
    assert len(first) == 2 and len(replacement) == 1 and not set(first) & set(replacement)
    assert timings["survivor_answering_after_kill_s"] <= timings["replacement_answering_after_kill_s"]
