"""docker/: the images and the compose file of a real deployment, checked without a Docker engine.

The compose file is read the way Compose reads it (YAML anchors and merge keys, `${VAR}`
interpolation from docker/env.example) and checked against the farm itself: every command is a
real `farm` command with real options, every FARM_* variable is a real setting, every service has
a health check, GPU workers reserve NVIDIA GPUs, secrets live only in the env file. When a Docker
Compose v2 CLI is installed (`docker compose` or `docker-compose`; neither needs a daemon for
`config`), it validates the file too; without one the structural checks below stand in for it.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from farm.celery_app import CONTROL_QUEUE, GPU_QUEUES
from farm.errors import ConfigError
from farm.families import CPU_QUEUE
from farm.settings import PLACEHOLDER_SECRETS, FarmSettings, load_settings
from farm.sharding import QUEUES
from tests.fixtures.deployment import (
    SECRET_NAME,
    check_healthcheck_command,
    parse_env_file,
    resolve_farm_command,
    secret_settings,
)
from tests.fixtures.deployment import setting_env_vars as setting_env_vars_of_the_farm

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / "env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))

COMPOSE_SERVICE_KEYS = (  # the service keys of the Compose specification
    "annotations attach blkio_config build cap_add cap_drop cgroup cgroup_parent command configs "
    "container_name cpu_count cpu_percent cpu_period cpu_quota cpu_rt_period cpu_rt_runtime cpu_shares cpus "
    "cpuset credential_spec depends_on deploy develop device_cgroup_rules devices dns dns_opt dns_search "
    "domainname entrypoint env_file environment expose extends external_links extra_hosts gpus group_add "
    "healthcheck hostname image init ipc isolation labels links logging mac_address mem_limit "
    "mem_reservation mem_swappiness memswap_limit network_mode networks oom_kill_disable oom_score_adj pid "
    "pids_limit platform ports post_start pre_stop privileged profiles pull_policy read_only restart runtime "
    "scale secrets security_opt shm_size stdin_open stop_grace_period stop_signal storage_opt sysctls tmpfs "
    "tty ulimits user userns_mode uts volumes volumes_from working_dir"
)
SERVICE_KEYS = frozenset(COMPOSE_SERVICE_KEYS.split())
TOP_LEVEL_KEYS = frozenset({"name", "services", "volumes", "networks", "configs", "secrets", "include", "version"})
HEALTHCHECK_KEYS = frozenset({"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"})
DEVICE_KEYS = frozenset({"driver", "count", "device_ids", "capabilities", "options"})
CONDITIONS = frozenset({"service_started", "service_healthy", "service_completed_successfully"})
BARE_REFERENCE = re.compile(r"\$\{\w+(:?\?[^}]*)?\}")  # ${VAR} or ${VAR:?message}: no default value
INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


# -- reading the files as Compose does ---------------------------------------------------------------
def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err},
    ${VAR?err}, $VAR; `$$` is a literal `$`."""

    def replace(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        value = env.get(name)
        empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-") and empty:
            return arg
        if op in (":?", "?") and empty:
            raise AssertionError(f"compose needs {name}: {arg}")
        return value or ""

    return INTERPOLATION.sub(replace, text)


def referenced_variables(text: str) -> set[str]:
    return {m.group(1) or m.group(4) for m in INTERPOLATION.finditer(text) if m.group(0) != "$$"}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def as_list(command: Any) -> list[str]:
    return command if isinstance(command, list) else command.split()


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """compose.yaml before interpolation (what is written in the file)."""
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(env_example: dict[str, str]) -> dict[str, Any]:
    """compose.yaml as Compose sees it with docker/.env copied from env.example."""
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env_example))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def farm_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services that run the farm's own images (built from docker/Dockerfile.*)."""
    return {name: s for name, s in services.items() if "build" in s}


def gpu_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in farm_services(services).items() if s["build"]["dockerfile"].endswith(".worker")}


@pytest.fixture(scope="module")
def setting_env_vars() -> set[str]:
    return setting_env_vars_of_the_farm()


