"""The deployment files (Dockerfile, docker-compose.yml, examples/kubernetes/) and the scraper
example, checked against what they rely on.

The tests cannot build an image or start a cluster, so each file is checked by construction:
every YAML file parses, every container command that runs ``aiometer-redis`` parses with the
command line's own parser, the host names and ports the workers use are the services the files
define, the target judges with the limits the workers apply, and the Dockerfile copies what the
wheel is built from and starts a real entry point.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib
import io
import json
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from aiometer_redis.testing import RedisServer, max_overlap, window_violations

if sys.version_info >= (3, 11):
    import tomllib
else:
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
KUBERNETES = ROOT / "examples" / "kubernetes"
SCRAPER = ROOT / "examples" / "scraper.py"

IMAGE = "aiometer-demo:latest"
LIMITS = ("max_at_once", "max_per_second", "burst")


def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        data: dict[str, Any] = tomllib.load(file)
    return data


def _cli_arguments(argv: Sequence[object]) -> list[str] | None:
    """The arguments given to the command line if *argv* runs it, else None."""
    words = [str(word) for word in argv]
    if words[:1] == ["aiometer-redis"]:
        return words[1:]
    python = bool(words) and Path(words[0]).name.startswith("python")
    if python and words[1:3] == ["-m", "aiometer_redis"]:
        return words[3:]
    return None


def _parse(arguments: Sequence[str]) -> argparse.Namespace:
    """Parse *arguments* with ``aiometer-redis``'s own parser; fail with its message if refused.

    Options must be spelled in full: an abbreviation that argparse accepts today becomes an
    error the day the command line gains a second option with the same prefix.
    """
    from aiometer_redis._cli import build_parser

    parser = build_parser()
    parsers = [parser]
    for parent in parsers:
        parent.allow_abbrev = False
        for action in parent._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(arguments)
    except SystemExit:
        pytest.fail(f"aiometer-redis refuses {shlex.join(arguments)}:\n{errors.getvalue()}")


def _check_fleet(
    target: argparse.Namespace,
    worker: argparse.Namespace,
    redis_services: Mapping[str, int],
    target_services: Mapping[str, int],
) -> None:
    """Check that *worker* reaches Redis and the target by names and ports that exist, and that
    the target judges with the limits the worker applies.

    Args:
        redis_services, target_services: the host names the deployment defines for Redis and
            for the target, each with the port it answers on.
    """
    assert target.command == worker.command == "demo"
    assert target.role == "target"
    assert target.host == "0.0.0.0", "the target must listen on all interfaces in a container"
    assert worker.role == "worker"
    assert not worker.local, "the fleet must share the Redis limiter"
    redis_url = urlsplit(worker.redis_url)
    assert redis_url.scheme == "redis"
    assert redis_url.hostname in redis_services
    assert (redis_url.port or 6379) == redis_services[redis_url.hostname]
    target_url = urlsplit(worker.target_url)
    assert target_url.scheme == "http"
    assert target_url.hostname in target_services
    assert (target_url.port or 80) == target_services[target_url.hostname]
    assert {k: getattr(target, k) for k in LIMITS} == {k: getattr(worker, k) for k in LIMITS}


# -- pyproject ----------------------------------------------------------------------------------


def test_console_script_is_declared() -> None:
    scripts = _pyproject()["project"]["scripts"]
    assert scripts["aiometer-redis"] == "aiometer_redis._cli:main"
    module, _, function = scripts["aiometer-redis"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_python_m_runs_the_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aiometer_redis", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--redis-url" in result.stdout


# -- Dockerfile and .dockerignore ---------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as ``(KEYWORD, arguments)``, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment and empty lines, also inside a continuation.
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation line"
    return instructions


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, arguments in _dockerfile():
        if keyword == "FROM":
            stages.append([])
        assert stages, "the Dockerfile must start with FROM (after comments)"
        stages[-1].append((keyword, arguments))
    return stages


def _exec_form(arguments: str) -> list[str]:
    words = json.loads(arguments)
    assert isinstance(words, list), f"use the exec (JSON) form: {arguments}"
    return [str(word) for word in words]


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: Sequence[str]) -> bool:
    """Whether .dockerignore keeps *path* (or a directory above it) out of the build context."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("!"):
            continue
        pattern = pattern.strip("/")
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern):
                return True
            if bare != pattern and fnmatch.fnmatchcase(Path(prefix).name, bare):
                return True
    return False


