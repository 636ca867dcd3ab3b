"""Offline validation of the KubeRay manifests in k8s/.

- ``k8s/rayservice.yaml`` against the RayService v1 CRD schema (vendored in k8s/schemas/, with the
  Kubernetes core definitions it refers to), read the way the API server reads a CRD: unknown
  fields are errors (strict field validation), ``x-kubernetes-int-or-string`` is integer-or-string,
  ``x-kubernetes-preserve-unknown-fields`` leaves an object open. CEL rules are not evaluated;
  the operator's own checks that matter here are re-stated in ``kuberay_errors``.
- its ``serveConfigV2`` against Ray Serve's ``ServeDeploySchema`` (the installed Ray's pydantic
  model, and the vendored JSON Schema of it);
- the wiring between them: GPU pools, Ray custom resources named in the app's args, ports, and
  the gRPC servicer function the proxies import.
- ``k8s/profile-job.yaml`` against the Kubernetes Job schema.
No cluster, no Ray runtime: pure parsing (Ray is imported for its schema only).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SCHEMAS = K8S / "schemas"
RAY_VERSION = "2.60.0"
GPU = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
POOL_LABEL = "cast.io/pool"
POOL_ARGS = {"drafter": "drafter_pool", "verifier": "verifier_pool"}
"""Worker group name -> the app arg that names its Ray custom resource."""

pytestmark = [
    pytest.mark.timeout(60),
    # Ray's own pydantic models use deprecated Field(...) extras; not ours to fix.
    pytest.mark.filterwarnings("ignore::pydantic.PydanticDeprecatedSince20"),
]

Json = dict[str, Any]


# --- schema plumbing ---------------------------------------------------------------------------


def kube_to_jsonschema(node: Any) -> Any:
    """Translate Kubernetes structural-schema conventions into plain JSON Schema (2020-12).

    - an object with ``properties`` and no ``additionalProperties`` is closed, as the API server's
      strict field validation (kubectl's default) rejects unknown fields -- unless it carries
      ``x-kubernetes-preserve-unknown-fields: true``;
    - ``x-kubernetes-int-or-string: true`` without a type means ``anyOf: [integer, string]``;
    - OpenAPI's ``nullable: true`` becomes a ``null`` member of ``type``.
    Other ``x-kubernetes-*`` keys are annotations that JSON Schema ignores.
    """
    if isinstance(node, list):
        return [kube_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: Json = {}
    for key, value in node.items():
        if key in ("properties", "$defs", "patternProperties"):
            out[key] = {name: kube_to_jsonschema(sub) for name, sub in value.items()}
        else:
            out[key] = kube_to_jsonschema(value)
    if out.pop("nullable", False) and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    open_object = out.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not open_object:
        out["additionalProperties"] = False
    return out


def _format_checker() -> jsonschema.FormatChecker:
    """Checks the integer formats of Kubernetes schemas (others, like date-time, are not checked)."""
    checker = jsonschema.FormatChecker(formats=())
    for name, bits in (("int32", 32), ("int64", 64)):
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        checker.checks(name)(lambda value, low=low, high=high: not isinstance(value, int) or low <= value <= high)
    return checker


def _k8s_definitions() -> Json:
    return json.loads((SCHEMAS / "kubernetes-v1.36-definitions.json").read_text())["$defs"]


def validator_for(schema: Json) -> jsonschema.Draft202012Validator:
    """A validator for ``schema`` with the Kubernetes core definitions merged into its ``$defs``."""
    merged = dict(schema)
    merged["$defs"] = {**_k8s_definitions(), **schema.get("$defs", {})}
    merged = kube_to_jsonschema(merged)
    jsonschema.Draft202012Validator.check_schema(merged)
    return jsonschema.Draft202012Validator(merged, format_checker=_format_checker())


def schema_errors(validator: jsonschema.Draft202012Validator, instance: Any) -> list[str]:
    """Every validation error as ``path: message``, sorted."""
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance))


def load_docs(path: Path) -> list[Json]:
    """The YAML documents of ``path`` (empty ones dropped)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayservice() -> Json:
    docs = load_docs(K8S / "rayservice.yaml")
    assert len(docs) == 1
    return docs[0]


@pytest.fixture(scope="module")
def crd() -> jsonschema.Draft202012Validator:
    return validator_for(yaml.safe_load((SCHEMAS / "rayservice.ray.io_v1.schema.yaml").read_text()))


@pytest.fixture(scope="module")
def serve_config(rayservice: Json) -> Json:
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert isinstance(config, dict)
    return config


@pytest.fixture(scope="module")
def app(serve_config: Json) -> Json:
    (application,) = serve_config["applications"]
    return application


def workers(rayservice: Json) -> dict[str, Json]:
    """Worker groups by name."""
    return {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def head(rayservice: Json) -> Json:
    """The head group."""
    return rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]


def ray_container(group: Json) -> Json:
    """The Ray container: KubeRay runs Ray in the first container of the pod template."""
    return group["template"]["spec"]["containers"][0]


def ray_custom_resources(group: Json) -> dict[str, float]:
    """Custom Ray resources a group's nodes advertise (group ``resources`` or ``rayStartParams``)."""
    out = {name: float(value) for name, value in group.get("resources", {}).items()
           if name.lower() not in ("cpu", "memory") and "gpu" not in name.lower()}
    raw = group.get("rayStartParams", {}).get("resources")
    if raw:  # e.g. '"{\"drafter_pool\": 1}"': shell-quoted JSON
        out.update(json.loads(raw.strip().strip("'\"").replace('\\"', '"')))
    return out


# --- RayService against the CRD ----------------------------------------------------------------


def test_rayservice_is_a_v1_rayservice(rayservice: Json) -> None:
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert rayservice["kind"] == "RayService"


def test_rayservice_matches_crd_schema(crd: jsonschema.Draft202012Validator, rayservice: Json) -> None:
    assert schema_errors(crd, rayservice) == []


def test_rayservice_metadata_is_valid_object_meta(rayservice: Json) -> None:
    meta = validator_for({"$ref": "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"})
    assert schema_errors(meta, rayservice["metadata"]) == []
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", rayservice["metadata"]["name"]), "DNS-1035 label"


def _set(path: str, value: Any) -> Callable[[Json], None]:
    """A mutation that sets the ``/``-separated ``path`` (list indices as numbers) to ``value``."""

    def mutate(doc: Json) -> None:
        *parents, leaf = [int(p) if p.isdigit() else p for p in path.split("/")]
        node: Any = doc
        for part in parents:
            node = node[part]
        node[leaf] = value

    return mutate


def _delete(path: str) -> Callable[[Json], None]:
    def mutate(doc: Json) -> None:
        *parents, leaf = [int(p) if p.isdigit() else p for p in path.split("/")]
        node: Any = doc
        for part in parents:
            node = node[part]
        del node[leaf]

    return mutate


WORKER0 = "spec/rayClusterConfig/workerGroupSpecs/0"
CONTAINER0 = f"{WORKER0}/template/spec/containers/0"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_set("spec/rayClusterConfig/headGroupSpec/rayStartParams/num-cpus", 0), "is not of type 'string'"),
        (_set(f"{WORKER0}/resources/drafter_pool", 1), "is not of type 'string'"),
        (_set(f"{WORKER0}/minReplica", 1), "Additional properties are not allowed"),
        (_set(f"{WORKER0}/template/spec/nodeSelectors", {}), "Additional properties are not allowed"),
        (_delete(f"{WORKER0}/template"), "'template' is a required property"),
        (_delete(f"{WORKER0}/maxReplicas"), "'maxReplicas' is a required property"),
        (_delete("spec/rayClusterConfig/headGroupSpec"), "'headGroupSpec' is a required property"),
        (_set(f"{CONTAINER0}/resources/limits/cpu", 0.5), "is not valid under any of the given schemas"),
        (_set(f"{CONTAINER0}/resources/limits/memory", "32 GiB"), "does not match"),
        (_set(f"{WORKER0}/maxReplicas", 2**31), "is not a 'int32'"),
        (_set("spec/rayClusterConfig/authOptions/mode", "on"), "is not one of"),
        (_set("spec/serveConfigV2", {"applications": []}), "is not of type 'string'"),
        (_set("spec/serveService/spec/ports/0/port", "http"), "is not of type 'integer'"),
    ],
    ids=[
        "rayStartParams-int", "resources-int", "typo-in-group", "typo-in-podspec", "no-template", "no-maxReplicas",
        "no-head", "cpu-float", "bad-quantity", "int32-overflow", "auth-enum", "serveConfigV2-not-string",
        "service-port-name",
    ],
)
def test_crd_schema_rejects_mistakes(
    crd: jsonschema.Draft202012Validator, rayservice: Json, mutate: Callable[[Json], None], expected: str
) -> None:
    broken = copy.deepcopy(rayservice)
    mutate(broken)
    errors = schema_errors(crd, broken)
    assert any(expected in e for e in errors), errors