# -- the farm CLI ------------------------------------------------------------------------------------
def test_the_resolver_refuses_what_the_cli_refuses() -> None:
    assert resolve_farm_command(["farm", "db", "upgrade"]) == ("db upgrade", {"revision": "head"})
    assert resolve_farm_command(["farm", "worker", "--queues", "farm.control"])[1]["queues"] == "farm.control"
    for bad in (
        ["farm", "wrker"],
        ["farm", "db"],
        ["farm", "worker", "--queue", "x"],
        ["farm", "flower", "--port", "0"],
    ):
        with pytest.raises(AssertionError):
            resolve_farm_command(bad)


def test_every_farm_service_runs_a_real_farm_command(services) -> None:
    farm = farm_services(services)
    assert farm, "no service builds a farm image"
    commands = {}
    for name, service in farm.items():
        assert "command" in service, f"{name}: no command"
        commands[name] = resolve_farm_command(as_list(service["command"]))
        test = service["healthcheck"]["test"]
        if test[0] == "CMD" and test[1] == "farm":
            resolve_farm_command(test[1:])
    paths = {path for path, _ in commands.values()}
    assert {"db upgrade", "worker", "beat", "flower", "storage check"} <= paths
    assert commands["migrate"][0] == "db upgrade"


def test_workers_cover_every_queue(services) -> None:
    consumed: dict[str, list[str]] = {}
    for name, service in farm_services(services).items():
        path, params = resolve_farm_command(as_list(service["command"]))
        if path != "worker":
            continue
        assert params["queues"], f"{name}: name the queues (the default mixes control and GPU queues)"
        queues = params["queues"].split(",")
        assert set(queues) <= {CONTROL_QUEUE, CPU_QUEUE, *GPU_QUEUES}, f"{name}: unknown queue in {queues}"
        assert params["name"] is None, f"{name}: a fixed --name would be shared by every replica"
        for queue in queues:
            consumed.setdefault(queue, []).append(name)
        for ref in params["preload"]:
            family, _, model = ref.partition(":")
            assert family in QUEUES and model.startswith("/models/"), f"{name}: --preload {ref}"
            assert queues == [QUEUES[family]], f"{name}: preloads {family} but consumes {queues}"
    assert set(consumed) == {CONTROL_QUEUE, CPU_QUEUE, *GPU_QUEUES}, f"queues without a worker: {consumed}"
    assert consumed[CONTROL_QUEUE] == ["scheduler"]
    assert consumed[CPU_QUEUE] == ["worker-cpu"] and "worker-cpu" not in gpu_services(services)
    assert services["worker-cpu"]["build"]["dockerfile"].endswith(".control"), "the post-steps need no torch"
    assert services["worker-cpu"]["healthcheck"]["test"][1:] == ["farm-healthcheck", "worker"]
    gpu = gpu_services(services)
    for family, queue in QUEUES.items():
        assert consumed[queue] == [f"worker-{family}"] and f"worker-{family}" in gpu
    for name in consumed[CONTROL_QUEUE]:
        assert name not in gpu, "the scheduler needs no GPU"


# -- settings and secrets -------------------------------------------------------------------------------
def farm_variables_written(raw: dict[str, Any]) -> dict[str, set[str]]:
    """Every FARM_* name written anywhere in docker/ (and where), commented lines included."""
    found: dict[str, set[str]] = {}
    for name, service in raw["services"].items():
        for key in environment(service):
            found.setdefault(key, set()).add(f"compose.yaml {name}")
    for key in referenced_variables(COMPOSE.read_text()):
        found.setdefault(key, set()).add("compose.yaml ${...}")
    texts = {ENV_EXAMPLE.name: ENV_EXAMPLE.read_text()} | {p.name: p.read_text() for p in DOCKERFILES}
    texts |= {p.name: p.read_text() for p in DOCKER.glob("**/*.sh")}
    for where, text in texts.items():
        for key in re.findall(r"\b(FARM_[A-Z0-9_]+)", text):
            found.setdefault(key, set()).add(where)
    return {k: v for k, v in found.items() if k.startswith("FARM_")}


