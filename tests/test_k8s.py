"""Kubernetes manifests (deploy/k8s/) checked without a cluster: each overlay renders with ``kubectl kustomize``,
every built-in object validates against the Kubernetes 1.32 schema (kubernetes-validate, strict) and every
custom resource against its CRD's schema (tests/data/crds/, vendored from KEDA and the Prometheus Operator),
the pieces fit together (probes, shutdown timing, selectors, volumes, the checkpoint Job and the replicas),
the alert rules are the compose stack's, and every metric the autoscaler and the alerts query is one the
server exposes."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from models.checkpoint import MARKER
from tests.test_deploy import PROMETHEUS_SYNTHETIC, alert_rules, balanced, exposed_samples, metric_names

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.32.0"  # the kubectl these machines have (apt package kubectl: 1.32, Kustomize 5.5)
CRDS = ROOT / "tests" / "data" / "crds"
# Custom kinds: apiVersion, and the CRD (tests/data/crds/README.md: upstream file and release) declaring them.
CUSTOM_KINDS = {
    "ScaledObject": ("keda.sh/v1alpha1", "keda.sh_scaledobjects.yaml"),
    "ServiceMonitor": ("monitoring.coreos.com/v1", "monitoring.coreos.com_servicemonitors.yaml"),
    "PrometheusRule": ("monitoring.coreos.com/v1", "monitoring.coreos.com_prometheusrules.yaml"),
}
SERVER = "lowlat-server"


def render(overlay: str) -> dict[str, dict[str, Any]]:
    """``kind`` -> the one object of that kind the overlay renders."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (scripts/install.sh test installs it with apt where it can)")
    run = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    objects = [doc for doc in yaml.safe_load_all(run.stdout) if doc]
    kinds = [o["kind"] for o in objects]
    assert len(kinds) == len(set(kinds)), kinds
    return {o["kind"]: o for o in objects}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, dict[str, dict[str, Any]]]:
    return request.param, render(request.param)