def test_kube_to_jsonschema() -> None:
    schema = kube_to_jsonschema({
        "type": "object",
        "properties": {
            "n": {"x-kubernetes-int-or-string": True},
            "t": {"type": "string", "nullable": True},
            "open": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"a": {"type": "string"}},
            },
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    })
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"n": 1, "t": None, "open": {"a": "x", "b": 2}, "map": {"k": "v"}})
    assert validator.is_valid({"n": "50%"})
    assert not validator.is_valid({"n": 1.5})
    assert not validator.is_valid({"unknown": 1})
    assert not validator.is_valid({"map": {"k": 1}})


# --- what the operator itself rejects ----------------------------------------------------------

_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_RAY_START_RESOURCE_KEYS = ("num-cpus", "num-gpus", "memory", "resources")


def _label_errors(group: str, labels: dict[str, str]) -> list[str]:
    errors = []
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        bad_prefix = bool(prefix) and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix))
        if bad_prefix or len(name) > 63 or not _LABEL_NAME.fullmatch(name):
            errors.append(f"{group}: invalid label key {key!r}")
        if value and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
            errors.append(f"{group}: invalid label value {value!r}")
    return errors


def kuberay_errors(spec: Json) -> list[str]:
    """The RayCluster checks of KubeRay's validation (ray-operator/controllers/ray/utils/validation.go,
    ValidateRayClusterSpec) that a schema cannot express."""
    errors: list[str] = []
    groups = [("head", spec["headGroupSpec"]), *((g["groupName"], g) for g in spec.get("workerGroupSpecs", []))]
    for name, group in groups:
        if not group["template"].get("spec", {}).get("containers"):
            errors.append(f"{name}: pod template has no container")
        params = group.get("rayStartParams", {})
        if "labels" in params:
            errors.append(f"{name}: rayStartParams['labels'] is not supported; use the group's labels field")
        if group.get("resources") and any(params.get(k) for k in _RAY_START_RESOURCE_KEYS):
            errors.append(f"{name}: resources set in both rayStartParams and the resources field")
        errors += _label_errors(name, group.get("labels", {}))
    names = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
    if len(set(names)) != len(names):
        errors.append(f"duplicate worker group names: {names}")
    for group in spec.get("workerGroupSpecs", []):
        low, high = group["minReplicas"], group["maxReplicas"]
        replicas = group.get("replicas", low)
        if not 0 <= low <= replicas <= high:
            errors.append(f"{group['groupName']}: need 0 <= minReplicas <= replicas <= maxReplicas")
    if spec.get("authOptions", {}).get("mode") == "token":
        version = tuple(int(p) for p in spec.get("rayVersion", "0").split(".")[:3])
        if version < (2, 52, 0):
            errors.append("authOptions.mode 'token' needs rayVersion >= 2.52.0")
    return errors