def test_every_farm_variable_is_a_real_setting(raw, setting_env_vars) -> None:
    written = farm_variables_written(raw)
    unknown = {k: sorted(v) for k, v in written.items() if k not in setting_env_vars}
    assert not unknown, f"not settings of farm/settings.py: {unknown}"
    for key in ("FARM_DB__URL", "FARM_BROKER__URL", "FARM_STORAGE__BACKEND", "FARM_STORAGE__S3__SECRET_ACCESS_KEY"):
        assert key in written


def test_the_settings_each_service_gets_are_valid(services, env_example, monkeypatch) -> None:
    for key in list(os.environ):
        if key.startswith("FARM_"):
            monkeypatch.delenv(key)
    real = {k: ("0123456789abcdef" if v == "changeme" else v) for k, v in env_example.items()}
    real = {k: v.replace(":changeme@", ":0123456789abcdef@") for k, v in real.items()}
    for name, service in farm_services(services).items():
        assert service.get("env_file") in (".env", [".env"]), f"{name}: settings come from env_file: .env"
        values = {k: v for k, v in {**real, **environment(service)}.items() if k.startswith("FARM_")}
        with monkeypatch.context() as m:
            for key, value in values.items():
                m.setenv(key, value)
            cfg = FarmSettings(_env_file=None)
        assert not cfg.embedded and cfg.storage.backend == "s3", name
        assert cfg.database_url.startswith("postgresql+psycopg://") and cfg.broker.url.startswith("redis://")
        if name in gpu_services(services):
            assert cfg.worker.metrics_port and cfg.worker.metrics_address == "0.0.0.0", f"{name}: metrics scrapeable"
        if name == "flower":
            assert cfg.flower.address == "0.0.0.0" and cfg.flower.user and cfg.flower.password


def test_env_example_placeholders_are_refused(env_example, monkeypatch) -> None:
    """An unedited copy of env.example must not start: its secrets are the placeholders the farm
    refuses outside the embedded mode."""
    for key in list(os.environ):
        if key.startswith("FARM_"):
            monkeypatch.delenv(key)
    for key, value in env_example.items():
        if key.startswith("FARM_"):
            monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="placeholder secret"):
        load_settings(_env_file=None)


def test_no_secret_is_written_in_compose_yaml(raw, env_example) -> None:
    secrets = secret_settings()
    assert {"FARM_FLOWER__PASSWORD", "FARM_STORAGE__S3__SECRET_ACCESS_KEY"} <= secrets
    for name, service in raw["services"].items():
        for key, value in environment(service).items():
            assert key not in secrets, f"{name}: {key} belongs in docker/.env (env_file), not in compose.yaml"
            if SECRET_NAME.search(key):
                assert BARE_REFERENCE.fullmatch(value), (
                    f"{name}: {key} must be ${{VAR}} from docker/.env, not {value!r}"
                )
    text = yaml.safe_dump(raw)  # every value written in compose.yaml, comments left out
    assert not re.search(r"://[^/\s:@$]+:[^@\s$]+@", text), "a URL with a password in compose.yaml"
    placeholders = {v for k, v in env_example.items() if SECRET_NAME.search(k) or k in secrets} - {""}
    for value in placeholders:
        assert value not in text, f"the env.example value {value!r} is written in compose.yaml"


def test_env_example_lists_every_variable_with_placeholder_secrets(env_example) -> None:
    referenced = referenced_variables(COMPOSE.read_text())
    missing = referenced - set(env_example)
    assert not missing, f"compose.yaml uses variables env.example does not list: {sorted(missing)}"
    secrets = secret_settings()
    for key, value in env_example.items():
        if key in secrets and "://" in value:
            password = re.match(r"[a-z+]+://[^:/@]*:([^@]*)@", value)
            assert password and password.group(1) in PLACEHOLDER_SECRETS, f"{key}: a placeholder password"
        elif key in secrets or SECRET_NAME.search(key):
            assert value in PLACEHOLDER_SECRETS, f"{key}={value!r} is not a placeholder the farm refuses"
    gitignore = (DOCKER / ".gitignore").read_text().split()
    assert ".env" in gitignore, "docker/.env must be git-ignored"