def test_dockerfile_base_image() -> None:
    for stage in _stages():
        image = stage[0][1].split()[0]
        assert image == "python:3.12-slim"


def test_dockerfile_installs_the_project_with_the_demo_extra() -> None:
    assert "demo" in _pyproject()["project"]["optional-dependencies"]
    installs = [
        shlex.split(arguments)
        for keyword, arguments in _dockerfile()
        if keyword == "RUN" and "pip install" in arguments
    ]
    assert any(".[demo]" in words for words in installs), installs


def test_dockerfile_copies_what_the_wheel_is_built_from() -> None:
    pyproject = _pyproject()
    wheel = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {
        "pyproject.toml",
        pyproject["project"]["readme"],
        *wheel["packages"],
        *wheel.get("force-include", {}),
    }
    (builder,) = [
        stage
        for stage in _stages()
        if any(k == "RUN" and ".[demo]" in shlex.split(a) for k, a in stage if "pip" in a)
    ]
    sources: set[str] = set()
    for keyword, arguments in builder:
        if keyword == "COPY" and not arguments.startswith("--"):
            sources.update(word.rstrip("/") for word in arguments.split()[:-1])
    patterns = _dockerignore()
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert not _ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    assert "." in sources or needed <= sources, f"not copied: {sorted(needed - sources)}"


