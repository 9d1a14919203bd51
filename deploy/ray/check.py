"""Runs the Ray Serve application for real on this machine and checks what a deployment relies on: a local
Ray instance, two replicas of the embedded models, requests through Ray's HTTP proxy reaching both, one
replica killed and the application recovering (the survivor keeps answering; Ray starts a replacement).

    pip install "ray[serve]"
    PYTHONPATH=. HF_HUB_OFFLINE=1 python deploy/ray/check.py --out load_tests/results/ray_serve/cpu.json

Prints and writes the timings; exits non-zero when a check fails. tests/test_ray_serve.py runs it when Ray
is installed.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx

# Small engine limits: two replicas of both models share this machine (the KV cache is most of the memory);
# eager decode: a compiled one would compile for minutes in each replica before it is ready.
REPLICA_SETTINGS = {
    "compile_decode": "off",
    "kv_cache_tokens": "4096",
    "max_input_tokens": "256",
    "max_new_tokens": "64",
    "default_max_tokens": "16",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replicas_answering(url: str, want: int, deadline: float, exclude: frozenset[str] = frozenset()) -> set[str]:
    """Sends generation requests through the proxy until ``want`` distinct replicas (not in ``exclude``)
    answered 200; every answer must be a 200 from a replica that is up, or a retryable 503 while loading."""
    seen: set[str] = set()
    while time.monotonic() < deadline:
        try:
            r = httpx.post(f"{url}/generate", json={"prompt": "Hello", "max_tokens": 4}, timeout=60)
        except httpx.TransportError:
            time.sleep(0.5)
            continue
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] >= 1, r.text
            replica = r.headers["x-ray-replica"]
            if replica not in exclude:
                seen.add(replica)
            if len(seen) >= want:
                return seen
        else:
            assert r.status_code in (502, 503), f"{r.status_code}: {r.text[:300]}"
            time.sleep(0.5)
    raise AssertionError(f"only {len(seen)} of {want} replicas answered in time: {seen}")


def run(timeout: float = 600.0) -> dict[str, Any]:
    import ray
    from ray import serve

    from deploy.ray.app import build

    timings: dict[str, Any] = {}
    start = time.monotonic()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        timings["ray_start_s"] = round(time.monotonic() - start, 1)
        app = build({"min_replicas": "2", "max_replicas": "2", **REPLICA_SETTINGS})
        serve.run(app, name="lowlat", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        first = replicas_answering(url, 2, deadline)
        timings["two_replicas_answering_s"] = round(time.monotonic() - start, 1)
        assert httpx.get(f"{url}/ready", timeout=10).status_code == 200
        classify = httpx.post(f"{url}/classify", json={"inputs": ["refund"], "labels": ["billing", "weather"]})
        assert classify.status_code == 200 and classify.json()["results"][0]["label"] == "billing", classify.text

        victim_id = sorted(first)[0]  # the replica's actor name
        killed = time.monotonic()
        ray.kill(ray.get_actor(victim_id, namespace="serve"), no_restart=True)
        # The survivor keeps serving at once; Ray then starts a replacement that answers too.
        survivor = replicas_answering(url, 1, time.monotonic() + 60)
        timings["survivor_answering_after_kill_s"] = round(time.monotonic() - killed, 1)
        assert victim_id not in survivor
        replacement = replicas_answering(url, 1, deadline, exclude=frozenset(first))
        timings["replacement_answering_after_kill_s"] = round(time.monotonic() - killed, 1)
        timings["replicas"] = {"first": sorted(first), "replacement": sorted(replacement)}
        status = serve.status().applications["lowlat"]
        assert status.status == "RUNNING", status
        timings["total_s"] = round(time.monotonic() - start, 1)
        return timings
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    timings = run(args.timeout)
    print(json.dumps(timings, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(timings, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
