"""Deployment: the image, the pod entrypoint, the Kubernetes manifests, migrations, the dashboard.

There is no Docker engine and no Kubernetes cluster here, so: the Dockerfile is read with
BuildKit's own parser (the ``dockerfile`` package), the manifests are validated against the
Kubernetes schemas that ``kubernetes-validate`` ships, and the StatefulSet's pods are run for
real as local processes. Each ``python -m deploy.entrypoint`` gets the environment its pod would
get (rendered from the manifests: literal env, downward API, ConfigMap, Secret) and finds its
peers under their in-cluster DNS names (``tallyflow-1.tallyflow.tallyflow.svc.cluster.local``)
through a private ``/etc/hosts``, bind-mounted in a mount namespace of its own: nothing on the
machine changes, nothing leaks if the test dies, and the entrypoint has no test-only code path.
Pod *k* gets loopback address ``127.0.1.(k+1)``, so all pods use one worker port, as in a cluster
(and none shares 127.0.0.1, where every other local test server listens).
The ClickHouse cluster DDL is only parsed here (chdb has no cluster and no Keeper).
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dockerfile
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from dataflows.settings import Settings
from deploy import cli
from deploy.broker import ensure_topic, free_port
from deploy.entrypoint import (
    EntrypointError,
    bytewax_argv,
    parse_pod_name,
    plan_from_env,
    prepare_recovery_store,
)
from deploy.generator import generate, produce
from deploy.healthcheck import check_process
from deploy.runner import REPO_ROOT
from recovery.reconcile import diff, recompute
from sinks.clickhouse_backend import connect, quote_string
from sinks.cluster_schema import LOCAL_SUFFIX, cluster_ddl, sharding_columns
from sinks.schema import (
    TABLES,
    USAGE_AGGREGATES,
    USAGE_AGGREGATES_COLUMNS,
    USAGE_LATE_EVENTS,
    USAGE_LATE_EVENTS_COLUMNS,
)
from state.durations import parse_duration_ms
from support.flow import flow_env, read_output
from support.kafka import read_all, unique_topic

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
K8S_DEV_DIR = REPO_ROOT / "deploy" / "k8s-dev"  # the base plus placeholder credentials
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "tallyflow.json"
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


# --------------------------------------------------------------------------- manifests


def manifest_files(directory: Path = K8S_DIR) -> list[Path]:
    return sorted(p for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")


def all_manifest_files() -> list[Path]:
    return manifest_files() + manifest_files(K8S_DEV_DIR)


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict]:
    """Every Kubernetes resource of deploy/k8s and its dev overlay, by (kind, name)."""
    found: dict[tuple[str, str], dict] = {}
    for path in all_manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    return found


def one(manifests: dict, kind: str) -> dict:
    [doc] = [doc for (k, _name), doc in manifests.items() if k == kind]
    return doc


def container(manifests: dict) -> dict:
    [only] = one(manifests, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    return only


def container_env(manifests: dict) -> dict:
    return {item["name"]: item for item in container(manifests)["env"]}


@pytest.mark.parametrize("version", ["1.29.0", latest_version()])
def test_manifests_validate_against_the_kubernetes_schemas(version):
    for path in all_manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, version, strict=True)  # raises on any error


def test_the_schema_check_rejects_a_broken_manifest(manifests):
    broken = json.loads(json.dumps(one(manifests, "StatefulSet")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, latest_version(), strict=True)


def test_kustomization_lists_every_manifest_in_one_namespace(manifests):
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_files()]
    dev = yaml.safe_load((K8S_DEV_DIR / "kustomization.yaml").read_text())
    assert dev["resources"] == ["../k8s"] + [p.name for p in manifest_files(K8S_DEV_DIR)]
    assert dev["namespace"] == kustomization["namespace"]
    namespace = kustomization["namespace"]
    assert one(manifests, "Namespace")["metadata"]["name"] == namespace
    for (kind, name), doc in manifests.items():
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, (kind, name)
    images = {image["name"] for image in kustomization["images"]}
    assert container(manifests)["image"] in images


def base_documents() -> list[dict]:
    return [doc for path in manifest_files() for doc in yaml.safe_load_all(path.read_text())]


def test_the_base_applies_no_secret_so_it_cannot_overwrite_the_real_one(manifests):
    assert [doc["kind"] for doc in base_documents() if doc["kind"] == "Secret"] == []
    box, pod = container(manifests), one(manifests, "StatefulSet")["spec"]["template"]["spec"]
    referenced = {source["secretRef"]["name"] for source in box["envFrom"] if "secretRef" in source}
    referenced |= {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    dev_secrets = {name for (kind, name) in manifests if kind == "Secret"}
    assert dev_secrets <= referenced  # the overlay's placeholders are what the pods read
    optional = {v["secret"]["secretName"]: v["secret"].get("optional") for v in pod["volumes"] if "secret" in v}
    assert referenced - dev_secrets == {name for name, is_optional in optional.items() if is_optional}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders kustomizations")
def test_kustomize_renders_the_base_without_and_the_dev_overlay_with_the_placeholder_secret():
    def kinds(directory: Path) -> list[str]:
        rendered = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True,
                                  check=True, timeout=60).stdout
        return sorted(doc["kind"] for doc in yaml.safe_load_all(rendered))

    base, dev = kinds(K8S_DIR), kinds(K8S_DEV_DIR)
    assert "Secret" not in base and base.count("NetworkPolicy") == 2
    assert sorted(base + ["Secret"]) == dev


def test_network_policies_admit_only_flow_peers_to_2101_and_the_scraper_to_9464(manifests):
    labels = one(manifests, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container(manifests)["ports"]}
    policies = [doc for (kind, _), doc in manifests.items() if kind == "NetworkPolicy"]
    admitted: dict[str, list[dict]] = {}
    for policy in policies:
        spec = policy["spec"]
        assert spec["podSelector"]["matchLabels"].items() <= labels.items()
        assert spec["policyTypes"] == ["Ingress"]
        for rule in spec["ingress"]:
            for port in rule["ports"]:
                admitted.setdefault(port["port"], []).extend(rule["from"])
    assert set(admitted) == set(ports) == {"worker", "metrics"}  # every port, nothing unlisted
    # 2101 carries pickles: only pods of this flow, in this namespace (no namespace or IP peers).
    assert admitted["worker"] == [{"podSelector": {"matchLabels": {
        k: v for k, v in labels.items() if k != "app.kubernetes.io/part-of"}}}]
    # 9464: one peer that names a namespace AND pods (two peers would admit either).
    [scraper] = admitted["metrics"]
    assert scraper["namespaceSelector"]["matchLabels"] and scraper["podSelector"]["matchLabels"]
    assert "ipBlock" not in scraper


def test_statefulset_agrees_with_its_services_settings_and_image(manifests):
    sts = one(manifests, "StatefulSet")
    headless = manifests["Service", sts["spec"]["serviceName"]]
    metrics = manifests["Service", "tallyflow-metrics"]
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    env, box = container_env(manifests), container(manifests)
    settings = one(manifests, "ConfigMap")["data"] | one(manifests, "Secret")["stringData"]
    ports = {p["name"]: p["containerPort"] for p in box["ports"]}
    labels = sts["spec"]["template"]["metadata"]["labels"]

    # Identity: the entrypoint's inputs are the StatefulSet's own facts.
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["serviceName"] == env["TALLYFLOW_SERVICE"]["value"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert env["TALLYFLOW_PROCESSES"]["value"] == str(spec["replicas"])
    assert int(env["TALLYFLOW_RECOVERY_PARTITIONS"]["value"]) <= spec["replicas"]
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert ports["worker"] == int(env["TALLYFLOW_WORKER_PORT"]["value"]) == headless["spec"]["ports"][0]["port"]

    # Metrics and probes all point at METRICS_PORT's /metrics.
    assert ports["metrics"] == int(settings["METRICS_PORT"]) == metrics["spec"]["ports"][0]["port"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert box[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe

    # Recovery store on the pod's own volume, mounted where RECOVERY_DIR says.
    [claim] = spec["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in box["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == env["RECOVERY_DIR"]["value"]

    # Non-root, matching the image's USER; enough time for the final flush.
    user = dockerfile_user()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == user != 0
    assert box["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert box["resources"]["requests"] and box["resources"]["limits"]

    # Every selector picks exactly these pods.
    for selector in (spec["selector"]["matchLabels"], headless["spec"]["selector"], metrics["spec"]["selector"],
                     one(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()

    # The settings are valid for the flow (the same parser the flow uses).
    Settings.from_env(settings)
    assert {"SNAPSHOT_INTERVAL", "BACKUP_INTERVAL"} <= settings.keys()


# --------------------------------------------------------------------------- entrypoint


def pod_env(ordinal: int, processes: int = 3, **extra: str) -> dict[str, str]:
    return {"POD_NAME": f"tallyflow-{ordinal}", "POD_NAMESPACE": "metering", "TALLYFLOW_SERVICE": "tallyflow",
            "TALLYFLOW_PROCESSES": str(processes), **extra}


@pytest.mark.parametrize("ordinal", [0, 1, 2])
def test_each_pod_becomes_its_own_bytewax_process(ordinal):
    plan = plan_from_env(pod_env(ordinal, TALLYFLOW_WORKERS_PER_PROCESS="2", TALLYFLOW_WORKER_PORT="3000",
                                 RECOVERY_DIR="/var/lib/tallyflow/recovery", SNAPSHOT_INTERVAL="10",
                                 BACKUP_INTERVAL="60"))
    argv = bytewax_argv(plan)
    assert argv[0] == sys.executable
    assert argv[1:] == [
        "-m", "bytewax.run", "dataflows.usage:flow", "-w", "2", "-i", str(ordinal),
        "-a", "tallyflow-0.tallyflow.metering.svc.cluster.local:3000;"
              "tallyflow-1.tallyflow.metering.svc.cluster.local:3000;"
              "tallyflow-2.tallyflow.metering.svc.cluster.local:3000",
        "-r", "/var/lib/tallyflow/recovery", "-s", "10", "-b", "60",
    ]
    assert plan.owned_partitions == (ordinal,)


def test_names_service_and_domain_come_from_the_environment():
    plan = plan_from_env({"HOSTNAME": "usage-meter-1", "POD_NAMESPACE": "billing", "TALLYFLOW_PROCESSES": "2",
                          "TALLYFLOW_CLUSTER_DOMAIN": "corp.internal"})
    assert plan.process_id == 1
    assert plan.addresses == ("usage-meter-0.usage-meter.billing.svc.corp.internal:2101",
                              "usage-meter-1.usage-meter.billing.svc.corp.internal:2101")
    assert parse_pod_name("tallyflow-12") == ("tallyflow", 12)


def test_a_single_process_gets_no_cluster_flags():
    plan = plan_from_env({"HOSTNAME": "3f2a9c0d1b7e"})  # `docker run`: a container id
    assert bytewax_argv(plan)[1:] == ["-m", "bytewax.run", "dataflows.usage:flow", "-w", "1"]
    with_recovery = plan_from_env({"POD_NAME": "tallyflow-0", "RECOVERY_DIR": "/data"})
    assert bytewax_argv(with_recovery)[-6:] == ["-r", "/data", "-s", "5", "-b", "30"]
    assert with_recovery.owned_partitions == (0,)


@pytest.mark.parametrize("env, complaint", [
    (pod_env(3), "ordinal 3 but TALLYFLOW_PROCESSES=3"),
    ({**pod_env(0), "POD_NAMESPACE": ""}, "POD_NAMESPACE is required"),
    ({**pod_env(0), "POD_NAME": "tallyflow"}, "not <statefulset>-<ordinal>"),
    ({**pod_env(0), "TALLYFLOW_WORKER_PORT": "70000"}, "not a port"),
    ({**pod_env(0), "TALLYFLOW_PROCESSES": "two"}, "TALLYFLOW_PROCESSES: not an integer"),
    ({**pod_env(0), "SNAPSHOT_INTERVAL": "5s"}, "SNAPSHOT_INTERVAL: not an integer"),
    ({**pod_env(0), "TALLYFLOW_SERVICE": "Tally_Flow"}, "not a DNS label"),
])
def test_a_bad_environment_is_refused_with_its_reason(env, complaint):
    with pytest.raises(EntrypointError, match=re.escape(complaint)):
        plan_from_env(env)


def test_the_entrypoint_exits_2_on_a_bad_environment():
    env = {**os.environ, **pod_env(5, processes=2)}
    done = subprocess.run([sys.executable, "-m", "deploy.entrypoint"], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "ordinal 5 but TALLYFLOW_PROCESSES=2" in done.stderr


def partitions_in(store: Path) -> list[tuple[int, int]]:
    found = []
    for path in sorted(store.glob("part-*.sqlite3")):
        db = sqlite3.connect(f"file:{path}?immutable=1", uri=True)  # leaves no -wal/-shm behind
        try:
            found += db.execute("SELECT part_index, part_count FROM parts").fetchall()
        finally:
            db.close()
    return found


def test_each_pod_creates_its_recovery_partition_once(tmp_path):
    stores = [tmp_path / f"pod-{k}" for k in range(3)]
    plans = [plan_from_env(pod_env(k, RECOVERY_DIR=str(stores[k]), TALLYFLOW_RECOVERY_PARTITIONS="2"))
             for k in range(3)]
    created = [prepare_recovery_store(s, p.recovery_partitions, p.owned_partitions) for s, p in zip(stores, plans)]
    assert created == [(0,), (1,), ()]
    assert [partitions_in(s) for s in stores] == [[(0, 2)], [(1, 2)], []]

    # A restart creates nothing, keeps the partitions and sweeps a crashed half-init away.
    (stores[0] / ".init-crashed").mkdir()
    before = (stores[0] / "part-0.sqlite3").stat().st_mtime_ns
    assert prepare_recovery_store(stores[0], 2, (0,)) == ()
    assert (stores[0] / "part-0.sqlite3").stat().st_mtime_ns == before
    assert sorted(p.name for p in stores[0].iterdir()) == ["part-0.sqlite3"]


# --------------------------------------------------------------------------- image


def dockerfile_commands() -> tuple:
    return dockerfile.parse_file(str(DOCKERFILE))


def dockerfile_user() -> int:
    users = [c.value[0] for c in dockerfile_commands() if c.cmd == "USER"]
    return int(users[-1].split(":")[0])


def test_dockerfile_builds_the_project_into_a_non_root_image(manifests):
    commands = dockerfile_commands()
    args = {c.value[0].split("=", 1)[0]: c.value[0].split("=", 1)[1] for c in commands if c.cmd == "ARG"}
    stages = [c.value for c in commands if c.cmd == "FROM"]
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert all(stage[0] == "${PYTHON_IMAGE}" for stage in stages)

    # Every COPY source from the build context exists and is not excluded by .dockerignore.
    ignored = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copied = []
    for c in commands:
        if c.cmd == "COPY" and not any(flag.startswith("--from") for flag in c.flags):
            for source in c.value[:-1]:
                assert (REPO_ROOT / source).exists(), f"COPY {source}: no such file in the build context"
                assert source.strip("/").split("/")[0] not in ignored, f"COPY {source} is in .dockerignore"
                copied.append(source.strip("/"))
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    top_level = {name.split(".")[0] for name in pyproject["tool"]["setuptools"]["packages"]}
    assert top_level <= set(copied)  # a subpackage comes with its package's folder
    assert "pyproject.toml" in copied
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.]+", dep) for dep in pyproject["project"]["dependencies"])

    # Shell steps are valid sh; the user is not root; entrypoint and healthcheck modules exist.
    for c in commands:
        if c.cmd == "RUN":
            subprocess.run(["sh", "-n", "-c", c.value[0]], check=True)
    assert dockerfile_user() == 10001
    [entrypoint] = [c for c in commands if c.cmd == "ENTRYPOINT"]
    assert entrypoint.json and list(entrypoint.value) == ["python", "-m", "deploy.entrypoint"]
    [health] = [c for c in commands if c.cmd == "HEALTHCHECK"]
    assert list(health.value) == ["CMD", "python", "-m", "deploy.healthcheck"]
    for module in ("deploy.entrypoint", "deploy.healthcheck"):
        assert importlib.util.find_spec(module) is not None
    exposed = {int(p) for c in commands if c.cmd == "EXPOSE" for p in c.value}
    assert exposed == {int(container_env(manifests)["TALLYFLOW_WORKER_PORT"]["value"]),
                       int(one(manifests, "ConfigMap")["data"]["METRICS_PORT"])}


def test_the_image_builds_every_compiled_fast_path():
    """Each ext-module of pyproject.toml (what `make install` compiles) is compiled in the image's
    native stage and copied next to its package, or the pods would run the slower pure paths."""
    commands = dockerfile_commands()
    modules = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["ext-modules"]
    assert modules
    sources = [source for c in commands if c.cmd == "COPY" and not c.flags for source in c.value[:-1]]
    built = {(c.value[0], c.value[1]) for c in commands if c.cmd == "COPY" and "--from=native" in c.flags}
    [compile_step] = [c.value[0] for c in commands if c.cmd == "RUN" and "gcc -O2 -shared" in c.value[0]]
    for module in modules:
        package, name = module["name"].rsplit(".", 1)
        assert module["sources"][0] in sources
        assert name in compile_step
        assert (f"/build/{name}.*.so", package.replace(".", "/") + "/") in built
    assert "**/*.so" in (REPO_ROOT / ".dockerignore").read_text().splitlines()  # no host builds


LOCK = REPO_ROOT / "deploy" / "requirements.lock"
_LOCK_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._\-]*)==(\S+?)((?:\s+--hash=sha256:[0-9a-f]{64})+)\s*$")


def locked_requirements() -> dict[str, tuple[str, int]]:
    """deploy/requirements.lock as ``{normalised name: (version, number of hashes)}``; every
    entry must be ``name==version`` with sha256 hashes (pip's --require-hashes format)."""
    text = re.sub(r"\\\n", " ", LOCK.read_text())
    locked = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        entry = _LOCK_ENTRY.match(line.split(" #", 1)[0].strip())
        assert entry, f"not a hashed pin: {line[:80]!r}"
        locked[re.sub(r"[-_.]+", "-", entry.group(1).lower())] = (entry.group(2), entry.group(3).count("--hash"))
    return locked


def test_the_image_installs_the_hashed_lock_without_chdb():
    commands = dockerfile_commands()
    copies = [c.value for c in commands if c.cmd == "COPY" and "deploy/requirements.lock" in c.value]
    assert copies, "the image must copy the lock"
    [install] = [c.value[0] for c in commands if c.cmd == "RUN" and "pip install" in c.value[0]]
    assert "--require-hashes" in install and "--no-deps" in install and "requirements.lock" in install
    assert "pyproject" not in install  # the pins come from the lock only

    locked = locked_requirements()
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    for dependency in pyproject["project"]["dependencies"]:
        name, version = dependency.split("==")
        assert locked[re.sub(r"[-_.]+", "-", name.lower())][0] == version, dependency
    assert all(hashes >= 1 for _version, hashes in locked.values())
    assert "chdb" not in locked and len(locked) > len(pyproject["project"]["dependencies"])  # transitive too
    assert any(dep.startswith("chdb==") for dep in pyproject["project"]["optional-dependencies"]["embedded"])
    assert ".[dev,embedded]" in (REPO_ROOT / "Makefile").read_text()  # make install keeps it for dev


class _Metrics(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = b"tallyflow_events_consumed_total{partition=\"0\"} 1\n"
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def healthcheck(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.healthcheck", "--timeout", "2"],
                          env={**os.environ, **env}, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)


def test_healthcheck_follows_the_metrics_endpoint_or_the_process():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = str(server.server_address[1])
    try:
        up = healthcheck(METRICS_PORT=port)
    finally:
        server.shutdown()
        server.server_close()
    assert (up.returncode, up.stdout.startswith("healthy")) == (0, True), up.stdout
    down = healthcheck(METRICS_PORT=port)
    assert down.returncode == 1 and "unreachable" in down.stdout

    sleeper = subprocess.Popen([sys.executable, "-c", "import sys, time; print(flush=True); time.sleep(60)",
                                "bytewax.run"], stdout=subprocess.PIPE)
    try:
        sleeper.stdout.readline()  # the child has exec'd: before that /proc shows pytest's command line
        assert check_process(sleeper.pid)[0] is True
    finally:
        sleeper.kill()
        sleeper.wait()
    assert check_process(sleeper.pid)[0] is False


# --------------------------------------------------------------------------- ClickHouse DDL


def migrate(capsys, *args: str) -> tuple[int, list[str]]:
    status = cli.main(["migrate", *args])
    return status, capsys.readouterr().out.splitlines()


def test_migrate_creates_the_tables_once_and_they_take_rows(clickhouse_url, capsys):
    names = [table.name for table in TABLES]
    status, lines = migrate(capsys, "--url", clickhouse_url, "--enrich-fields", "plan")
    assert status == 0
    assert lines == [f"{name}: created, columns as expected (single node)" for name in names]
    for _ in range(2):  # re-running changes nothing
        status, lines = migrate(capsys, "--url", clickhouse_url, "--enrich-fields", "plan")
        assert status == 0
        assert lines == [f"{name}: already existed, columns as expected (single node)" for name in names]

    row = {"organization_id": "o", "external_customer_id": "c", "code": "api_calls", "plan": "pro",
           "window_start": "2026-01-01 00:00:00.000", "window_end": "2026-01-01 00:01:00.000"}
    aggregates = [{**row, "event_count": n, "total_value": f"{n}.5", "version": n, "is_deleted": 0}
                  for n in (1, 3, 2)]
    late = {k: v for k, v in row.items() if k != "plan"} | {
        "transaction_id": "t", "event_time": row["window_start"], "value": "0.000000000000000001",
        "reason": "late", "watermark": row["window_end"], "source_topic": "u", "source_partition": 1,
        "source_offset": 7, "raw": "{}"}
    backend = connect(clickhouse_url)
    try:
        for record in aggregates:
            backend.insert_json_each_row(USAGE_AGGREGATES, USAGE_AGGREGATES_COLUMNS + ("plan",),
                                         json.dumps(record).encode())
        backend.insert_json_each_row(USAGE_LATE_EVENTS, USAGE_LATE_EVENTS_COLUMNS, json.dumps(late).encode())
        _, final = backend.query("SELECT event_count, toString(total_value), plan FROM usage_aggregates FINAL")
        _, late_rows = backend.query("SELECT toString(value), source_offset FROM usage_late_events FINAL")
    finally:
        backend.close()
    assert final == [(3, "3.5", "pro")]
    assert late_rows == [("0.000000000000000001", 7)]


def test_migrate_reports_an_existing_table_whose_columns_differ(chdb_url, capsys):
    backend = connect(chdb_url)
    try:
        backend.command(f"CREATE TABLE {USAGE_AGGREGATES} (organization_id String, total_value Float64, "
                        "legacy String) ENGINE = MergeTree ORDER BY organization_id")
    finally:
        backend.close()
    status, lines = migrate(capsys, "--url", chdb_url, "--enrich-fields", "off")
    assert status == 1
    assert lines[0].startswith(f"{USAGE_AGGREGATES}: already existed, but its columns differ: ")
    assert "total_value is Float64, expected Decimal(76, 18)" in lines[0] and "missing version" in lines[0]
    assert "extra columns left as they are: legacy" in lines[0]
    assert all(": created, columns as expected" in line for line in lines[1:])


def test_cluster_ddl_mirrors_the_single_node_tables(chdb_url, capsys):
    statements = cluster_ddl("metering", "billing", enrich_fields=("plan",))
    targets = [s.split(" ON CLUSTER ")[0].split()[-1] for s in statements]
    expected_targets = [f"`billing`.`{t.name}{suffix}`" for t in TABLES for suffix in (LOCAL_SUFFIX, "")]
    expected_targets += [f"`billing`.`{USAGE_AGGREGATES}{LOCAL_SUFFIX}`", f"`billing`.`{USAGE_AGGREGATES}`"]
    assert targets == expected_targets
    assert all(" ON CLUSTER 'metering'" in s and "IF NOT EXISTS" in s for s in statements)
    assert ("ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}', "
            "`version`, `is_deleted`)") in statements[0]
    assert ("Distributed('metering', 'billing', 'usage_aggregates_local', "
            "cityHash64(`organization_id`, `external_customer_id`))") in statements[1]
    assert statements[-1].endswith("ADD COLUMN IF NOT EXISTS `plan` String DEFAULT ''")
    assert "'{cluster}'" in cluster_ddl()[0]  # default: the server's macro
    for table in TABLES:  # versions of one key always meet on one shard
        assert set(sharding_columns(table)) <= set(table.order_by)

    backend = connect(chdb_url)
    try:
        # ClickHouse's own parser accepts every statement.
        for statement in statements:
            backend.query(f"SELECT formatQuery({quote_string(statement)})")
        # The local tables, minus replication, are the single-node tables: same columns, key, engine.
        assert cli.main(["migrate", "--url", chdb_url, "--enrich-fields", "plan"]) == 0
        backend.command("CREATE DATABASE billing")
        for statement in statements:
            if "_local` ON CLUSTER" in statement:
                plain = statement.replace(" ON CLUSTER 'metering'", "")
                plain = re.sub(r"ReplicatedReplacingMergeTree\('[^']*', '[^']*'(, )?", "ReplacingMergeTree(", plain)
                backend.command(plain)
        shape = ("SELECT table, sorting_key, replaceRegexpOne(engine_full, ' ORDER BY .*', '') FROM system.tables "
                 "WHERE database = {db} ORDER BY table")
        columns = "SELECT table, name, type FROM system.columns WHERE database = {db} ORDER BY table, position"
        for sql in (shape, columns):
            _, single = backend.query(sql.format(db="currentDatabase()"))
            _, local = backend.query(sql.format(db="'billing'"))
            by_table = lambda rows: sorted(rows, key=lambda r: r[0])  # noqa: E731 - stable: keeps positions
            assert by_table((r[0] + LOCAL_SUFFIX, *r[1:]) for r in single) == by_table(local)
            assert len(local) >= len(TABLES)
    finally:
        backend.close()

    # Applying it needs a real cluster; this engine has none and says so.
    capsys.readouterr()
    status = cli.main(["migrate", "--url", chdb_url, "--cluster", "metering"])
    assert status == 1 and "Requested cluster 'metering' not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- dashboard

ALLOWED_METRICS = {
    "tallyflow_events_consumed_total", "tallyflow_events_invalid_total", "tallyflow_events_duplicate_total",
    "tallyflow_events_late_total", "tallyflow_windows_closed_total", "tallyflow_rows_written_total",
    "tallyflow_sink_retries_total", "tallyflow_watermark_ms", "tallyflow_watermark_delay_ms",
    "tallyflow_consumer_lag",
} | {f"{histogram}{suffix}" for histogram in ("tallyflow_sink_batch_rows", "tallyflow_sink_write_seconds",
                                              "tallyflow_snapshot_seconds")
     for suffix in ("_bucket", "_sum", "_count")}
PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "rate", "increase", "irate", "histogram_quantile",
                "clamp_min", "clamp_max", "time", "label_values", "by", "without", "on", "ignoring",
                "and", "or", "unless", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, ranges, groupings removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\$\{?\w+\}?", "", text)  # dashboard variables
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)  # label matchers, ranges
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)  # grouping labels
    text = re.sub(r"label_values\(([^,]*),[^)]*\)", r"\1", text)  # label_values(metric, label)
    return {w for w in re.findall(r"(?<![\w.])[A-Za-z_:][\w:]*", text) if w not in PROMQL_WORDS}