# -- structure -------------------------------------------------------------------------------------------
def test_compose_structure(compose, services) -> None:
    assert set(compose) <= TOP_LEVEL_KEYS | {k for k in compose if k.startswith("x-")}
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        unknown = set(service) - SERVICE_KEYS
        assert not unknown, f"{name}: not Compose service keys: {unknown}"
        assert "image" in service, f"{name}: every service names its image"
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services and dep != name, f"{name}: depends on unknown service {dep}"
            assert spec["condition"] in CONDITIONS
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(("/", ".", "~")):
                assert source in declared_volumes, f"{name}: named volume {source} is not declared"
        for port in service.get("ports", []):
            assert re.fullmatch(r"[\d.]+:\d+:\d+", str(port)), f"{name}: publish ports on an address: {port}"
    used = {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])}
    assert declared_volumes <= used, f"declared but unused volumes: {declared_volumes - used}"
    for volume in ("postgres-data", "redis-data", "seaweedfs-data", "rabbitmq-data"):
        assert volume in declared_volumes, "server data lives in named volumes"


def test_every_service_has_a_health_check(services) -> None:
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and not check.get("disable") and check.get("test"), f"{name}: no health check"
        assert set(check) <= HEALTHCHECK_KEYS
        test = check["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: {test}"
        if test[1] == "farm-healthcheck":
            check_healthcheck_command(test[1:])
    expectations = {
        "postgres": "pg_isready",
        "redis": "redis-cli ping",
        "rabbitmq": "rabbitmq-diagnostics",
        "seaweedfs": ":8333/healthz",
        "flower": "/healthcheck",
        "scheduler": "farm-healthcheck worker",
    }
    for name, needle in expectations.items():
        assert needle in " ".join(services[name]["healthcheck"]["test"][1:]), f"{name}: {needle}"
    for name in gpu_services(services):
        assert services[name]["healthcheck"]["test"][1:] == ["farm-healthcheck", "worker"]


def test_rabbitmq_is_a_profile_with_a_raised_consumer_timeout(services) -> None:
    rabbit = services["rabbitmq"]
    assert rabbit["profiles"] == ["rabbitmq"]
    conf = next(v for v in rabbit["volumes"] if "/etc/rabbitmq/" in v)
    source, target, mode = conf.split(":")
    assert mode == "ro" and target.startswith("/etc/rabbitmq/conf.d/")
    timeout = re.search(r"^consumer_timeout\s*=\s*(\d+)", (DOCKER / source).read_text(), re.M)
    assert timeout and int(timeout.group(1)) >= 4 * 3600 * 1000, "consumer_timeout above a 4 h shard"


def test_gpu_workers_reserve_an_nvidia_gpu_each(services) -> None:
    gpu = gpu_services(services)
    assert set(gpu) == {f"worker-{family}" for family in QUEUES}
    for name, service in gpu.items():
        deploy = service["deploy"]
        assert isinstance(deploy["replicas"], int) and deploy["replicas"] >= 1
        devices = deploy["resources"]["reservations"]["devices"]
        nvidia = [d for d in devices if d.get("driver") == "nvidia"]
        assert nvidia and "gpu" in nvidia[0]["capabilities"], f"{name}: reserve an nvidia GPU"
        assert set(nvidia[0]) <= DEVICE_KEYS and ("count" in nvidia[0]) != ("device_ids" in nvidia[0])
        env = environment(service)
        lock_dir = env["GPU_LOCK_DIR"]
        assert any(v.endswith(f":{lock_dir}") for v in service["volumes"]), f"{name}: GPU locks on a shared volume"
        models = [v for v in service["volumes"] if ":/models" in v]
        assert models and models[0].endswith(":/models:ro"), f"{name}: models mounted read-only"
        assert str(env["FARM_WORKER__METRICS_PORT"]) in [str(p) for p in service.get("expose", [])]
    for name, service in farm_services(services).items():
        if name not in gpu:
            assert "deploy" not in service, f"{name}: only GPU workers reserve GPUs"


def test_images_come_from_docker_dockerfiles_or_pinned_tags(services) -> None:
    built = set()
    for name, service in services.items():
        if "build" in service:
            assert Path(service["build"]["context"]) == Path(".."), f"{name}: build from the repository root"
            dockerfile = ROOT / service["build"]["dockerfile"]
            assert dockerfile.parent == DOCKER and dockerfile.is_file(), f"{name}: {dockerfile} missing"
            built.add(dockerfile)
        else:
            image = service["image"]
            tag = image.rpartition(":")[2] if ":" in image.split("/")[-1] else ""
            assert re.match(r"\d", tag), f"{name}: pin a versioned tag, not {image!r}"
    assert built == set(DOCKERFILES), "every Dockerfile in docker/ is built by a service"


# -- Dockerfiles and the build context -------------------------------------------------------------------
def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in dockerfile.read_text().splitlines() if not line.startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def args_defaults(steps: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)


def pip_installs(steps: list[tuple[str, str]]) -> list[tuple[int, str]]:
    return [
        (i, cmd) for i, (kind, a) in enumerate(steps) if kind == "RUN" for cmd in a.split("&&") if "pip install" in cmd
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_layers_and_user(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    defaults = args_defaults(steps)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], a.split()[0]) for k, a in steps if k == "FROM"]
    for base in bases:
        assert re.search(r":\d+\.\d+\.\d+", base), f"pin the base image's full version: {base}"
    users = [a.strip() for k, a in steps if k == "USER"]
    assert users and users[-1] not in ("root", "0"), "run as a non-root USER"
    installs = pip_installs(steps)
    assert installs and all("--no-cache-dir" in cmd for _, cmd in installs), "pip install --no-cache-dir"
    project = [i for i, cmd in installs if "--no-deps /src" in cmd]
    deps = [i for i, cmd in installs if "-r /tmp/requirements.txt" in cmd and "-c /build/constraints.txt" in cmd]
    assert len(project) == 1 and deps and max(deps) < project[0], "dependencies (pinned) before the source"
    assert not [k for k, a in steps if k in ("COPY", "ADD") and re.search(r"\b(farm|tasks|storage|patching)/?\s", a)]
    for kind, arguments in steps:
        if kind == "RUN" and "apt-get install" in arguments:
            assert "--no-install-recommends" in arguments and "rm -rf /var/lib/apt/lists" in arguments


