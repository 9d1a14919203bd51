"""Where an engine core's start goes, step by step in one process, as ``server.workers.run_core`` takes them:
imports, the device's start, the hardware policy (kernel self-checks included), each model's build, warm-ups.
The build runs under cProfile; the functions with the most cumulative time come out with the steps.

    HF_HUB_OFFLINE=1 python -m load_tests.core_start --out core_start.json -- --gen-model CKPT --cls-model CKPT

Server flags after ``--`` (as for ``python -m server``). A fresh interpreter per run: imports are what it
times first. Not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

T0 = time.perf_counter()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--top", type=int, default=40, help="functions of the build's profile to keep")
    p.add_argument("server_args", nargs="*", help="server flags, after --")
    args = p.parse_args()
    steps: dict[str, float] = {}
    last = T0

    def step(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        steps[name] = round(now - last, 3)
        last = now

    import torch

    step("import torch")
    from server import workers  # noqa: F401  (what a core imports: engines, app, metrics)

    step("import server.workers")
    from server.config import Settings
    from server.hardware import HardwarePolicy
    from server.runtime import Engines

    settings = Settings.from_cli(args.server_args)
    step("settings")
    if torch.cuda.is_available():
        torch.cuda.init()
        torch.zeros(1, device="cuda")
    step("device start")
    profile = cProfile.Profile()
    profile.enable()
    HardwarePolicy.decide(settings)
    step("hardware policy (first)")
    built = Engines.build(settings)  # decides the policy again, as a core does: the second time is cached work
    profile.disable()
    step("Engines.build")
    built.warm_up()
    step("warm-ups (generation, classification)")
    stats = pstats.Stats(profile)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[: args.top]  # type: ignore[attr-defined]
    top = [
        {"function": f"{fn} ({Path(file).name}:{line})", "cumulative_s": round(ct, 3), "own_s": round(tt, 3)}
        for (file, line, fn), (_, _, tt, ct, _) in rows
    ]
    result = {
        "argv": sys.argv,
        "steps_s": steps,
        "total_s": round(time.perf_counter() - T0, 3),
        "build_profile_top": top,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"steps_s": steps, "total_s": result["total_s"]}, indent=1))


if __name__ == "__main__":
    main()