def test_rayservice_passes_kuberay_validation(rayservice: Json) -> None:
    assert kuberay_errors(rayservice["spec"]["rayClusterConfig"]) == []


def test_kuberay_validation_catches_mistakes(rayservice: Json) -> None:
    spec = copy.deepcopy(rayservice["spec"]["rayClusterConfig"])
    spec["workerGroupSpecs"][0]["rayStartParams"] = {"labels": "a=b", "resources": '"{\\"x\\": 1}"'}
    spec["workerGroupSpecs"][1]["labels"] = {"-bad": "ok"}
    spec["workerGroupSpecs"][1]["minReplicas"] = 9
    errors = kuberay_errors(spec)
    assert len(errors) == 4, errors


# --- GPU pools ---------------------------------------------------------------------------------


def test_head_has_no_gpu(rayservice: Json) -> None:
    resources = ray_container(head(rayservice)).get("resources", {})
    assert GPU not in resources.get("limits", {}) and GPU not in resources.get("requests", {})
    assert head(rayservice)["rayStartParams"].get("num-cpus") == "0", "keep Serve replicas off the head"


@pytest.mark.parametrize("group_name", sorted(POOL_ARGS))
def test_gpu_worker_group(rayservice: Json, group_name: str) -> None:
    group = workers(rayservice)[group_name]
    pod = group["template"]["spec"]
    resources = ray_container(group)["resources"]
    assert str(resources["limits"][GPU]) == "1"
    assert str(resources.get("requests", {}).get(GPU, resources["limits"][GPU])) == "1"
    assert pod["nodeSelector"][GPU_PRODUCT_LABEL]
    assert any(t["key"] == GPU and t.get("effect", "NoSchedule") == "NoSchedule" for t in pod["tolerations"])
    assert group["minReplicas"] >= 1, "a pool must keep one node for its deployment"


