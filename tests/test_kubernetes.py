"""docker/kubernetes/: the farm's Kubernetes manifests (kustomize base + example overlay), checked
without a cluster.

`kubectl kustomize` renders them (skipped without kubectl, failed in CI); the output validates
offline against the Kubernetes schemas (kubernetes-validate, strict: unknown fields refused) and
KEDA's ScaledObjects against tests/fixtures/keda_scaledobject.schema.json. Then the output is read
against the farm itself, as tests/test_compose.py does for compose: every command is a real
`farm` / `farm-healthcheck` command, every FARM_* variable a real setting and the settings each
container gets are valid, every work queue (farm.sharding.WORK_QUEUES: each GPU family's and
farm.cpu) has one worker Deployment and a ScaledObject on its own queue's demand, secrets come only
from the Secret `farm-secrets`, pods run as the images' user.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from farm.celery_app import CONTROL_QUEUE
from farm.errors import ConfigError
from farm.families import CPU_QUEUE
from farm.settings import PLACEHOLDER_SECRETS, FarmSettings, WorkerSettings, load_settings
from farm.sharding import QUEUES, WORK_QUEUES
from tests.fixtures.deployment import (
    SECRET_NAME,
    check_healthcheck_command,
    parse_env_file,
    resolve_farm_command,
    secret_settings,
    setting_env_vars,
)

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
KUBE = DOCKER / "kubernetes"
BASE = KUBE / "base"
EXAMPLE = KUBE / "overlays" / "example"
SECRETS_EXAMPLE = EXAMPLE / "secrets.env.example"
KEDA_SCHEMA = Path(__file__).parent / "fixtures" / "keda_scaledobject.schema.json"
SECRET = "farm-secrets"  # the Secret every farm container reads, never written in the manifests
CONTROL_IMAGE, WORKER_IMAGE = "patchfarm/control", "patchfarm/worker-cuda"
IMAGE_DOCKERFILES = {CONTROL_IMAGE: "Dockerfile.control", WORKER_IMAGE: "Dockerfile.worker"}
METRIC = "farm_queue_desired_workers"
QUERY = re.compile(rf"^max\({METRIC}\{{queue=\"(?P<queue>[^\"]+)\"\}}\)$")
# The oldest Kubernetes these manifests are checked against, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
PLACEHOLDER_ADDRESS = ".invalid"  # the base's Prometheus address, which an overlay must replace
REAL_SECRET = "0123456789abcdef"  # stands in for each `changeme` when the settings are built


# -- rendering -----------------------------------------------------------------------------------------
def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        message = "kubectl is not installed (it renders the kustomizations: `kubectl kustomize`)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def render(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {path.relative_to(ROOT)}: {out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(BASE)


@pytest.fixture(scope="module")
def example() -> list[dict[str, Any]]:
    return render(EXAMPLE)


@pytest.fixture(scope="module", params=["base", "example"])
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return request.getfixturevalue(request.param)


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Deployments and Jobs by name: their pod specs."""
    return {
        doc["metadata"]["name"]: doc["spec"]["template"]["spec"] for doc in docs if doc["kind"] in ("Deployment", "Job")
    }


def gpu_workers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: doc for name, doc in of_kind(docs, "Deployment").items() if uses_gpu(doc["spec"]["template"]["spec"])}


