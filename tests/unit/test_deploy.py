"""The Kubernetes deployment (deploy/k8s) and images (deploy/docker), checked without a cluster: every object
matches the Kubernetes API schema (field names and types, from the official client's models), and the
manifests agree with the orchestrator config they carry. kubectl, where present, re-renders to prove that
the committed render (deploy/k8s/rendered.yaml, what the other checks read) is current.
"""

from __future__ import annotations

import base64
import copy
import datetime
import difflib
import importlib.util
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml

from orchestrator.common.config import load_config, parse_config
from orchestrator.common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl is not on PATH: the render's freshness is "
    "checked where it is; the committed render is validated regardless",
)


def _load_render_module():
    spec = importlib.util.spec_from_file_location("deploy_k8s_render", K8S / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_module = _load_render_module()


# --- the schema walker --------------------------------------------------------------------------
# The client's deserializer (from_dict, ApiClient.deserialize) drops unknown keys without a word, so a
# typo such as `readinesProbe` would load fine and the probe would silently not exist. This walks the
# document against each model's openapi_types (attribute -> type) and attribute_map (attribute -> JSON key)
# instead, rejecting unknown keys and wrong primitive types. Both spellings of the type strings are read:
# "List[X]"/"Dict[str, X]" (the pydantic models of client 37+) and "list[X]"/"dict(str, X)" (older ones).

# resource.Quantity is a string in the client's models, but the API also takes numbers (`nvidia.com/gpu: 8`).
_QUANTITY_FIELDS = {
    ("V1ResourceRequirements", "limits"),
    ("V1ResourceRequirements", "requests"),
    ("V1VolumeResourceRequirements", "limits"),
    ("V1VolumeResourceRequirements", "requests"),
    ("V1EmptyDirVolumeSource", "size_limit"),
    ("V1PodSpec", "overhead"),
}
_QUANTITY = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+|[numkMGTPE]|[KMGTPE]i)?$")
# The client types these "object"; the API says IntOrString.
_INT_OR_STRING_FIELDS = {
    ("V1HTTPGetAction", "port"),
    ("V1TCPSocketAction", "port"),
    ("V1ServicePort", "target_port"),
    ("V1RollingUpdateDaemonSet", "max_surge"),
    ("V1RollingUpdateDaemonSet", "max_unavailable"),
    ("V1RollingUpdateDeployment", "max_surge"),
    ("V1RollingUpdateDeployment", "max_unavailable"),
    ("V1PodDisruptionBudgetSpec", "min_available"),
    ("V1PodDisruptionBudgetSpec", "max_unavailable"),
    ("V1NetworkPolicyPort", "port"),
}
# base64 in JSON; newer clients type them "bytes", older ones "str".
_BYTES_FIELDS = {("V1Secret", "data"), ("V1ConfigMap", "binary_data")}
_LIST = re.compile(r"^(?:List|list)\[(.+)\]$")
_DICT = re.compile(r"^(?:Dict\[str, (.+)\]|dict\(str, (.+)\))$")


def model_for(api_version: str, kind: str) -> str:
    """The client's model class name for an apiVersion and kind: apps/v1 DaemonSet -> V1DaemonSet."""
    version = api_version.rsplit("/", 1)[-1]
    return version[:1].upper() + version[1:] + kind


def schema_errors(obj: Any, patch: bool = False) -> list[str]:
    """Every schema problem of one object (a dict with apiVersion and kind), as 'path: problem' lines.
    `patch`: a strategic merge patch (partial: no required fields; `$patch` directives allowed)."""
    if not isinstance(obj, dict) or not obj.get("apiVersion") or not obj.get("kind"):
        return ["<top>: expected an object with apiVersion and kind"]
    name = model_for(obj["apiVersion"], obj["kind"])
    if not hasattr(kubernetes.client, name):
        return [f"<top>: the kubernetes client has no model {name} for {obj['apiVersion']} {obj['kind']}"]
    errors: list[str] = []
    _walk_model(obj, name, "", errors, patch)
    return errors