def test_worker_image_installs_cuda_torch_first() -> None:
    steps = instructions(DOCKER / "Dockerfile.worker")
    defaults = args_defaults(steps)
    installs = pip_installs(steps)
    torch = [i for i, cmd in installs if "torch==" in cmd]
    project = [i for i, cmd in installs if "/src" in cmd or "requirements.txt" in cmd]
    assert torch and project and torch[0] < min(project), "torch first, then the extras and the project"
    assert "--index-url" in installs[0][1] and defaults["TORCH_INDEX_URL"].startswith(
        "https://download.pytorch.org/whl/cu"
    )
    assert re.fullmatch(r"2\.\d+\.\d+", defaults["TORCH_VERSION"])
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-", defaults["CUDA_IMAGE"])
    assert cuda, "a CUDA runtime + cuDNN base image"
    assert defaults["TORCH_INDEX_URL"].endswith(f"/cu{cuda.group(1)}{cuda.group(2)}"), "torch for the base's CUDA"
    text = (DOCKER / "Dockerfile.worker").read_text()
    assert "requirements.py /build/pyproject.toml gpu" in text and "pip uninstall -y onnxruntime" in text
    assert "cuda_check.py" in text and "ENTRYPOINT" in text


def test_control_image_has_no_torch() -> None:
    steps = " ".join(arguments for _, arguments in instructions(DOCKER / "Dockerfile.control"))
    assert "requirements.py /build/pyproject.toml monitor" in steps
    assert not re.search(r"pip install[^&]*torch", steps) and "cuda" not in steps.lower()