def test_dashboard_reads_only_the_tallyflow_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert panels and all(p["targets"] for p in panels)
    used = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names and names <= ALLOWED_METRICS, f"{expr}: {sorted(names - ALLOWED_METRICS)}"
        used |= names
    assert {name for name in ALLOWED_METRICS if not name.endswith(("_sum", "_count"))} <= used
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


# --------------------------------------------------------------------------- the StatefulSet, run


HOSTS_WRAPPER = ["sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"']


@pytest.fixture(scope="module")
def private_hosts(tmp_path_factory) -> list[str]:
    """A command prefix ``… HOSTS_FILE CMD…`` running CMD with HOSTS_FILE as its /etc/hosts."""
    unshare = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    prefix = unshare + HOSTS_WRAPPER
    hosts = tmp_path_factory.mktemp("hosts") / "hosts"
    hosts.write_text(f"{pod_address(1)} probe.tallyflow.test\n")
    probe = [sys.executable, "-c", "import socket; s = socket.socket(); "
             "s.bind((socket.gethostbyname('probe.tallyflow.test'), 0)); print('ok')"]
    try:
        done = subprocess.run(prefix + [str(hosts), *probe], capture_output=True, text=True, timeout=30)
    except FileNotFoundError as err:
        pytest.skip(f"needs unshare(1) for a private /etc/hosts: {err}")
    if done.stdout.strip() != "ok":
        pytest.skip(f"needs a mount namespace and {pod_address(1)} for a private /etc/hosts: {done.stderr.strip()}")
    return prefix


def pod_address(ordinal: int) -> str:
    return f"127.0.1.{ordinal + 1}"


def port_free_on(addresses: list[str]) -> int:
    """A port nothing listens on at any of ``addresses``."""
    while True:
        port, sockets = free_port(), []
        try:
            for address in addresses:
                sock = socket.socket()
                sockets.append(sock)
                sock.bind((address, port))
            return port
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()


def rendered_pod_env(manifests: dict, ordinal: int) -> dict[str, str]:
    """The environment Kubernetes gives pod ``ordinal``: envFrom first, then env (which wins)."""
    sts, box = one(manifests, "StatefulSet"), container(manifests)
    env: dict[str, str] = {}
    for source in box.get("envFrom", []):
        if "configMapRef" in source:
            env.update(manifests["ConfigMap", source["configMapRef"]["name"]]["data"])
        else:
            env.update(manifests["Secret", source["secretRef"]["name"]]["stringData"])
    downward = {"metadata.name": f"{sts['metadata']['name']}-{ordinal}",
                "metadata.namespace": sts["metadata"]["namespace"]}
    for item in box["env"]:
        env[item["name"]] = item["value"] if "value" in item else downward[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


class MetricsProbes:
    """Scrapes each pod's ``/metrics`` (the probes' endpoint) every 100 ms while the pods run."""

    def __init__(self, urls: list[str]) -> None:
        import urllib.request

        self.urls, self._urlopen = urls, urllib.request.urlopen
        self.answered = [False] * len(urls)
        self.partitions: list[set[int]] = [set() for _ in urls]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._scrape, daemon=True)
        self._thread.start()

    def _scrape(self) -> None:
        pattern = re.compile(r'^tallyflow_events_consumed_total\{partition="(\d+)"\} ', re.M)
        while not self._stop.wait(0.1):
            for k, url in enumerate(self.urls):
                try:
                    with self._urlopen(url, timeout=1) as response:
                        text = response.read().decode()
                except (OSError, http.client.HTTPException):  # not up yet, or gone mid-answer
                    continue
                self.answered[k] = True
                self.partitions[k] |= {int(p) for p in pattern.findall(text)}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def partitions_by_pod(self) -> list[tuple[bool, set[int]]]:
        return list(zip(self.answered, self.partitions))


class Cluster:
    """The StatefulSet's pods as local processes. What a laptop cannot take from the manifests
    is overridden: Kafka, topics and ClickHouse (the test's); REDIS_URL (empty: no Redis here,
    its features off); KAFKA_STOP_AT_END=1 (exit at the end of the topic); RECOVERY_DIR (one
    directory per pod, as its volume); the worker and metrics ports (free ones, one for all pods
    as in a cluster, each pod on its own address, which METRICS_HOST names as a pod IP would)."""

    def __init__(self, manifests, prefix, tmp_path, bootstrap, topic, dlq_topic, clickhouse_url):
        self.manifests, self.prefix, self.tmp_path = manifests, prefix, tmp_path
        self.local = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "USAGE_TOPIC": topic, "DLQ_TOPIC": dlq_topic,
                      "CLICKHOUSE_URL": clickhouse_url}

    def pod_env(self, ordinal: int, processes: int, worker_port: int, metrics_port: int) -> dict[str, str]:
        rendered = rendered_pod_env(self.manifests, ordinal)
        rendered["TALLYFLOW_PROCESSES"] = str(processes)  # the rescale edit (== replicas)
        kept = {k: v for k, v in rendered.items() if k not in self.local}
        env = flow_env(*self.local.values(), **kept)
        env.update(RECOVERY_DIR=str(self.tmp_path / f"pv-recovery-tallyflow-{ordinal}"),
                   TALLYFLOW_WORKER_PORT=str(worker_port), METRICS_PORT=str(metrics_port),
                   METRICS_HOST=pod_address(ordinal), REDIS_URL="", LOG_LEVEL="WARNING",
                   KAFKA_STOP_AT_END="1")
        return env

    def run(self, processes: int, timeout: float = 120) -> None:
        """Start ``processes`` pods at once (podManagementPolicy Parallel); all must exit 0."""
        names = [rendered_pod_env(self.manifests, k)["POD_NAME"] for k in range(processes)]
        addresses = [pod_address(k) for k in range(processes)]
        worker_port = port_free_on(addresses)
        metrics_port = port_free_on(addresses)
        envs = [self.pod_env(k, processes, worker_port, metrics_port) for k in range(processes)]
        domain = "{}.{}.svc.cluster.local".format(envs[0]["TALLYFLOW_SERVICE"], envs[0]["POD_NAMESPACE"])
        hosts = self.tmp_path / f"hosts-{processes}"
        hosts.write_text(Path("/etc/hosts").read_text() + "".join(
            f"{address} {name}.{domain} {name}\n" for address, name in zip(addresses, names)))
        logs = [self.tmp_path / f"{name}-run{processes}.log" for name in names]
        pods = []
        for env, log in zip(envs, logs):
            with open(log, "wb") as out:
                pods.append(subprocess.Popen(self.prefix + [str(hosts), sys.executable, "-m", "deploy.entrypoint"],
                                             env=env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT))
        probes = MetricsProbes([f"http://{address}:{metrics_port}/metrics" for address in addresses])
        deadline = time.monotonic() + timeout
        try:
            codes = [pod.wait(max(1, deadline - time.monotonic())) for pod in pods]
        except subprocess.TimeoutExpired:
            codes = None
        finally:
            probes.stop()
            for pod in pods:
                if pod.poll() is None:
                    pod.kill()
                    pod.wait()
        tails = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in logs)
        assert codes == [0] * processes, f"pods exited {codes}:\n{tails}"
        self.partitions_reported = probes.partitions_by_pod()

    def assert_each_partition_reported_by_one_pod(self, partitions: int) -> None:
        """What the probes' endpoint showed while the pods ran: every pod answered, and each
        Kafka partition was counted by exactly one of them."""
        reported = self.partitions_reported
        assert all(answered for answered, _ in reported), f"a pod's /metrics never answered: {reported}"
        owners = [p for _answered, partitions_of_pod in reported for p in partitions_of_pod]
        assert sorted(owners) == list(range(partitions)), reported

    def partitions(self, ordinal: int) -> list[tuple[int, int]]:
        return partitions_in(self.tmp_path / f"pv-recovery-tallyflow-{ordinal}")