def test_worker_groups_are_exactly_the_pools(rayservice: Json) -> None:
    assert set(workers(rayservice)) == set(POOL_ARGS)


# --- Serve config ------------------------------------------------------------------------------


def test_serve_config_validates_with_rays_model(serve_config: Json) -> None:
    from ray.serve.schema import ServeDeploySchema

    parsed = ServeDeploySchema.model_validate(serve_config)
    assert parsed.http_options.host == "0.0.0.0" and parsed.http_options.port == 8000
    assert parsed.grpc_options.port == 9000
    assert parsed.grpc_options.grpc_servicer_functions == ["services.grpc_api.lenient.add_cast_servicer"]
    (application,) = parsed.applications
    assert application.import_path == "services.app:app_builder"


def test_serve_config_validates_with_vendored_json_schema(serve_config: Json) -> None:
    schema = json.loads((SCHEMAS / f"serve-deploy-schema.ray-{RAY_VERSION}.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    assert schema_errors(validator, serve_config) == []
    assert not validator.is_valid({**serve_config, "grpc_options": {"port": "nine thousand"}})


def test_vendored_serve_schema_matches_installed_ray() -> None:
    import ray
    from ray.serve.schema import ServeDeploySchema

    if ray.__version__ != RAY_VERSION:
        pytest.skip(f"vendored schema is for ray {RAY_VERSION}, installed {ray.__version__}")
    vendored = json.loads((SCHEMAS / f"serve-deploy-schema.ray-{RAY_VERSION}.json").read_text())
    vendored.pop("$comment")
    assert vendored == json.loads(json.dumps(ServeDeploySchema.model_json_schema()))


def test_app_args(app: Json) -> None:
    args = app["args"]
    assert {"target", "drafter", "policy", "drafter_pool", "verifier_pool"} <= set(args)
    assert args["policy"] in {"cast", "static", "none"}
    assert args["target"] and args["drafter"] and args["target"] != args["drafter"]


@pytest.mark.parametrize("group_name", sorted(POOL_ARGS))
def test_pool_resources_match_app_args(rayservice: Json, app: Json, group_name: str) -> None:
    pool = app["args"][POOL_ARGS[group_name]]
    advertising = [name for name, g in workers(rayservice).items() if pool in ray_custom_resources(g)]
    assert advertising == [group_name], f"Ray resource {pool!r} must be advertised by the {group_name} group only"
    assert ray_custom_resources(workers(rayservice)[group_name])[pool] >= 1
    assert workers(rayservice)[group_name]["labels"][POOL_LABEL] == pool
    assert pool not in ray_custom_resources(head(rayservice))


def test_ray_custom_resources_parsing() -> None:
    group = {"resources": {"drafter_pool": "1", "CPU": "4", "nvidia.com/gpu": "1"}}
    assert ray_custom_resources(group) == {"drafter_pool": 1.0}
    legacy = {"rayStartParams": {"resources": '"{\\"verifier_pool\\": 2}"'}}
    assert ray_custom_resources(legacy) == {"verifier_pool": 2.0}


def test_grpc_servicer_functions_are_importable(serve_config: Json) -> None:
    for path in serve_config["grpc_options"]["grpc_servicer_functions"]:
        module_name, _, attr = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module_name), attr)), path


