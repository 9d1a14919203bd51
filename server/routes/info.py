"""GET /info: what this server runs — models, device, the hardware policy and the startup compression reports."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from models.compress import CompressionReport
from server.hardware import HardwarePolicy
from server.routes.common import ready_runtime

router = APIRouter()


class ModelInfo(BaseModel):
    task: str
    model: str
    load_seconds: float | None = None
    compression: CompressionReport | None = None


class InfoResponse(BaseModel):
    device: str
    hardware: HardwarePolicy | None  # what `auto` settings resolved to on the (first) engine core's device
    models: list[ModelInfo]
    # Where decode steps compile after /ready (hardware.compile_decode "background") and the engine runs in this
    # process: state, the buckets compiled (seconds after the start of compiling) and those still eager.
    decode_compile: dict[str, object] | None = None


@router.get("/info", response_model=InfoResponse)
async def info(request: Request) -> InfoResponse:
    runtime = ready_runtime(request)
    models = []
    for task, entry in runtime.served.info.items():
        details = entry if isinstance(entry, dict) else {}
        models.append(
            ModelInfo(
                task=task,
                model=str(details.get("model", "")),
                load_seconds=details.get("load_seconds"),
                compression=runtime.served.reports.get(task),
            )
        )
    return InfoResponse(
        device=str(runtime.device), hardware=runtime.served.policy, models=models, decode_compile=runtime.decode_compile
    )