def queue_workers(docs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The Deployments running `farm worker`, by each queue they consume."""
    consumed: dict[str, list[str]] = {}
    for name, deployment in of_kind(docs, "Deployment").items():
        path, params = resolve_farm_command(argv(deployment["spec"]["template"]["spec"]["containers"][0], docs))
        if path == "worker":
            for queue in params["queues"].split(","):
                consumed.setdefault(queue, []).append(name)
    return consumed


def work_queue_workers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each work queue's one worker Deployment (test_workers_cover_every_queue checks there is one)."""
    consumed = queue_workers(docs)
    deployments = of_kind(docs, "Deployment")
    return {queue: deployments[consumed[queue][0]] for queue in WORK_QUEUES if len(consumed.get(queue, [])) == 1}


def uses_gpu(pod: dict[str, Any]) -> bool:
    return any("nvidia.com/gpu" in (c.get("resources") or {}).get("limits", {}) for c in all_containers(pod))


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def image_name(container: dict[str, Any]) -> str:
    """The image's name without registry-overlay prefix or tag: patchfarm/control."""
    name = container["image"].rsplit(":", 1)[0]
    known = [image for image in IMAGE_DOCKERFILES if name == image or name.endswith(f"/{image}")]
    assert known, f"{container['name']}: {container['image']} is not an image docker/ builds"
    return known[0]


def container_env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """The environment the container gets: its ConfigMaps and the Secret (as secrets.env.example
    holds it, each placeholder replaced by a real-looking secret), then its own `env`."""
    config_maps = {name: doc.get("data", {}) for name, doc in of_kind(docs, "ConfigMap").items()}
    secret = {k: v.replace("changeme", REAL_SECRET) for k, v in parse_env_file(SECRETS_EXAMPLE).items()}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= config_maps[source["configMapRef"]["name"]]
        else:
            assert source["secretRef"]["name"] == SECRET, f"{container['name']}: secrets come from {SECRET}"
            env |= secret
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "configMapKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = config_maps[ref["name"]][ref["key"]]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == SECRET, f"{container['name']}: {item['name']} from {ref['name']}"
            env[item["name"]] = secret[ref["key"]]
    return env


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of `$(VAR)` in command and args (`$$` is a literal `$`); a reference
    to an unset variable is a mistake here (Kubernetes would pass it through as written)."""

    def replace(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        assert m.group(1) in env, f"$({m.group(1)}) is not set in the container"
        return env[m.group(1)]

    return re.sub(r"\$\$|\$\((\w+)\)", replace, arg)


def argv(container: dict[str, Any], docs: list[dict[str, Any]]) -> list[str]:
    """What the container runs: command + args (a bare `args` goes to the image's entrypoint,
    which for the worker image runs them as given)."""
    env = container_env(container, docs)
    return [expand(a, env) for a in [*container.get("command", []), *container.get("args", [])]]


# -- schemas -----------------------------------------------------------------------------------------------
def validate_kubernetes(doc: dict[str, Any]) -> None:
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            name = f"{doc['kind']} {doc['metadata'].get('name')}"
            raise AssertionError(f"{name} (k8s {version}) at {path}: {exc.message}") from None


def validate_scaled_object(doc: dict[str, Any]) -> None:
    schema = json.loads(KEDA_SCHEMA.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, f"ScaledObject {doc['metadata']['name']}: " + "; ".join(
        f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors
    )
    # KEDA hands `advanced.horizontalPodAutoscalerConfig.behavior` to the HPA it makes: check it as one.
    behavior = doc["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": f"keda-hpa-{doc['metadata']['name']}"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                "maxReplicas": max(1, doc["spec"].get("maxReplicaCount", 100)),
                "behavior": behavior,
            },
        }
        validate_kubernetes(hpa)


def test_kustomize_renders_the_base_and_the_example(base, example) -> None:
    kinds = {"ConfigMap", "Service", "PersistentVolumeClaim", "Deployment", "Job", "ScaledObject"}
    assert {doc["kind"] for doc in base} == kinds
    assert {doc["kind"] for doc in example} == kinds | {"Namespace"}
    for doc in base:
        assert "namespace" not in doc["metadata"], f"the base is namespace-less: {doc['kind']} {doc['metadata']}"
    namespace = next(doc for doc in example if doc["kind"] == "Namespace")["metadata"]["name"]
    assert all(doc["metadata"].get("namespace") == namespace for doc in example if doc["kind"] != "Namespace")


def test_manifests_validate_against_the_schemas(rendered) -> None:
    for doc in rendered:
        if doc["kind"] == "ScaledObject":
            validate_scaled_object(doc)
        else:
            validate_kubernetes(doc)


def test_the_validators_refuse_broken_manifests(example) -> None:
    deployment = copy.deepcopy(of_kind(example, "Deployment")["worker-sdxl"])
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 900  # misspelt: ignored by a cluster
    with pytest.raises(AssertionError, match="terminationGracePeriod"):
        validate_kubernetes(deployment)
    scaled = of_kind(example, "ScaledObject")["worker-sdxl"]
    broken = []
    for change in (
        lambda s: s["spec"]["triggers"][0]["metadata"].__setitem__("threshold", 1),  # KEDA wants a string
        lambda s: s["spec"]["scaleTargetRef"].pop("name"),
        lambda s: s["spec"].__setitem__("minReplicas", 0),  # the HPA's word, not KEDA's
        lambda s: s["spec"]["triggers"][0]["metadata"].pop("query"),
        lambda s: s["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"].__setitem__(
            "stabilizationWindowSeconds",
            "10m",  # the HPA wants seconds as an integer
        ),
    ):
        copied = copy.deepcopy(scaled)
        change(copied)
        broken.append(copied)
    for doc in broken:
        with pytest.raises(AssertionError):
            validate_scaled_object(doc)


# -- the farm's commands -------------------------------------------------------------------------------------
def test_every_container_runs_a_real_farm_command(example) -> None:
    paths: dict[str, str] = {}
    for name, pod in workloads(example).items():
        for container in all_containers(pod):
            command = argv(container, example)
            path, _ = resolve_farm_command(command)
            paths[f"{name}/{container['name']}"] = path
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                check = (container.get(probe) or {}).get("exec")
                if check:
                    if check["command"][0] == "farm":
                        resolve_farm_command(check["command"])
                    else:
                        check_healthcheck_command(check["command"])
    assert {"db upgrade", "storage check", "worker", "beat", "flower", "api", "models prefetch"} <= set(paths.values())
    assert paths["migrate/migrate"] == "db upgrade"


def test_the_workloads_are_compose_s_farm_services(example) -> None:
    """The same services as docker/compose.yaml (worker-cpu and the GPU workers included), running
    the same commands on the same queues from the same image, with or without a GPU as there, and
    the same health check where both run a command (compose's model-prefetch is each GPU worker
    pod's init container here)."""
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    farm_services = {name: s for name, s in compose.items() if "build" in s}
    pods = workloads(example)
    assert set(pods) == set(farm_services) - {"model-prefetch"}
    prefetch = resolve_farm_command(farm_services["model-prefetch"]["command"])[0]
    for name, pod in pods.items():
        path, params = resolve_farm_command(argv(pod["containers"][0], example))
        compose_path, compose_params = resolve_farm_command(farm_services[name]["command"])
        assert path == compose_path, f"{name}: `farm {path}` here, `farm {compose_path}` in compose"
        if path == "worker":
            assert params["queues"] == compose_params["queues"], name
            assert params["name"] is None, f"{name}: a fixed --name would be shared by every replica"
        compose_image = farm_services[name]["image"].rsplit("/", 1)[1].split(":")[0]  # ${IMAGE_REPO}/control:...
        assert image_name(pod["containers"][0]) == f"patchfarm/{compose_image}", f"{name}: not compose's image"
        compose_gpu = farm_services[name].get("deploy", {}).get("resources", {}).get("reservations", {})
        assert uses_gpu(pod) == bool(compose_gpu.get("devices")), f"{name}: a GPU here and none in compose, or back"
        probe = (pod["containers"][0].get("readinessProbe") or {}).get("exec")
        if probe:
            assert ["CMD", *probe["command"]] == farm_services[name]["healthcheck"]["test"], f"{name}: {probe}"
        if uses_gpu(pod):
            assert [resolve_farm_command(argv(c, example))[0] for c in pod.get("initContainers", [])] == [prefetch]


def test_workers_cover_every_queue(example) -> None:
    """Every work queue (farm.sharding.WORK_QUEUES) has exactly one worker Deployment, which
    consumes only it: a GPU family's with that family's model pinned, farm.cpu's with none."""
    consumed = queue_workers(example)
    assert consumed.pop(CONTROL_QUEUE, None) == ["scheduler"], "the scheduler alone consumes the control queue"
    assert not set(consumed) - set(WORK_QUEUES), f"consumed but no work queue: {set(consumed) - set(WORK_QUEUES)}"
    for queue in WORK_QUEUES:
        assert len(consumed.get(queue, [])) == 1, f"{queue}: one worker Deployment, not {consumed.get(queue)}"
    workers = work_queue_workers(example)
    families = {queue: family for family, queue in QUEUES.items()}
    for queue, deployment in workers.items():
        name = deployment["metadata"]["name"]
        _, params = resolve_farm_command(argv(deployment["spec"]["template"]["spec"]["containers"][0], example))
        assert params["queues"] == queue, f"{name}: consumes {params['queues']}, only {queue} is its own"
        preloaded = [ref.partition(":")[0] for ref in params["preload"]]
        assert preloaded == ([families[queue]] if queue in families else []), f"{name}: --preload {params['preload']}"
        for ref in params["preload"]:
            assert ref.partition(":")[2].startswith(("/models/", "registry:")), f"{name}: --preload {ref}"
    assert {queue for queue, d in workers.items() if d["metadata"]["name"] in gpu_workers(example)} == set(families)
    assert set(gpu_workers(example)) == {f"worker-{family}" for family in QUEUES}
    assert not uses_gpu(workloads(example)["scheduler"]), "the scheduler needs no GPU"


def test_gpu_workers_take_one_gpu(example) -> None:
    for name, deployment in gpu_workers(example).items():
        pod = deployment["spec"]["template"]["spec"]
        worker = pod["containers"][0]
        assert len(pod["containers"]) == 1 and str(worker["resources"]["limits"]["nvidia.com/gpu"]) == "1", name
        assert image_name(worker) == WORKER_IMAGE
        for init in pod.get("initContainers", []):
            assert "nvidia.com/gpu" not in (init.get("resources") or {}).get("limits", {}), f"{name}: init takes no GPU"


def test_the_cpu_worker_takes_no_gpu_and_bounded_resources(example) -> None:
    deployment = work_queue_workers(example)[CPU_QUEUE]
    name, pod = deployment["metadata"]["name"], deployment["spec"]["template"]["spec"]
    assert not uses_gpu(pod), f"{name}: the post-steps need no GPU"
    assert [image_name(c) for c in all_containers(pod)] == [CONTROL_IMAGE], f"{name}: the control image (no torch)"
    resources = pod["containers"][0]["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{name}: cpu and memory {kind}"


def test_workers_drain_on_sigterm(example) -> None:
    """Every work queue's worker: scaled by its ScaledObject, drained within the grace period,
    ready by `farm-healthcheck worker`, its metrics scraped."""
    workers = work_queue_workers(example)
    assert set(workers) == set(WORK_QUEUES)
    for deployment in workers.values():
        name = deployment["metadata"]["name"]
        assert "replicas" not in deployment["spec"], f"{name}: its ScaledObject owns the replica count"
        pod = deployment["spec"]["template"]["spec"]
        worker = pod["containers"][0]
        env = container_env(worker, example)
        # The drain's bound (worker.drain_timeout_s), where the settings have it: the container's, else the default.
        field = WorkerSettings.model_fields.get("drain_timeout_s")
        drain = env.get("FARM_WORKER__DRAIN_TIMEOUT_S", field.default if field else 0)
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= 300 and grace > float(drain), f"{name}: grace {grace}s must exceed the drain bound {drain}s"
        assert worker["readinessProbe"]["exec"]["command"] == ["farm-healthcheck", "worker"], name
        assert "livenessProbe" not in worker, f"{name}: a liveness probe would restart a worker mid-shard"
        port = int(env["FARM_WORKER__METRICS_PORT"])
        assert env["FARM_WORKER__METRICS_ADDRESS"] == "0.0.0.0" and port in [
            p["containerPort"] for p in worker["ports"]
        ]
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(port)


def test_models_come_from_volumes(example) -> None:
    claims = of_kind(example, "PersistentVolumeClaim")
    for name, deployment in gpu_workers(example).items():
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in all_containers(pod):
            env = container_env(container, example)
            with pytest.MonkeyPatch.context() as m:
                settings = settings_from(env, m)
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            cache = mounts.get(str(settings.model_dir))
            assert cache and not cache.get("readOnly"), f"{name}/{container['name']}: worker.model_dir on a volume"
            claim = volumes[cache["name"]]["persistentVolumeClaim"]["claimName"]
            size = claims[claim]["spec"]["resources"]["requests"]["storage"]
            assert size.endswith("Gi") and settings.worker.model_disk_gb * 1e9 < int(size[:-2]) * 2**30, (
                f"{name}: worker.model_disk_gb {settings.worker.model_disk_gb} does not fit the {claim} volume ({size})"
            )
            if container is pod["containers"][0]:
                models = mounts["/models"]
                assert models.get("readOnly") and volumes[models["name"]]["persistentVolumeClaim"]["readOnly"]
                assert str(settings.face_models_dir).startswith("/models/"), name


# -- settings and secrets ------------------------------------------------------------------------------------
def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> FarmSettings:
    for key in list(os.environ):
        if key.startswith("FARM_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("FARM_"):
            monkeypatch.setenv(key, value)
    return FarmSettings(_env_file=None)


def test_every_farm_variable_is_a_real_setting(example) -> None:
    known = setting_env_vars()
    written: dict[str, set[str]] = {}
    for path in sorted(p for p in KUBE.rglob("*") if p.is_file()):
        for key in re.findall(r"\b(FARM_[A-Z0-9_]+\*?)", path.read_text()):
            written.setdefault(key, set()).add(str(path.relative_to(KUBE)))
    # FARM_STORAGE__S3__* names a section: some setting must start with it
    unknown = {
        k: sorted(v)
        for k, v in written.items()
        if (k not in known if not k.endswith("*") else not any(s.startswith(k[:-1]) for s in known))
    }
    assert not unknown, f"not settings of farm/settings.py: {unknown}"
    settings_map = next(doc for doc in example if doc["metadata"]["name"].startswith("farm-settings"))
    assert set(settings_map["data"]) <= known, "farm-settings holds FARM_* settings only"
    for pod in workloads(example).values():
        for container in all_containers(pod):
            names = {item["name"] for item in container.get("env", [])}
            assert {n for n in names if n.startswith("FARM_")} <= known, container["name"]


def test_the_settings_each_container_gets_are_valid(example, monkeypatch) -> None:
    for name, pod in workloads(example).items():
        for container in all_containers(pod):
            with monkeypatch.context() as m:
                cfg = settings_from(container_env(container, example), m)
            where = f"{name}/{container['name']}"
            assert not cfg.embedded and cfg.storage.backend == "s3", where
            assert cfg.database_url.startswith("postgresql+psycopg://") and cfg.broker.url.startswith("redis://"), where
            if name == "flower":
                assert cfg.flower.user and cfg.flower.password, "flower: basic auth outside the embedded mode"


def test_secrets_come_only_from_the_secret(rendered) -> None:
    secrets = secret_settings()
    assert not [doc for doc in rendered if doc["kind"] == "Secret"], "no Secret object in the manifests"
    for doc in rendered:
        if doc["kind"] == "ConfigMap":
            leaked = {k for k in doc["data"] if k in secrets or SECRET_NAME.search(k)}
            assert not leaked, f"{doc['metadata']['name']}: secrets in a ConfigMap: {leaked}"
    for name, pod in workloads(rendered).items():
        for container in all_containers(pod):
            sources = container.get("envFrom", [])
            assert {"secretRef": {"name": SECRET}} in sources, f"{name}/{container['name']}: envFrom {SECRET}"
            for item in container.get("env", []):
                if item["name"] in secrets or SECRET_NAME.search(item["name"]):
                    ref = (item.get("valueFrom") or {}).get("secretKeyRef")
                    assert ref and ref["name"] == SECRET, f"{name}: {item['name']} only from secretKeyRef {SECRET}"


def test_no_secret_value_is_written_anywhere(rendered) -> None:
    text = yaml.safe_dump_all(rendered)
    sources = {str(p.relative_to(KUBE)): p.read_text() for p in KUBE.rglob("*") if p.is_file()}
    sources.pop(str(SECRETS_EXAMPLE.relative_to(KUBE)))  # the placeholders' own file, never rendered
    for where, body in {"rendered": text, **sources}.items():
        assert not re.search(r"://[^/\s:@$]+:[^@\s$]+@", body), f"{where}: a URL with a password"
        assert not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|AKIA[0-9A-Z]{16}", body), f"{where}: a key"
        assert not re.search(
            r"(?im)^\s*-?\s*[\w.-]*(password|secret|token)[\w.-]*\s*[:=]\s*\S",
            body.replace("secretRef:", "").replace("secretKeyRef:", ""),
        ), f"{where}: a secret-looking value"
    env_example = parse_env_file(DOCKER / "env.example")
    secrets = secret_settings()
    placeholders = {v for k, v in env_example.items() if SECRET_NAME.search(k) or k in secrets} - {""}
    placeholders |= set(parse_env_file(SECRETS_EXAMPLE).values())
    for value in placeholders:
        assert value not in text, f"the example secret {value!r} is written in the manifests"


def test_the_secrets_example_is_complete_and_refused_as_it_is(monkeypatch) -> None:
    example = parse_env_file(SECRETS_EXAMPLE)
    secrets = secret_settings()
    assert set(example) <= secrets, f"not secrets (they belong in settings.env): {set(example) - secrets}"
    assert {"FARM_DB__URL", "FARM_BROKER__URL", "FARM_STORAGE__S3__SECRET_ACCESS_KEY", "FARM_FLOWER__PASSWORD"} <= set(
        example
    )
    for key, value in example.items():
        password = re.match(r"[a-z+]+://[^:/@]*:([^@]*)@", value)
        assert (password.group(1) if password else value) in PLACEHOLDER_SECRETS, f"{key}: a placeholder"
    for key in list(os.environ):
        if key.startswith("FARM_"):
            monkeypatch.delenv(key)
    for key, value in {**parse_env_file(BASE / "settings.env"), **example}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="placeholder secret"):
        load_settings(_env_file=None)
    real = EXAMPLE / "secrets.env"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(real)], cwd=ROOT, capture_output=True)
    assert ignored.returncode == 0, f"{real.relative_to(ROOT)} must be git-ignored"


# -- KEDA ------------------------------------------------------------------------------------------------------
def test_each_work_queue_scales_on_its_own_demand(rendered) -> None:
    scaled = of_kind(rendered, "ScaledObject")
    workers = work_queue_workers(rendered)
    assert set(workers) == set(WORK_QUEUES), "each work queue has its one worker Deployment"
    targets = {d["metadata"]["name"] for d in workers.values()}
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled.values()} == targets
    for queue, deployment in workers.items():
        target = deployment["metadata"]["name"]
        mine = [s for s in scaled.values() if s["spec"]["scaleTargetRef"]["name"] == target]
        assert len(mine) == 1, f"{target}: one ScaledObject"
        spec = mine[0]["spec"]
        assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert spec["minReplicaCount"] == 0, f"{target}: scale to zero"
        assert spec["maxReplicaCount"] >= 1 and spec["cooldownPeriod"] >= 60
        assert spec["fallback"]["behavior"] in ("currentReplicas", "currentReplicasIfHigher"), (
            f"{target}: a lost metric must not remove workers"
        )
        [trigger] = spec["triggers"]
        assert trigger["type"] == "prometheus" and trigger.get("metricType", "AverageValue") == "AverageValue"
        metadata = trigger["metadata"]
        match = QUERY.match(metadata["query"])
        assert match and match.group("queue") == queue, f"{target}: {metadata['query']}"
        assert metadata["threshold"] == "1", f"{target}: one worker per desired worker"
        assert float(metadata.get("activationThreshold", "0")) == 0 and metadata["ignoreNullValues"] == "false"