def test_statefulset_pods_form_a_cluster_then_rescale_and_resume(
        manifests, private_hosts, kafka_broker, dev_clickhouse, tmp_path):
    settings = one(manifests, "ConfigMap")["data"]
    window_ms, disorder_ms = parse_duration_ms(settings["WINDOW_SIZE"]), parse_duration_ms(settings["MAX_OUT_OF_ORDERNESS"])
    replicas = one(manifests, "StatefulSet")["spec"]["replicas"]
    assert replicas == 2, "this test starts the manifests' 2 pods, then rescales to 3"
    topic, dlq_topic = unique_topic("usage"), unique_topic("dlq")
    ensure_topic(kafka_broker.bootstrap, topic, 4)
    ensure_topic(kafka_broker.bootstrap, dlq_topic, 1)
    cluster = Cluster(manifests, private_hosts, tmp_path, kafka_broker.bootstrap, topic, dlq_topic, dev_clickhouse.url)

    def expected():
        raw = [(m.partition(), m.offset(), m.value()) for m in read_all(kafka_broker.bootstrap, topic)]
        return raw, recompute(raw, window_size_ms=window_ms, max_out_of_orderness_ms=disorder_ms)

    def assert_output_is(expectation):
        output = read_output(dev_clickhouse.url)
        assert diff(expectation.aggregates, output.aggregates) == []
        assert output.rows_final == output.rows_distinct_keys == len(expectation.aggregates)
        assert {(org, txn) for org, txn, _p, _o in output.late} == expectation.late

    # 1. The manifests' two pods, started together, process the stream and stop at its end.
    first = list(generate(12_000, seed=21, partitions=4, start_ms=START_MS, span_ms=300_000))
    produce(kafka_broker.bootstrap, topic, first)
    cluster.run(replicas)
    cluster.assert_each_partition_reported_by_one_pod(4)
    raw_1, expected_1 = expected()
    assert_output_is(expected_1)
    assert [cluster.partitions(k) for k in range(replicas)] == [[(0, 2)], [(1, 2)]]

    # 2. Stop, change replicas (and TALLYFLOW_PROCESSES) to 3, start: the cluster resumes from
    #    the partitions on pods 0 and 1; re-sent old events must meet the resumed dedup state,
    #    and new duplicates (some late on another partition than their original) count once.
    events = [r for r in first if r.kind == "event"]
    resent = events[:100] + events[-200:]
    second = list(generate(8_000, seed=22, partitions=4, start_ms=START_MS + 300_000, span_ms=300_000))
    produce(kafka_broker.bootstrap, topic, resent + second)
    cluster.run(3)
    raw_2, expected_2 = expected()
    # (no per-pod partition check here: a pod may have nothing new to read and exit before a scrape)
    assert len(raw_2) == len(raw_1) + len(resent) + len(second)
    assert expected_2.duplicates >= expected_1.duplicates + len(resent)
    assert_output_is(expected_2)
    assert [cluster.partitions(k) for k in range(3)] == [[(0, 2)], [(1, 2)], []]


def test_the_rendered_pod_env_is_what_the_entrypoint_needs(manifests):
    env = rendered_pod_env(manifests, 1)
    plan = plan_from_env(env)
    assert plan.process_id == 1 and len(plan.addresses) == one(manifests, "StatefulSet")["spec"]["replicas"]
    assert plan.addresses[1] == "tallyflow-1.tallyflow.tallyflow.svc.cluster.local:2101"
    assert plan.recovery_dir == "/var/lib/tallyflow/recovery" and plan.owned_partitions == (1,)
    assert bytewax_argv(plan)[1:4] == ["-m", "bytewax.run", "dataflows.usage:flow"]