def test_dockerignore_excludes_local_state() -> None:
    patterns = _dockerignore()
    for path in (".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"):
        assert _ignored(path, patterns), path
    assert _ignored("aiometer/__pycache__/x.pyc", patterns)
    assert not _ignored("aiometer/_run.py", patterns)


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    # Numeric, so that Kubernetes can check `runAsNonRoot: true` without reading /etc/passwd.
    users = [arguments for keyword, arguments in _stages()[-1] if keyword == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user.isdigit(), users[-1]
    assert int(user) != 0, users[-1]


def test_dockerfile_starts_a_real_entry_point() -> None:
    final = _stages()[-1]
    entrypoint = [_exec_form(a) for k, a in final if k == "ENTRYPOINT"]
    cmd = [_exec_form(a) for k, a in final if k == "CMD"]
    argv = [*(entrypoint[-1] if entrypoint else []), *(cmd[-1] if cmd else [])]
    arguments = _cli_arguments(argv)
    assert arguments is not None, f"the image runs {argv}, not aiometer-redis"
    if argv[0] == "aiometer-redis":
        assert argv[0] in _pyproject()["project"]["scripts"]
    assert _parse(arguments).command == "demo"


# -- docker-compose.yml -------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _compose_command(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command", [])
    if isinstance(command, str):
        return shlex.split(command)
    return [str(word) for word in command]


def _healthcheck_command(service: Mapping[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return shlex.split(test)
    kind, *rest = (str(word) for word in test)
    return shlex.split(rest[0]) if kind == "CMD-SHELL" else rest


def test_compose_services() -> None:
    assert set(_compose()["services"]) == {
        "redis",
        "target",
        "worker",
        "exporter",
        "prometheus",
        "grafana",
    }


def test_compose_redis_is_healthchecked() -> None:
    redis = _compose()["services"]["redis"]
    assert str(redis["image"]).split(":") == ["redis", "7"]
    assert _healthcheck_command(redis)[:2] == ["redis-cli", "ping"]


def test_compose_workers_are_a_fleet_that_waits_for_its_services() -> None:
    services = _compose()["services"]
    worker = services["worker"]
    assert worker["deploy"]["replicas"] >= 2
    assert "container_name" not in worker, "replicas cannot share one container name"
    assert "ports" not in worker, "replicas cannot share one published port"
    for name in ("target", "worker"):
        build = services[name]["build"]
        assert (build if isinstance(build, str) else build["context"]) == "."
    depends_on = worker["depends_on"]
    assert depends_on["redis"]["condition"] == "service_healthy"
    assert depends_on["target"]["condition"] == "service_healthy"
    assert _healthcheck_command(services["target"])


def test_compose_commands_parse() -> None:
    services = _compose()["services"]
    parsed = {}
    for name, service in services.items():
        for word in _compose_command(service):
            assert "$" not in word, f"{name}: compose would interpolate {word!r}"
        arguments = _cli_arguments(_compose_command(service))
        if arguments is not None:
            parsed[name] = _parse(arguments)
    assert set(parsed) == {"target", "worker", "exporter"}
    _check_fleet(
        parsed["target"],
        parsed["worker"],
        redis_services={"redis": 6379},
        target_services={"target": parsed["target"].port},
    )


# -- Kubernetes -----------------------------------------------------------------------------------


def _manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(KUBERNETES.glob("*.y*ml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                assert isinstance(document, dict), path
                documents.append(document)
    return documents


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [document for document in _manifests() if document["kind"] == kind]


def _containers(workload: Mapping[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    return containers


def _expand(words: Sequence[object], container: Mapping[str, Any], index: int) -> list[str]:
    """Expand ``$(NAME)`` the way the kubelet does, from the variables the container declares;
    the completion index stands for the downward-API value of JOB_COMPLETION_INDEX."""
    values: dict[str, str] = {}
    for variable in container.get("env", []):
        if "value" in variable:
            values[variable["name"]] = str(variable["value"])
        elif variable["valueFrom"].get("fieldRef", {}).get("fieldPath") == (
            "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        ):
            values[variable["name"]] = str(index)

    def substitute(match: re.Match[str]) -> str:
        assert match[1] in values, f"$({match[1]}) is not declared in the container's env"
        return values[match[1]]

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", substitute, str(w)) for w in words]


def test_kubernetes_files_parse() -> None:
    names = {path.name for path in KUBERNETES.iterdir()}
    assert {"README.md", "redis.yaml", "target.yaml", "job.yaml"} <= names
    documents = _manifests()
    for document in documents:
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(document)
        assert document["metadata"]["name"]
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in documents)
    assert kinds == [
        ("Deployment", "exporter"),
        ("Deployment", "redis"),
        ("Deployment", "target"),
        ("Job", "aiometer-worker"),
        ("Service", "exporter"),
        ("Service", "redis"),
        ("Service", "target"),
    ]


def test_kubernetes_job_is_indexed_and_parallel() -> None:
    (job,) = _of_kind("Job")
    assert job["apiVersion"] == "batch/v1"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] > 1
    assert spec["completions"] >= spec["parallelism"]
    assert spec["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")


def test_kubernetes_services_select_their_deployments() -> None:
    deployments = _of_kind("Deployment")
    for deployment in deployments:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in _of_kind("Service"):
        selector = service["spec"]["selector"].items()
        (chosen,) = [
            deployment
            for deployment in deployments
            if selector <= deployment["spec"]["template"]["metadata"]["labels"].items()
        ]
        port_names = {
            port.get("name"): port["containerPort"]
            for container in _containers(chosen)
            for port in container.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            target_port = port.get("targetPort", port["port"])
            assert target_port in port_names or target_port in port_names.values()


def test_kubernetes_pods_run_the_demo_image_as_non_root() -> None:
    workloads = [*_of_kind("Deployment"), *_of_kind("Job")]
    users = 0
    for workload in workloads:
        for container in _containers(workload):
            if container["image"] == IMAGE:
                users += 1
                # The image is loaded into the cluster by hand: pulling it would fail.
                assert container["imagePullPolicy"] in ("IfNotPresent", "Never")
                pod = workload["spec"]["template"]["spec"]
                assert pod["securityContext"]["runAsNonRoot"] is True
    assert users == 3


def test_kubernetes_commands_parse() -> None:
    services = {
        s["metadata"]["name"]: {p.get("name"): p for p in s["spec"]["ports"]}
        for s in _of_kind("Service")
    }
    deployments = {d["metadata"]["name"]: d for d in _of_kind("Deployment")}
    (target_container,) = _containers(deployments["target"])
    target_arguments = _cli_arguments(target_container["command"])
    assert target_arguments is not None
    target = _parse(target_arguments)
    (http,) = services["target"].values()
    assert target_container["ports"][0]["containerPort"] == target.port
    (job,) = _of_kind("Job")
    (worker_container,) = _containers(job)
    for index in (0, job["spec"]["completions"] - 1):
        argv = _expand(
            [*worker_container["command"], *worker_container.get("args", [])],
            worker_container,
            index,
        )
        worker_arguments = _cli_arguments(argv)
        assert worker_arguments is not None
        worker = _parse(worker_arguments)
        assert worker.worker_id == index
        _check_fleet(
            target,
            worker,
            redis_services={"redis": services["redis"]["redis"]["port"]},
            target_services={"target": http["port"]},
        )


# -- examples/scraper.py --------------------------------------------------------------------------


def test_scraper_compiles() -> None:
    compile(SCRAPER.read_text(), str(SCRAPER), "exec")


def test_scraper_help() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRAPER), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for option in ("--redis-url", "--processes", "--max-at-once", "--max-per-second"):
        assert option in result.stdout


@contextlib.contextmanager
def _recording_server(seconds: float) -> Iterator[tuple[str, list[tuple[float, float]]]]:
    """An HTTP server on a free loopback port that answers after *seconds* and records each
    request's (arrival, end) times."""
    served: list[tuple[float, float]] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            arrival = time.monotonic()
            time.sleep(seconds)
            with lock:
                served.append((arrival, time.monotonic()))
            self.send_response(404 if self.path == "/missing" else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.redis
@pytest.mark.slow
def test_scraper_processes_share_the_limits() -> None:
    with RedisServer() as redis, _recording_server(0.05) as (base, served):
        urls = [f"{base}/{n}" for n in range(12)] + [f"{base}/missing"]
        result = subprocess.run(
            [
                sys.executable,
                str(SCRAPER),
                "--redis-url",
                redis.url,
                "--processes",
                "3",
                "--max-at-once",
                "2",
                "--max-per-second",
                "20",
                *urls,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sorted(line.split()[-1] for line in lines) == sorted(urls)
    assert {line.split()[0] for line in lines} == {"[0]", "[1]", "[2]"}
    assert sum(" 200 " in line for line in lines) == 12
    assert sum(" 404 " in line for line in lines) == 1
    assert len(served) == len(urls)
    assert max_overlap(served) <= 2
    arrivals = [arrival for arrival, _ in served]
    assert not window_violations(arrivals, 20, 1, [0.05, 0.25, 0.5])


# -- observability: the exporter, Prometheus and Grafana -----------------------------------------

GRAFANA = ROOT / "examples" / "grafana"


def _exported_names() -> set[str]:
    """Every sample name the library exports: a limiter's in-process metrics and the fleet
    exporter's, made by their own code (no Redis: a lease table and a fleet read stand in)."""
    import anyio
    from prometheus_client import CollectorRegistry

    from aiometer_redis import AcquireTimeoutError, LimiterConfig
    from aiometer_redis._exporter import Fleet, FleetCollector, FleetLimiter
    from aiometer_redis._leases import LeaseTable
    from aiometer_redis._metrics import LimiterMetrics

    registry = CollectorRegistry()
    leases = LeaseTable("x", LimiterConfig(max_at_once=1), None)  # type: ignore[arg-type]
    metrics = LimiterMetrics("x", registry, leases)
    metrics.observe_call("acquire", 0.001, None)

    async def times_out() -> Any:
        raise AcquireTimeoutError("no slot")

    with contextlib.suppress(AcquireTimeoutError):
        anyio.run(metrics.acquire, times_out)

    class Read(FleetCollector):
        def read(self) -> Fleet:
            return Fleet((FleetLimiter("x", 1, 2, 0.5, 3, 1.0, 4, 5.0, 2.5),), False, (), 0.01)

    registry.register(Read(None, None, "aiometer"))  # type: ignore[arg-type]
    return {sample.name for family in registry.collect() for sample in family.samples}


def test_metrics_extra_and_the_image_have_prometheus_client() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    for extra in ("metrics", "demo"):  # the image installs demo, and runs the exporter
        assert any(r.startswith("prometheus_client") for r in extras[extra]), extra
    assert any("metrics" in r for r in extras["dev"] if r.startswith("aiometer["))


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((GRAFANA / "dashboard.json").read_text())
    exported = _exported_names()
    datasource = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = datasource["datasources"]
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len(panels) >= 10
    used: set[str] = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\baiometer_[a-z_]+", target["expr"]))
            assert names, target["expr"]
            assert names <= exported, (panel["title"], names - exported)
            used |= names
    # Every metric family the library exports has a panel.
    families = {re.sub(r"_(bucket|count|sum|total|created)$", "", n) for n in exported}
    shown = {re.sub(r"_(bucket|count|sum|total|created)$", "", n) for n in used}
    assert families <= shown, families - shown
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_compose_observability_is_wired_to_the_exporter() -> None:
    services = _compose()["services"]
    exporter = _parse(_cli_arguments(_compose_command(services["exporter"])) or [])
    assert exporter.command == "exporter"
    assert exporter.host == "0.0.0.0", "Prometheus reaches the exporter over the compose network"
    assert urlsplit(exporter.redis_url).hostname == "redis"
    assert services["exporter"]["depends_on"]["redis"]["condition"] == "service_healthy"
    health = " ".join(_healthcheck_command(services["exporter"]))
    assert f"('127.0.0.1', {exporter.port})" in health
    # Prometheus reads the mounted config, which scrapes the exporter's service and port.
    mounts = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source, target, *_ = volume.split(":")
            assert (ROOT / source).exists(), volume
            mounts[target] = ROOT / source
    config_path = next(
        word.split("=", 1)[1]
        for word in _compose_command(services["prometheus"])
        if word.startswith("--config.file=")
    )
    config = yaml.safe_load(mounts[config_path].read_text())
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert f"exporter:{exporter.port}" in targets
    # Grafana provisions the data source and the dashboard from the mounted files.
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert urlsplit(source["url"]).hostname == "prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "aiometer.yml").read_text())[
        "providers"
    ]
    dashboards = [t for t in mounts if t.startswith(provider["options"]["path"] + "/")]
    assert [mounts[t].name for t in dashboards] == ["dashboard.json"]
    # Published on the host's loopback only.
    for name in ("prometheus", "grafana"):
        for port in services[name]["ports"]:
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert "ports" not in services["exporter"]


def test_kubernetes_exporter_reads_the_fleet_redis() -> None:
    services = {s["metadata"]["name"]: s for s in _of_kind("Service")}
    deployments = {d["metadata"]["name"]: d for d in _of_kind("Deployment")}
    (container,) = _containers(deployments["exporter"])
    arguments = _cli_arguments(container["command"])
    assert arguments is not None
    exporter = _parse(arguments)
    assert exporter.command == "exporter"
    assert exporter.host == "0.0.0.0"
    redis_url = urlsplit(exporter.redis_url)
    redis_ports = {p["name"]: p["port"] for p in services["redis"]["spec"]["ports"]}
    assert redis_url.hostname == "redis"
    assert (redis_url.port or 6379) == redis_ports["redis"]
    (port,) = container["ports"]
    assert port["containerPort"] == exporter.port
    assert container["readinessProbe"]["tcpSocket"]["port"] == port["name"]
    annotations = deployments["exporter"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(exporter.port)
    (service_port,) = services["exporter"]["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