def _required(cls: type) -> set[str]:
    """Attribute names the model requires: pydantic clients declare them; older ones refuse None in the
    attribute's setter, so ask each setter on a blank instance."""
    fields = getattr(cls, "model_fields", None)
    if fields is not None:
        return {f.alias or n for n, f in fields.items() if f.is_required()}
    blank = cls.__new__(cls)
    blank.local_vars_configuration = kubernetes.client.Configuration()
    required = set()
    for attr in cls.openapi_types:
        try:
            setattr(blank, attr, None)
        except ValueError:
            required.add(attr)
    return required


def _walk_model(value: Any, model: str, path: str, errors: list[str], patch: bool) -> None:
    cls = getattr(kubernetes.client, model)
    if not isinstance(value, dict):
        errors.append(f"{path or '<top>'}: expected an object ({model}), got {type(value).__name__}")
        return
    by_key = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    for key, item in value.items():
        at = f"{path}.{key}" if path else key
        if patch and key == "$patch":
            continue
        attr = by_key.get(key)
        if attr is None:
            close = difflib.get_close_matches(key, list(by_key), n=1)
            errors.append(
                f"{at}: unknown field in {model}" + (f" (did you mean {close[0]}?)" if close else "")
            )
        elif item is not None:  # null is "unset" to the API
            _walk_type(item, cls.openapi_types[attr], at, errors, patch, (model, attr))
    if not patch:
        for attr in sorted(_required(cls)):
            key = cls.attribute_map[attr]
            if value.get(key) is None:
                errors.append(f"{path}.{key}: required by {model}" if path else f"{key}: required by {model}")


def _walk_type(
    value: Any, tp: str, path: str, errors: list[str], patch: bool, owner: tuple[str, str]
) -> None:
    if m := _LIST.match(tp):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _walk_type(item, m.group(1), f"{path}[{i}]", errors, patch, owner)
    elif m := _DICT.match(tp):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected an object (map), got {type(value).__name__}")
            return
        for k, item in value.items():
            if not isinstance(k, str):
                errors.append(f"{path}: map key {k!r} is not a string")
            _walk_type(item, m.group(1) or m.group(2), f"{path}.{k}", errors, patch, owner)
    elif hasattr(kubernetes.client, tp) and hasattr(getattr(kubernetes.client, tp), "openapi_types"):
        _walk_model(value, tp, path, errors, patch)
    else:
        problem = _primitive_problem(value, tp, owner)
        if problem:
            errors.append(f"{path}: {problem}")


def _primitive_problem(value: Any, tp: str, owner: tuple[str, str]) -> str | None:
    got = f"got {type(value).__name__} {value!r}"
    if owner in _BYTES_FIELDS:
        tp = "bytes"
    if owner in _QUANTITY_FIELDS and tp == "str":
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
            isinstance(value, str) and _QUANTITY.match(value) is not None
        )
        return None if ok else f'expected a quantity (e.g. 8, "500m", "16Gi"), {got}'
    if tp == "object":
        if owner in _INT_OR_STRING_FIELDS and (isinstance(value, bool) or not isinstance(value, (int, str))):
            return f"expected an integer or a string, {got}"
        return None
    if tp == "str":
        return None if isinstance(value, str) else f"expected a string, {got}"
    if tp == "bool":
        return None if isinstance(value, bool) else f"expected true or false, {got}"
    if tp == "int":
        return (
            None if isinstance(value, int) and not isinstance(value, bool) else f"expected an integer, {got}"
        )
    if tp == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"expected a number, {got}"
    if tp in ("datetime", "date"):
        return None if isinstance(value, (str, datetime.date)) else f"expected a timestamp, {got}"
    if tp == "bytes":
        if not isinstance(value, str):
            return f"expected base64 text, {got}"
        try:
            base64.b64decode(re.sub(r"\s", "", value), validate=True)
        except ValueError:
            return "expected base64 text, which this is not"
        return None
    raise AssertionError(f"the walker does not know the client type {tp!r}")  # a new client spelling