def test_the_overlay_sets_what_the_base_leaves_open(base, example) -> None:
    for docs, placeholder in ((base, True), (example, False)):
        for scaled in of_kind(docs, "ScaledObject").values():
            address = scaled["spec"]["triggers"][0]["metadata"]["serverAddress"]
            assert (PLACEHOLDER_ADDRESS in address) == placeholder, address
    caps = {name: s["spec"]["maxReplicaCount"] for name, s in of_kind(example, "ScaledObject").items()}
    assert caps != {name: s["spec"]["maxReplicaCount"] for name, s in of_kind(base, "ScaledObject").items()}
    capped = set()  # the ScaledObjects whose maxReplicaCount the overlay sets by name
    for patch in yaml.safe_load((EXAMPLE / "kustomization.yaml").read_text())["patches"]:
        target = patch["target"]
        ops = yaml.safe_load(patch.get("patch", "[]"))
        if (
            target["kind"] == "ScaledObject"
            and "name" in target
            and any(op["path"] == "/spec/maxReplicaCount" for op in ops)
        ):
            capped.add(target["name"])
    assert capped == set(caps), f"the overlay caps every worker Deployment: missing {set(caps) - capped}"
    for claim in of_kind(example, "PersistentVolumeClaim").values():
        assert claim["spec"]["storageClassName"], claim["metadata"]["name"]
        assert set(claim["spec"]["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"}, "shared by pods on many nodes"
    settings = next(doc for doc in example if doc["metadata"]["name"].startswith("farm-settings"))["data"]
    assert settings["FARM_STORAGE__S3__ENDPOINT_URL"].startswith("https://")


def test_a_renamed_deployment_is_followed_by_its_scaled_object(tmp_path) -> None:
    overlay = tmp_path / "renamed"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [os.path.relpath(BASE, overlay)], "namePrefix": "farm-"})
    )
    docs = render(overlay)
    deployments = set(of_kind(docs, "Deployment"))
    targets = {s["spec"]["scaleTargetRef"]["name"] for s in of_kind(docs, "ScaledObject").values()}
    workers = {d["metadata"]["name"] for d in work_queue_workers(docs).values()}
    assert len(workers) == len(WORK_QUEUES) and all(name.startswith("farm-worker-") for name in workers)
    assert targets == workers and targets <= deployments


