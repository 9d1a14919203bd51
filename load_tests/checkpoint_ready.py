"""Seconds from ``python -m server`` to ``/ready`` serving compressed checkpoints of both models: this source
tree (or ``--after REV``) against an earlier revision, in one run. Starts alternate (before, after, before, ...)
so that a machine shared with other jobs slows both alike. Besides the wall time, each start's CPU seconds (the
server process's user + system time when /ready answered: steadier than wall time on a shared machine), its
model load times (/info) and the load average when it began.

    HF_HUB_OFFLINE=1 python -m load_tests.checkpoint_ready --before 1a85dfc --after HEAD --repeats 5 \\
        --out load_tests/results/ready_time/cpu_checkpoint.json
    # GPU host: the 1.7B architecture (random weights; tokenizer and encoder dirs as for load_tests/ready_time.py)
    HF_HUB_OFFLINE=1 python -m load_tests.checkpoint_ready --before 1a85dfc --after HEAD --device cuda \\
        --gen-model dummy:smollm2-1.7b --cls-model MINILM_DIR --tokenizer TOKENIZER_DIR \\
        --out load_tests/results/ready_time/h200_checkpoint.json -- --compile-decode off

The checkpoints are written first with this tree's ``python -m models.compress`` (both revisions serve the same
directories), into a temporary directory unless ``--gen-ckpt``/``--cls-ckpt`` name existing ones. A revision runs from
a temporary ``git worktree`` of this repository. Not a test: a minute or more of starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from load_tests.cpu_bench import machine
from load_tests.ready_time import time_to_ready

ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), its children that have exited and those
    still running (engine cores and API servers under the supervisor), recursively."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:  # a child that exited meanwhile
        return 0.0
    own = sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(int(child)) for child in children)


def write_checkpoint(task: str, model: str, out: Path, device: str, extra: list[str], env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "models.compress", "--task", task, "--model", model, "--out", str(out)]
    cmd += ["--device", device, *extra]
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, text=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", help="git revision to compare with (none: this tree alone, e.g. where no git is)")
    p.add_argument("--after", help="git revision to compare it with (default: this working tree as it is)")
    p.add_argument("--repeats", type=int, default=5, help="starts of each")
    p.add_argument("--warmup", type=int, default=1, help="starts of each first, not counted (bytecode, page cache)")
    p.add_argument("--gen-model", default="default", help="model spec the generation checkpoint is written from")
    p.add_argument("--cls-model", default="default", help="model spec the classification checkpoint is written from")
    p.add_argument("--tokenizer", help="generation tokenizer dir (dummy models on a host without the embedded ones)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--gen-ckpt", type=Path, help="an existing generation checkpoint to serve instead")
    p.add_argument("--cls-ckpt", type=Path, help="an existing classification checkpoint to serve instead")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("server_args", nargs="*", help="more server flags, after --")
    args = p.parse_args()

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    work = Path(tempfile.mkdtemp(prefix="checkpoint-ready-"))
    trees = {"before": work / "before", "after": work / "after" if args.after else ROOT}
    if args.before is None:
        del trees["before"]
    revisions = {name: args.before if name == "before" else args.after for name in trees}
    described = {}
    try:
        for name, rev in revisions.items():
            if rev is not None:
                subprocess.run(["git", "worktree", "add", "--detach", str(trees[name]), rev], cwd=ROOT, check=True)
            describe = ["git", "describe", "--always", "--dirty"]
            try:
                described[name] = subprocess.run(describe, cwd=trees[name], capture_output=True, text=True).stdout
            except FileNotFoundError:  # no git on the host
                described[name] = ""
            described[name] = described[name].strip() or "(not a git checkout)"
        gen, cls_ = args.gen_ckpt or work / "gen", args.cls_ckpt or work / "cls"
        tokenizer = ["--tokenizer", args.tokenizer] if args.tokenizer else []
        for task, model, ckpt, extra in (
            ("generate", args.gen_model, gen, tokenizer),
            ("classify", args.cls_model, cls_, []),
        ):
            if not (ckpt / "lowlat_checkpoint.json").is_file():
                write_checkpoint(task, model, ckpt, args.device, extra, env)
        server_args = ["--gen-model", str(gen), "--cls-model", str(cls_), "--device", args.device, *args.server_args]
        starts: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for i in range(-args.warmup, args.repeats):
            for name, tree in trees.items():
                cache = work / f"cache-{name}-{i}"  # empty: a new replica
                load = os.getloadavg()[0]
                cpu: list[float] = []
                seconds, info = time_to_ready(
                    server_args,
                    {**env, "LLM_CACHE_DIR": str(cache)},
                    args.timeout,
                    cwd=tree,
                    on_ready=lambda proc, cpu=cpu: cpu.append(cpu_seconds(proc.pid)),
                )
                loads = {m["task"]: m["load_seconds"] for m in info["models"]}
                start = {"wall_s": round(seconds, 2), "cpu_s": round(cpu[0], 2), "load_avg_1m": round(load, 2)}
                start |= {f"{task}_load_s": s for task, s in loads.items()}
                print(f"{name} #{i + 1}{' (warm-up)' if i < 0 else ''}: {start}", flush=True)
                if i >= 0:
                    starts[name].append(start)
    finally:
        for name, rev in revisions.items():
            if rev is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(trees[name])], cwd=ROOT, check=False)
        shutil.rmtree(work, ignore_errors=True)

    summary = {name: {key: statistics.median(s[key] for s in runs) for key in runs[0]} for name, runs in starts.items()}
    m = machine()  # the host's CPU (on a GPU host too)
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m load_tests.checkpoint_ready", *sys.argv[1:]]),
        "revisions": described,
        "device": args.device,
        "machine": {k: v for k, v in m.items() if k != "lscpu"},
        "lscpu": m["lscpu"],
        "median": summary,
        "starts": starts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