def test_app_builder_is_importable(app: Json) -> None:
    module_name, _, attr = app["import_path"].partition(":")
    if importlib.util.find_spec(module_name) is None:
        pytest.skip(f"{module_name} does not exist yet")
    assert callable(getattr(importlib.import_module(module_name), attr)), app["import_path"]


def test_ports_line_up(rayservice: Json, serve_config: Json) -> None:
    head_ports = {p["containerPort"] for p in ray_container(head(rayservice))["ports"]}
    http, grpc_port = serve_config["http_options"]["port"], serve_config["grpc_options"]["port"]
    assert {http, grpc_port, 8265} <= head_ports
    service_ports = {p["name"]: p for p in rayservice["spec"]["serveService"]["spec"]["ports"]}
    assert service_ports["http"]["targetPort"] == http
    assert service_ports["grpc"]["targetPort"] == grpc_port


def test_profiles_are_mounted_under_the_cache_dir(rayservice: Json) -> None:
    groups = [head(rayservice), *workers(rayservice).values()]
    for group in groups:
        container = ray_container(group)
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["cast-profiles"] == f"{env['CAST_CACHE_DIR']}/profiles"
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes["cast-profiles"]["configMap"] == {"name": "cast-profiles", "optional": True}


# --- profile jobs ------------------------------------------------------------------------------


def _profile_command(container: Json) -> list[str]:
    """The ``cast profile ...`` command line of a profile Job's container script."""
    script = " ".join(container.get("command", []) + container.get("args", []))
    (line,) = [ln for ln in script.splitlines() if "cast profile" in ln]
    words = shlex.split(line)
    return words[words.index("cast"):]


def test_profile_jobs(rayservice: Json, app: Json) -> None:
    jobs = load_docs(K8S / "profile-job.yaml")
    validator = validator_for({
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "batch/v1"},
            "kind": {"const": "Job"},
            "metadata": {"$ref": "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
            "spec": {"$ref": "#/$defs/io.k8s.api.batch.v1.JobSpec"},
        },
    })
    products = set()
    for job in jobs:
        assert schema_errors(validator, job) == []
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert str(container["resources"]["limits"][GPU]) == "1"
        assert pod["restartPolicy"] == "Never"
        # Profiles are found by (device, target, drafter, dtype): measure the models the app serves.
        command = _profile_command(container)
        options = dict(zip(command[2::2], command[3::2]))
        assert command[:2] == ["cast", "profile"]
        assert options["--target"] == app["args"]["target"] and options["--drafter"] == app["args"]["drafter"]
        products.add(pod["nodeSelector"][GPU_PRODUCT_LABEL])
    used = {g["template"]["spec"]["nodeSelector"][GPU_PRODUCT_LABEL] for g in workers(rayservice).values()}
    assert products == used, "one profile Job per GPU product the RayService uses"