# -- images and pod security ----------------------------------------------------------------------------------
def image_user(dockerfile: Path) -> int:
    uid = re.search(r"useradd [^\n]*--uid (\d+)", dockerfile.read_text())
    assert uid and re.search(r"^USER farm$", dockerfile.read_text(), re.M), f"{dockerfile.name}: USER farm"
    return int(uid.group(1))


def pods(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from workloads(docs).items()


def test_images_are_the_farm_s_own_with_pinned_tags(base, example) -> None:
    env_example = parse_env_file(DOCKER / "env.example")
    for docs in (base, example):
        for name, pod in pods(docs):
            for container in all_containers(pod):
                image = image_name(container)
                assert (DOCKER / IMAGE_DOCKERFILES[image]).is_file()
                assert image == (WORKER_IMAGE if uses_gpu(pod) else CONTROL_IMAGE), f"{name}: {container['image']}"
                tag = container["image"].rpartition(":")[2]
                assert re.match(r"\d+\.\d+\.\d+$", tag), f"{name}: pin a versioned tag, not {container['image']}"
                if docs is base:
                    assert tag == env_example["IMAGE_TAG"], "the base's tag is compose's default"


def test_pods_run_as_the_images_user_under_the_restricted_standard(example) -> None:
    users = {image: image_user(DOCKER / dockerfile) for image, dockerfile in IMAGE_DOCKERFILES.items()}
    namespace = of_kind(example, "Namespace")
    assert [ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] for ns in namespace.values()] == [
        "restricted"
    ]
    for name, pod in pods(example):
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not {"hostNetwork", "hostPID", "hostIPC"} & {k for k, v in pod.items() if v}, name
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v], f"{name}: no hostPath volumes"
        for container in all_containers(pod):
            own = container.get("securityContext", {})
            assert security.get("runAsUser", own.get("runAsUser")) == users[image_name(container)], name
            assert own["allowPrivilegeEscalation"] is False and own["capabilities"]["drop"] == ["ALL"], name
            assert not own.get("privileged"), name
        assert pod.get("enableServiceLinks") is False, f"{name}: no service variables mixed into the settings"
