"""lowlat-server as a Ray Serve application: N replicas of the whole server (engines on threads of each
replica, as the one-process layout runs them), behind Ray's HTTP proxy, autoscaled on ongoing requests, one
GPU per replica where the cluster has GPUs, and Ray's health check asking what ``/ready`` answers.

    pip install "ray[serve]"       # not a server dependency: only this deployment uses it
    serve run deploy.ray.app:build min_replicas=2 max_replicas=4   # from the repository root
    curl localhost:8000/ready

Arguments (``key=value`` after the import path, or ``args:`` in a Serve config file): ``min_replicas``,
``max_replicas`` (2, 4), ``target_ongoing_requests`` (8: a replica's running batch is 16 sequences),
``num_gpus`` (per replica; default 1 when the cluster has GPUs, else 0), ``num_cpus`` (1), and any server
setting by its name (``gen_model=/models/gen``, ``kv_cache_tokens=8192``); ``LLM_*`` environment variables
of the replicas count as for ``python -m server``. Serve compressed checkpoints (``python -m models.compress``)
so a new replica starts in seconds instead of calibrating.

Each response carries ``X-Ray-Replica`` (the replica's id, also its actor's name), so a client sees which
replica answered.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from server.app import create_app
from server.asgi import ASGIApp, Receive, Scope, Send
from server.config import Settings
from server.routes.common import service_state
from server.runtime import Runtime

APP_ARGS = {"min_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 8, "num_cpus": 1.0, "num_gpus": None}
REPLICA_HEADER = b"x-ray-replica"


class ReplicaHeader:
    """ASGI wrapper naming the replica in every response's headers."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER, self.replica)]
            await send(message)

        await self.app(scope, receive, send_with_header)


@serve.ingress()
class LowlatServer:
    """One replica: loads and warms the models before Ray routes to it (the constructor), then serves the
    server's own ASGI app."""

    async def __init__(self, settings: dict[str, Any]) -> None:
        # Attribute names of our own: Ray's ingress wrapper has an ``app`` property.
        server_settings = Settings(**settings)
        self.lowlat_runtime = await asyncio.to_thread(Runtime.load, server_settings)
        await self.lowlat_runtime.start()
        self.lowlat_app = create_app(server_settings, self.lowlat_runtime)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return ReplicaHeader(self.lowlat_app, serve.get_replica_context().replica_id.to_full_id_str())

    async def check_health(self) -> None:
        """Ray restarts a replica whose check raises: the same states that make ``/ready`` answer 503
        (an engine that failed; not draining, which only happens while Ray stops the replica)."""
        state, message = service_state(self.lowlat_app)
        if state == "failed":
            raise RuntimeError(message)


def build(args: dict[str, str]) -> serve.Application:
    """The application for ``serve run deploy.ray.app:build key=value ...``."""
    import ray

    options = {k: args.get(k, v) for k, v in APP_ARGS.items()}
    settings = {k: v for k, v in args.items() if k not in APP_ARGS}
    server = Settings(**settings)  # invalid settings fail here, before any replica starts
    num_gpus = options["num_gpus"]
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    deployment = serve.deployment(
        LowlatServer,
        name="lowlat-server",
        ray_actor_options={"num_cpus": float(options["num_cpus"]), "num_gpus": float(num_gpus)},
        autoscaling_config={
            "min_replicas": int(options["min_replicas"]),
            "max_replicas": int(options["max_replicas"]),
            "target_ongoing_requests": float(options["target_ongoing_requests"]),
        },
        # A replica admits what its own limits allow and answers 429 past them; Ray queues at most this many.
        max_ongoing_requests=server.max_num_seqs + server.max_queued_requests,
        health_check_period_s=5,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=server.shutdown_grace_s,
    )
    return deployment.bind(settings)