def container(objects: dict[str, dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    pod = objects[kind]["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name)


def env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def strict(schema: Any) -> Any:
    """A CRD's structural schema with unknown fields refused, as ``kubectl apply`` (strict field validation)
    refuses them, where the schema lists its fields and keeps no unknown ones; Go regular expressions that
    set a flag after ``^`` written the way Python accepts (flag first)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: strict(v) if k != "enum" else v for k, v in schema.items()}
    if isinstance(schema.get("pattern"), str):
        schema["pattern"] = re.sub(r"^\^(\(\?[a-z]+\))", r"\1^", schema["pattern"])
    open_ = "additionalProperties" in schema or schema.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in schema and not open_:
        schema["additionalProperties"] = False
    return schema


def crd_validator(kind: str) -> jsonschema.Validator:
    """Validates a ``kind`` object against the schema its CRD declares for the version the manifests use."""
    api_version, path = CUSTOM_KINDS[kind]
    crd = yaml.safe_load((CRDS / path).read_text())
    assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == api_version.split("/")[0]
    version = next(v for v in crd["spec"]["versions"] if v["name"] == api_version.split("/")[1])
    assert version["served"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_every_object_validates_against_the_kubernetes_schema(rendered) -> None:
    _, objects = rendered
    assert set(objects) == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ScaledObject",
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
        "Job",
        "PersistentVolumeClaim",
    }
    for kind, obj in objects.items():
        assert obj["metadata"]["namespace"] == "lowlat", kind
        if kind in CUSTOM_KINDS:  # custom resources: no schema in Kubernetes itself, their CRD's instead
            assert obj["apiVersion"] == CUSTOM_KINDS[kind][0]
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            crd_validator(kind).validate(obj)
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    # The validator does reject what Kubernetes would (a misspelt field in the pod template).
    broken = copy.deepcopy(objects["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("ScaledObject", ["spec", "minReplicas"], 2),  # misspelt: minReplicaCount
        ("ScaledObject", ["spec", "triggers", 0, "metadata", "threshold"], 4),  # trigger metadata are strings
        ("ServiceMonitor", ["spec", "endpoints", 0, "intervall"], "5s"),
        ("PrometheusRule", ["spec", "groups", 0, "rules", 0, "for"], "5 minutes"),  # not a Prometheus duration
        ("PrometheusRule", ["spec", "groups", 0, "rules", 0, "expression"], "up == 0"),
    ],
)
def test_the_crd_schemas_reject_what_the_cluster_would(kind: str, path: list[str | int], value: object) -> None:
    broken = copy.deepcopy(render("cpu")[kind])
    crd_validator(kind).validate(broken)
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    errors = list(crd_validator(kind).iter_errors(broken))  # the field itself, or its object's unknown field
    assert errors and all(list(e.absolute_path) in (path, path[:-1]) for e in errors), [e.message for e in errors]


def test_the_alert_rules_are_the_compose_stacks(rendered) -> None:
    """One set of alert rules: the PrometheusRule carries deploy/prometheus/alerts.yml's groups unchanged."""
    _, objects = rendered
    rules = objects["PrometheusRule"]
    assert rules["metadata"]["labels"].items() <= objects["ServiceMonitor"]["metadata"]["labels"].items()
    assert [r for group in rules["spec"]["groups"] for r in group["rules"]] == alert_rules()
    assert {r["alert"] for r in alert_rules()} >= {
        "LowlatServerDown",
        "LowlatServerNotReady",
        "LowlatServerRestarting",
        "LowlatP99LatencyHigh",
        "LowlatRejectingRequests",
        "LowlatKVCacheSaturated",
        "LowlatQueueGrowing",
    }


def test_deployment_probes_shutdown_and_hardening(rendered) -> None:
    overlay, objects = rendered
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    server = container(objects, "Deployment", "server")
    port = server["ports"][0]
    assert port == {"name": "http", "containerPort": 8000} and env(server)["LLM_PORT"] == "8000"
    assert server["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert server["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    # SIGTERM after preStop; the drain may take shutdown_grace_s; the kubelet must not kill it before.
    pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = float(env(server)["LLM_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + grace + 5
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    for kind in ("Deployment", "Job"):
        spec = objects[kind]["spec"]["template"]["spec"]
        for c in spec["containers"] + spec.get("initContainers", []):
            ctx = c["securityContext"]
            assert ctx["readOnlyRootFilesystem"] and not ctx["allowPrivilegeEscalation"], c["name"]
            assert ctx["capabilities"]["drop"] == ["ALL"], c["name"]
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            declared = {v["name"] for v in spec["volumes"]}
            assert {m["name"] for m in c.get("volumeMounts", [])} <= declared, c["name"]
            if c["name"] in ("server", "compress"):
                assert "/tmp" in mounts and env(c)["HOME"] == "/tmp", c["name"]  # writable places
    assert "/cache" in {m["mountPath"] for m in server["volumeMounts"]}
    gpus = server["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == ("1" if overlay == "gpu" else None)
    assert env(server).get("LLM_DEVICE") == ("cuda" if overlay == "gpu" else None)
    assert server["image"] == f"lowlat-server:{'cuda' if overlay == 'gpu' else 'cpu'}"


def test_api_keys_come_from_a_secret_file(rendered) -> None:
    _, objects = rendered
    server = container(objects, "Deployment", "server")
    keys_file = Path(env(server)["LLM_API_KEYS_FILE"])
    assert "LLM_API_KEYS" not in env(server)  # never a literal key in the manifest
    mount = next(m for m in server["volumeMounts"] if m["mountPath"] == str(keys_file.parent))
    volume = next(v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "lowlat-api-keys" and mount["readOnly"]


def test_the_job_writes_the_checkpoints_the_replicas_serve(rendered) -> None:
    overlay, objects = rendered
    job, server = container(objects, "Job", "compress"), container(objects, "Deployment", "server")
    wait = container(objects, "Deployment", "wait-for-checkpoints")
    command = " ".join(job["command"] + job["args"])
    assert "python -m models.compress --task generate" in command and "--task classify" in command
    served = env(server)
    for flag, setting in (("--out /models/gen", "LLM_GEN_MODEL"), ("--out /models/cls", "LLM_CLS_MODEL")):
        assert flag in command and served[setting] == flag.split()[-1]
        assert f"{served[setting]}/{MARKER}" in " ".join(wait["args"])  # replicas wait for the complete marker
    assert env(job)["DEVICE"] == ("cuda" if overlay == "gpu" else "cpu")
    assert job["resources"]["limits"].get("nvidia.com/gpu") == ("1" if overlay == "gpu" else None)
    claims = {
        kind: {
            v["persistentVolumeClaim"]["claimName"]
            for v in objects[kind]["spec"]["template"]["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        for kind in ("Job", "Deployment")
    }
    assert claims["Job"] == claims["Deployment"] == {objects["PersistentVolumeClaim"]["metadata"]["name"]}
    assert objects["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    read_only = [m for m in server["volumeMounts"] if m["mountPath"] == "/models"]
    assert read_only and read_only[0]["readOnly"]


def test_service_pdb_monitor_and_policy_select_the_pods(rendered) -> None:
    _, objects = rendered
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and selector.items() <= labels.items()

    service = objects["Service"]
    assert selects(service["spec"]["selector"])
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]
    assert selects(objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"])
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    monitor = objects["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "5s"}]
    policy = objects["NetworkPolicy"]["spec"]
    assert selects(policy["podSelector"]["matchLabels"])
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [8000]
    scaled = objects["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == objects["Deployment"]["metadata"]["name"] == SERVER
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]


async def test_autoscaler_and_alerts_query_only_metrics_the_server_exposes(client: httpx.AsyncClient) -> None:
    rendered = [render(overlay) for overlay in OVERLAYS]
    triggers = [t for objects in rendered for t in objects["ScaledObject"]["spec"]["triggers"]]
    assert all(t["type"] == "prometheus" for t in triggers)
    scaling = [t["metadata"]["query"] for t in triggers]
    alerting = [
        r["expr"] for objects in rendered for g in objects["PrometheusRule"]["spec"]["groups"] for r in g["rules"]
    ]
    assert scaling and alerting and all(balanced(q) for q in scaling + alerting)
    queried = {name for q in scaling + alerting for name in metric_names(q)}
    assert {"llm_queued_requests", "llm_time_to_first_token_seconds_bucket", "llm_ready"} <= queried
    samples = await exposed_samples(client)
    assert queried - PROMETHEUS_SYNTHETIC <= set(samples), queried - PROMETHEUS_SYNTHETIC - set(samples)
    assert all(samples[name] == "histogram" for name in queried if name.endswith("_bucket"))