# --- the render ---------------------------------------------------------------------------------


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


RENDERED = _docs((K8S / "rendered.yaml").read_text())
SOURCES = {
    p.name: _docs(p.read_text())
    for p in (K8S / "namespace.yaml", K8S / "daemonset.yaml", K8S / "service.yaml")
}


def _one(kind: str, docs: list[dict] = RENDERED) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in the render, found {len(found)}"
    return found[0]


DS = _one("DaemonSet")
POD = DS["spec"]["template"]["spec"]
CONTAINER = POD["containers"][0]
SERVICE = _one("Service")
CONFIG_TEXT = _one("ConfigMap")["data"]["config.toml"]
CONFIG = tomllib.loads(CONFIG_TEXT)


def _normalised(docs: list[dict]) -> list[dict]:
    """Docs sorted by kind and name, with the generated names' content hashes cut off: another kustomize
    version may order or hash differently; a content change still shows in the data itself."""
    text = re.sub(
        r"\b(orchestrator-config|orchestrator-curve)-[a-z0-9]{10}\b", r"\1", yaml.safe_dump_all(docs)
    )
    return sorted(_docs(text), key=lambda d: (d["kind"], d["metadata"]["name"]))


@needs_kubectl
def test_committed_render_is_fresh():
    fresh = _docs(render_module.render())
    assert _normalised(fresh) == _normalised(RENDERED), (
        "deploy/k8s/rendered.yaml is stale: run python3 deploy/k8s/render.py"
    )


def test_committed_config_matches_config_toml():
    """The render's ConfigMap holds deploy/k8s/config.toml as it is now (checked without kubectl)."""
    assert CONFIG_TEXT == (K8S / "config.toml").read_text(), (
        "deploy/k8s/rendered.yaml is stale: run python3 deploy/k8s/render.py"
    )