def dockerignore_includes(path: str, patterns: list[str]) -> bool:
    """Whether the build context keeps `path` (moby's rules: the last matching pattern wins, a
    pattern matching a parent folder matches everything in it, `**` spans folders)."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        for token in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
            out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        return re.compile(out)

    keep = True
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        if any(regex(pattern.lstrip("!")).fullmatch(p) for p in prefixes):
            keep = negate
    return keep


def test_dockerignore_keeps_the_build_inputs_only() -> None:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    used = ["pyproject.toml", "README.md", "farm/cli/__init__.py", "tasks/__init__.py", "storage/db.py",
            "patching/__init__.py", "migrations/env.py"]  # fmt: skip
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        used += re.findall(r"source=(docker/[\w./-]+)", text) + re.findall(r"COPY (?:--\S+ )*(docker/\S+)", text)
    for path in used:
        assert (ROOT / path).exists(), f"{path} is used by a Dockerfile but missing"
        assert dockerignore_includes(path, patterns), f".dockerignore drops {path}, which a Dockerfile needs"
    for path in (".venv/bin/python", "farm-data/farm.db", ".git/HEAD", "docker/.env", "tests/test_cli.py",
                 "bench/results.json", "docs/flower.png", "farm/__pycache__/x.pyc", ".pytest_cache/v"):  # fmt: skip
        assert not dockerignore_includes(path, patterns), f".dockerignore keeps {path}"
    for name in (".venv", "farm-data", ".git"):
        assert name in patterns, f"name {name} in .dockerignore"


# -- the scripts inside the images -------------------------------------------------------------------------
def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"docker_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_requirements_script_reads_the_extras() -> None:
    requirements = load(DOCKER / "requirements.py").requirements
    gpu = requirements(ROOT / "pyproject.toml", ["gpu"])
    names = {re.split(r"[<>=\[ ;]", r)[0] for r in gpu}
    assert {"torch", "onnxruntime-gpu", "celery", "sqlalchemy"} <= names and "onnxruntime" not in names
    control = {re.split(r"[<>=\[ ;]", r)[0] for r in requirements(ROOT / "pyproject.toml", ["monitor"])}
    assert "flower" in control and not control & {"torch", "diffusers", "onnxruntime", "onnxruntime-gpu"}
    with pytest.raises(SystemExit, match="unknown extra"):
        requirements(ROOT / "pyproject.toml", ["cuda"])


def test_constraints_pin_exact_versions() -> None:
    text = (DOCKER / "constraints.txt").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.+]+", line) for line in lines)
    pins = dict(line.split("==") for line in lines)
    assert "torch" not in {k.lower() for k in pins}, "torch is pinned by TORCH_VERSION, from the CUDA index"
    assert {"onnxruntime-gpu", "diffusers", "celery", "flower", "insightface"} <= set(pins)


def test_cuda_check_reads_what_a_library_links() -> None:
    cuda_check = load(DOCKER / "cuda_check.py")
    assert "libc.so.6" in cuda_check.needed(Path(os.path.realpath("/bin/sh")))
    assert cuda_check.problems("13.0.1", "13.0", ["CUDAExecutionProvider"], []) == []
    found = cuda_check.problems("13.0.1", "12.8", ["CPUExecutionProvider"], [])
    assert len(found) == 2 and "CUDA 12.8" in found[0]
    assert "CPU build" in cuda_check.problems("13.0.1", None, ["CUDAExecutionProvider"], [])[0]


def test_gpu_entrypoint_gives_each_worker_its_own_gpu(tmp_path: Path) -> None:
    assert shutil.which("flock"), "flock (util-linux) is needed by docker/gpu-entrypoint.sh"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nprintf 'GPU-aaa\\nGPU-bbb\\n'\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "GPU_LOCK_DIR": str(tmp_path / "locks")}
    show = 'echo "$CUDA_VISIBLE_DEVICES"'

    def start(command: str, **extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["sh", str(DOCKER / "gpu-entrypoint.sh"), "sh", "-c", command],
            env={**env, **extra},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    holders = [start(f"{show}; read _") for _ in range(2)]  # two workers, alive until stdin ends
    try:
        assert sorted(p.stdout.readline().strip() for p in holders) == ["GPU-aaa", "GPU-bbb"]  # type: ignore[union-attr]
        third = start(show)
        out, err = third.communicate(timeout=10)
        assert third.returncode == 1 and not out and "already run a farm worker" in err
    finally:
        for p in holders:
            p.communicate("\n", timeout=10)
    assert start(show).communicate(timeout=10)[0].strip() == "GPU-aaa"  # the locks ended with their holders
    assert start(show, CUDA_VISIBLE_DEVICES="1").communicate(timeout=10)[0].strip() == "1"  # pinned by hand


@pytest.fixture
def healthcheck() -> ModuleType:
    return load(DOCKER / "healthcheck.py")


@pytest.fixture
def http_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthcheck" else 503)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_healthcheck_http_and_usage(healthcheck, http_server, capsys) -> None:
    assert healthcheck.main(["http", f"{http_server}/healthcheck"]) == 0
    assert healthcheck.main(["http", f"{http_server}/other"]) == 1
    assert healthcheck.main(["http", "file:///etc/passwd"]) == 1
    assert healthcheck.main(["nothing"]) == 2
    assert healthcheck.local_address("0.0.0.0") == "127.0.0.1" and healthcheck.local_address("10.0.0.5") == "10.0.0.5"
    assert "unhealthy" in capsys.readouterr().out


def test_healthcheck_finds_this_containers_worker(healthcheck, tmp_path, monkeypatch) -> None:
    from storage import migrate
    from storage.db import make_engine, make_session_factory, session_scope
    from storage.registry import register_worker, stop_worker

    for key in list(os.environ):
        if key.startswith("FARM_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'farm.db'}"
    monkeypatch.setenv("FARM_DB__URL", url)
    migrate.upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    assert healthcheck.main(["worker"]) == 1  # nobody registered
    with session_scope(sessions) as session:
        register_worker(session, name="elsewhere-1", hostname="another-host", queues=["farm.control"], device="none")
    assert healthcheck.main(["worker"]) == 1
    with session_scope(sessions) as session:
        register_worker(session, name="me-1", hostname=socket.gethostname(), queues=["farm.control"], device="none")
    assert healthcheck.main(["worker"]) == 0
    with session_scope(sessions) as session:
        stop_worker(session, "me-1")
    assert healthcheck.main(["worker"]) == 1
    engine.dispose()
    rows = [
        {"hostname": "h", "status": "lost", "silent_s": 1.0, "name": "a"},
        {"hostname": "h", "status": "online", "silent_s": 9.0, "name": "b"},
        {"hostname": "h", "status": "online", "silent_s": 2.0, "name": "c"},
    ]
    assert healthcheck.pick_worker(rows, "h")["name"] == "c" and healthcheck.pick_worker(rows, "x") is None


# -- Docker Compose itself, where installed ------------------------------------------------------------------
def compose_cli() -> list[str] | None:
    """A Docker Compose v2 CLI (`docker compose` or a standalone `docker-compose`), or None."""
    for cli in (["docker", "compose"], ["docker-compose"]):
        if not shutil.which(cli[0]):
            continue
        try:
            out = subprocess.run([*cli, "version"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and re.search(r"\bv?2\.\d+", out.stdout):
            return cli
    return None


def test_compose_config_accepts_the_file(tmp_path: Path, services) -> None:
    """`docker compose config` (no daemon needed) resolves the file with env.example as docker/.env.
    Without a Compose CLI the structural tests above are the check; this one then only makes sure
    the copy it would validate is complete."""
    project = tmp_path / "docker"
    shutil.copytree(DOCKER, project, ignore=shutil.ignore_patterns(".env", "models", "__pycache__"))
    shutil.copy(ENV_EXAMPLE, project / ".env")
    for service in services.values():
        for volume in service.get("volumes", []):
            if volume.startswith("./"):
                assert (project / volume.split(":")[0]).is_file(), f"{volume}: mounted file missing from docker/"
    cli = compose_cli()
    if cli is None:
        return
    keep = ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CONFIG", "XDG_RUNTIME_DIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    out = subprocess.run(
        [*cli, "-f", str(project / "compose.yaml"), "--profile", "rabbitmq", "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    resolved = json.loads(out.stdout)
    assert set(resolved["services"]) == set(services)
    for name, service in gpu_services(services).items():
        devices = resolved["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia", name
        assert resolved["services"][name]["command"] == as_list(service["command"])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