@pytest.mark.parametrize("doc", RENDERED, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_rendered_object_matches_api_schema(doc):
    assert schema_errors(doc) == []


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_manifest_matches_api_schema(name):
    """The sources too, so that a typo fails here even where kubectl is missing to re-render."""
    for doc in SOURCES[name]:
        assert schema_errors(doc) == []


# --- the walker catches what the client's deserializer would drop ---------------------------------


def _mutated(edit) -> dict:
    ds = copy.deepcopy(DS)
    edit(ds["spec"]["template"]["spec"]["containers"][0], ds["spec"]["template"]["spec"])
    return ds


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


def _set(d: dict, key: str, value: Any) -> None:
    d[key] = value


MUTATIONS = {
    "misspelt probe": (
        lambda c, p: _rename(c, "readinessProbe", "readinesProbe"),
        "containers[0].readinesProbe: unknown field in V1Container (did you mean readinessProbe?)",
    ),
    "misspelt nested field": (
        lambda c, p: _rename(c["livenessProbe"], "periodSeconds", "periodSecond"),
        "livenessProbe.periodSecond: unknown field in V1Probe (did you mean periodSeconds?)",
    ),
    "misspelt pod field": (
        lambda c, p: _rename(p, "terminationGracePeriodSeconds", "terminationGracePeriod"),
        "spec.terminationGracePeriod: unknown field in V1PodSpec",
    ),
    "string for an integer": (
        lambda c, p: _set(c["startupProbe"], "failureThreshold", "30"),
        "startupProbe.failureThreshold: expected an integer, got str '30'",
    ),
    "bool for a string": (
        lambda c, p: _set(p, "nodeSelector", {"orchestrator.example/gpu": True}),
        "nodeSelector.orchestrator.example/gpu: expected a string, got bool True",
    ),
    "not a quantity": (
        lambda c, p: _set(c["resources"]["limits"], "nvidia.com/gpu", "8 GPUs"),
        "limits.nvidia.com/gpu: expected a quantity",
    ),
    "object for a list": (
        lambda c, p: _set(c, "ports", {"name": "control", "containerPort": 7000}),
        "containers[0].ports: expected a list, got dict",
    ),
    "missing required field": (
        lambda c, p: c["ports"][0].pop("containerPort"),
        "ports[0].containerPort: required by V1ContainerPort",
    ),
    "bool for an IntOrString": (
        lambda c, p: _set(c["readinessProbe"]["httpGet"], "port", True),
        "httpGet.port: expected an integer or a string, got bool True",
    ),
}


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_schema_walker_catches(case):
    edit, expected = MUTATIONS[case]
    assert schema_errors(DS) == []
    errors = schema_errors(_mutated(edit))
    assert len(errors) == 1 and expected in errors[0], errors


def test_schema_walker_checks_secret_data_is_base64():
    secret = copy.deepcopy(_one("Secret"))
    secret["data"]["server.key_secret"] = "not base64!"
    assert schema_errors(secret) == ["data.server.key_secret: expected base64 text, which this is not"]


def test_schema_walker_takes_the_api_spellings_the_client_models_narrow():
    ds = _mutated(lambda c, p: c["resources"]["limits"].update({"cpu": "500m", "memory": 64 * 2**30}))
    ds["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = 9400
    assert schema_errors(ds) == []


# --- invariants between the manifests and the config they carry --------------------------------


def _container_port(ref: int | str) -> int:
    if isinstance(ref, int):
        return ref
    named = [p["containerPort"] for p in CONTAINER["ports"] if p.get("name") == ref]
    assert named, f"no container port named {ref!r}"
    return named[0]


def test_config_in_configmap_is_valid():
    cfg = parse_config(CONFIG, check_files=False)
    assert cfg.workers.device == "gpu" and cfg.workers.gpus == "all"
    assert cfg.transport.kind == "tcp" and cfg.transport.curve and cfg.transport.shm_mb == 0
    assert cfg.monitor.http_host == "0.0.0.0" and cfg.orchestrator.min_ready_workers >= 1


def test_validate_reports_only_the_secret_files():
    """Outside the pod the CURVE files do not exist; nothing else may be wrong (config.toml says so)."""
    with pytest.raises(ConfigError) as info:
        load_config(K8S / "config.toml")
    assert [e.split(":")[0] for e in info.value.errors] == [
        "transport.curve_server_secret",
        "transport.curve_clients_dir",
    ]


def test_probes_use_the_health_endpoints_on_the_metrics_port():
    expected = {"startupProbe": "/startupz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    for probe, path in expected.items():
        get = CONTAINER[probe]["httpGet"]
        assert get["path"] == path and _container_port(get["port"]) == CONFIG["monitor"]["metrics_port"], (
            probe
        )
    assert CONFIG["monitor"]["http_host"] == "0.0.0.0", "the kubelet probes the pod's address, not loopback"
    ready, live, start = CONTAINER["readinessProbe"], CONTAINER["livenessProbe"], CONTAINER["startupProbe"]
    assert (ready["periodSeconds"], ready["failureThreshold"]) == (2, 1)
    assert (live["periodSeconds"], live["failureThreshold"]) == (10, 3)
    startup_timeout = CONFIG["orchestrator"].get("startup_timeout_s", 120.0)
    assert start["periodSeconds"] * start["failureThreshold"] >= 2 * startup_timeout, (
        "the startup probe must outlast a worker's start-up timeout and one retry"
    )


def test_grace_period_covers_the_drain():
    assert POD["terminationGracePeriodSeconds"] >= CONFIG["orchestrator"]["stop_timeout_s"] + 5


def test_headless_service_lists_only_ready_daemonset_pods():
    spec = SERVICE["spec"]
    assert spec["clusterIP"] == "None" and spec["publishNotReadyAddresses"] is False
    pod_labels = DS["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"].items() <= pod_labels.items()
    assert DS["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"]: (p["port"], _container_port(p["targetPort"])) for p in spec["ports"]}
    control = CONFIG["transport"]["control_port"]
    metrics = CONFIG["monitor"]["metrics_port"]
    assert ports == {
        "control": (control, control),
        "events": (control + 1, control + 1),
        "metrics": (metrics, metrics),
    }


def test_gpu_limit_and_worker_ports_agree():
    gpus = CONTAINER["resources"]["limits"]["nvidia.com/gpu"]
    assert isinstance(gpus, int) and gpus >= 1
    assert DS["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0, (
        "a surge pod would wait for the GPUs"
    )
    base = CONFIG["transport"]["port_base"]
    workers = gpus * CONFIG["workers"].get("per_gpu", 1)
    declared = {p["containerPort"] for p in CONTAINER["ports"]}
    assert set(range(base, base + workers)) <= declared
    names = [p["name"] for p in CONTAINER["ports"]]
    assert len(set(names)) == len(names) and all(
        re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?", n) for n in names
    ), "port names: unique IANA service names"


def _mounts() -> dict[str, dict]:
    return {m["mountPath"]: m for m in CONTAINER["volumeMounts"]}


def _volume(name: str) -> dict:
    return next(v for v in POD["volumes"] if v["name"] == name)


def test_config_and_keys_are_mounted_where_the_config_says():
    mounts = _mounts()
    config_path = CONTAINER["args"][-1]
    config_volume = _volume(mounts[config_path]["name"])
    assert config_volume["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
    assert mounts[config_path]["subPath"] == "config.toml"
    secret = _one("Secret")
    curve = _volume(mounts["/etc/orchestrator/curve"]["name"])["secret"]
    assert curve["secretName"] == secret["metadata"]["name"]
    files = {f"/etc/orchestrator/curve/{item['path']}": item["key"] for item in curve["items"]}
    transport = CONFIG["transport"]
    assert files[transport["curve_server_secret"]] == "server.key_secret"
    clients = {path for path, key in files.items() if path.startswith(transport["curve_clients_dir"] + "/")}
    assert clients and all(p.endswith(".key") for p in clients), "the server loads clients' *.key files only"
    # Every key of the Secret reaches the pod: a client key listed in the generator without its item
    # would be silently left out, and that client refused.
    assert set(secret["data"]) == set(files.values())


def test_run_directory_is_a_private_subdirectory_of_a_memory_volume():
    run_dir = CONFIG["orchestrator"]["run_dir"]
    mounts = _mounts()
    mount = max((m for m in mounts if run_dir.startswith(m.rstrip("/") + "/")), key=len)
    assert mount != run_dir, "the supervisor must own (chmod 0700) its run directory: not the mount point"
    assert _volume(mounts[mount]["name"])["emptyDir"]["medium"] == "Memory"
    assert _volume(mounts["/dev/shm"]["name"])["emptyDir"]["medium"] == "Memory"
    assert all(
        _volume(m["name"]).get("emptyDir", {}).get("sizeLimit")
        for m in mounts.values()
        if "emptyDir" in _volume(m["name"])
    ), "every emptyDir has a sizeLimit"


def test_pod_meets_the_namespace_pod_security_level():
    """The namespace enforces "restricted"; a pod that needs more would be refused at admission."""
    assert _one("Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    psc, csc = POD["securityContext"], CONTAINER["securityContext"]
    assert (
        psc["runAsNonRoot"] is True
        and psc["runAsUser"] > 0
        and psc["seccompProfile"]["type"] == "RuntimeDefault"
    )
    assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"]
    assert not any(POD.get(k) for k in ("hostNetwork", "hostIPC", "hostPID"))
    allowed = {
        "configMap",
        "secret",
        "emptyDir",
        "persistentVolumeClaim",
        "projected",
        "downwardAPI",
        "csi",
        "ephemeral",
    }
    assert all((set(v) - {"name"}) <= allowed for v in POD["volumes"])
    annotations = DS["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(CONFIG["monitor"]["metrics_port"])


def test_every_object_is_in_the_namespace():
    namespace = _one("Namespace")["metadata"]["name"]
    assert all(d["metadata"].get("namespace") == namespace for d in RENDERED if d["kind"] != "Namespace")


# --- optional pieces ----------------------------------------------------------------------------


def test_servicemonitor_scrapes_the_service_metrics_port():
    monitor = _docs((K8S / "optional" / "servicemonitor.yaml").read_text())[0]
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    errors: list[str] = []  # a CRD, not in the client: check the parts that are core types
    _walk_model(monitor["metadata"], "V1ObjectMeta", "metadata", errors, False)
    _walk_model(monitor["spec"]["selector"], "V1LabelSelector", "spec.selector", errors, False)
    assert errors == []
    assert monitor["spec"]["selector"]["matchLabels"].items() <= SERVICE["metadata"]["labels"].items()
    assert monitor["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (
        endpoint["port"] in {p["name"] for p in SERVICE["spec"]["ports"]} and endpoint["path"] == "/metrics"
    )


def test_mps_host_patches_match_api_schema():
    for patch in sorted((K8S / "optional" / "mps-host").glob("*-patch.yaml")):
        for doc in _docs(patch.read_text()):
            assert schema_errors(doc, patch=True) == [], patch.name


@needs_kubectl
def test_mps_host_component_renders_a_valid_host_ipc_pod():
    docs = _docs(render_module.render(components=("optional/mps-host",)))
    assert [e for d in docs for e in schema_errors(d)] == []
    pod = _one("DaemonSet", docs)["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert pod["hostIPC"] is True and "/dev/shm" not in mounts, (
        "MPS needs the host's /dev/shm, not an emptyDir"
    )
    pipe = next(v for v in pod["volumes"] if v["name"] == mounts["/tmp/nvidia-mps"])
    assert pipe["hostPath"]["type"] == "Directory"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/nvidia-mps"
    assert _one("Namespace", docs)["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_render_uses_placeholders_not_keys():
    """The committed Secret must never hold a usable key pair: anyone could then pose as the server."""
    secret = _one("Secret")
    for key, value in secret["data"].items():
        assert base64.b64decode(value).decode() == render_module.PLACEHOLDER, key


# --- images -------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_dockerfile_agrees_with_the_daemonset(name):
    steps = _instructions(DOCKER / name)
    last = {op: arg for op, arg in steps}
    assert last["ENTRYPOINT"] == '["orchestrator"]'
    assert last["CMD"] == '["start", "/etc/orchestrator/config.toml"]'
    assert CONTAINER["args"] == ["start", "/etc/orchestrator/config.toml"]
    user, group = last["USER"].split(":")
    assert (int(user), int(group)) == (
        POD["securityContext"]["runAsUser"],
        POD["securityContext"]["runAsGroup"],
    )
    for op, arg in steps:  # the build context is the repository root: every source must exist there
        if op == "COPY" and not arg.startswith("--from"):
            for source in arg.split()[:-1]:
                assert (ROOT / source).exists(), f"{name}: COPY {source}: not in the repository"


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_dockerfile_installs_the_server_extra(name):
    """The images run `orchestrator start`: the core install alone is a client (pyproject.toml)."""
    steps = _instructions(DOCKER / name)
    args = dict(arg.split("=", 1) for op, arg in steps if op == "ARG" and "=" in arg)
    installs = [arg for op, arg in steps if op == "RUN" and "pip install" in arg]
    assert len(installs) == 1, installs
    extras = re.search(
        r'pip install "\.\[([^\]]+)\]"', installs[0].replace("${EXTRAS}", args.get("EXTRAS", ""))
    )
    assert extras and "server" in extras.group(1).split(","), installs[0]
