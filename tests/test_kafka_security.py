"""Kafka TLS/SASL settings reach every client, and no secret is ever shown.

TLS, positively: Tansu's own TLS options did not give a TLS listener (0.6.0: ``--cert`` and
``--key`` refuse each other, and a combined PEM still served plaintext), so the dev broker runs
behind a TLS proxy that it advertises; generate, the flow (source and DLQ producer) and reconcile
run through it with ``KAFKA_SECURITY_PROTOCOL=SSL``.

SASL, negatively: Tansu offers a SASL listener (``--authentication``, SCRAM) but no way to
create a user while it is on, so every client is given SASL settings for a user the broker does
not know. A client that got the settings fails with librdkafka's *SASL authentication error*;
one that missed them would speak plaintext and fail with a different error (the broker drops
it). Either way the password must appear nowhere.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
from confluent_kafka import KafkaException

from dataflows.settings import Settings, SettingsError
from deploy.broker import BrokerError, DevBroker, ensure_topic, free_port, topic_partitions
from deploy.generator import ProduceError, generate, produce
from deploy.runner import REPO_ROOT, bytewax_command, flow_environment
from sinks.kafka_client import (
    KafkaConfigError,
    KafkaConnection,
    KafkaSecurity,
    KafkaUnavailableError,
    MissingTopicError,
)
from recovery.kafka_source import UsageSource
from recovery.reconcile import read_topic
from sinks.alerts import AlertsPartition
from sinks.kafka_output import KafkaOutputSink
from support.kafka import unique_topic
from support.tls_proxy import TlsProxy, self_signed_certificate

PASSWORD = "Pw-7f3c9e1d-never-shown"
PRODUCT_PACKAGES = ("dataflows", "operators", "state", "sinks", "recovery", "deploy")
CLIENT_CLASSES = {"Consumer", "Producer", "AdminClient"}
THE_BUILDER = Path("sinks/kafka_client.py")
# The bench always starts its own plaintext dev broker and connects to nothing else.
NOT_A_PRODUCTION_CLIENT = ("deploy/bench",)


def sasl_env(password_file: Path, **extra: str) -> dict[str, str]:
    return {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "metering", "KAFKA_SASL_PASSWORD_FILE": str(password_file), **extra}


@pytest.fixture
def password_file(tmp_path) -> Path:
    path = tmp_path / "kafka-password"
    path.write_text(PASSWORD + "\n")
    return path


@pytest.fixture(scope="module")
def sasl_broker():
    """A Tansu broker that requires SASL SCRAM and knows no user."""
    with DevBroker(authentication=True) as broker:
        yield broker


# ---- every client is built by the one builder -----------------------------------------------


def product_modules() -> list[Path]:
    return sorted(p for package in PRODUCT_PACKAGES for p in (REPO_ROOT / package).rglob("*.py"))


def _name(node: ast.expr) -> str | None:
    return getattr(node, "id", None) or getattr(node, "attr", None)


def direct_client_constructions(path: Path) -> list[str]:
    """Calls of ``Consumer``/``Producer``/``AdminClient`` and classes deriving from them in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _name(node.func) in CLIENT_CLASSES:
            found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {_name(node.func)}(...)")
        if isinstance(node, ast.ClassDef) and CLIENT_CLASSES & {_name(base) for base in node.bases}:
            found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: class {node.name}")
    return found


def test_only_the_builder_constructs_kafka_clients():
    offenders = []
    for path in product_modules():
        relative = path.relative_to(REPO_ROOT)
        if relative == THE_BUILDER or str(relative).startswith(NOT_A_PRODUCTION_CLIENT):
            continue
        offenders += direct_client_constructions(path)
    assert offenders == [], "build Kafka clients with KafkaConnection.consumer/producer/admin"
    # The scan itself finds what it looks for (it would otherwise pass on any tree).
    assert len(direct_client_constructions(REPO_ROOT / THE_BUILDER)) == 3


# ---- settings ------------------------------------------------------------------------------


def test_variables_win_over_the_properties_file_and_secrets_come_from_files(tmp_path, password_file):
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    properties = tmp_path / "client.properties"
    properties.write_text("# from the platform team\nsecurity.protocol=SSL\nssl.ca.location=/nowhere\n"
                          "socket.keepalive.enable = true\n")
    security = KafkaSecurity.from_env(sasl_env(password_file, KAFKA_CONFIG_FILE=str(properties),
                                               KAFKA_SECURITY_PROTOCOL="sasl_ssl",
                                               KAFKA_SSL_CA_LOCATION=str(ca)))
    config = KafkaConnection("b:9093", security).config({"group.id": "g"})
    assert config == {
        "bootstrap.servers": "b:9093", "group.id": "g", "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "metering", "sasl.password": PASSWORD,
        "ssl.ca.location": str(ca), "socket.keepalive.enable": "true",
    }
    assert PASSWORD not in repr(security) and PASSWORD not in repr(KafkaConnection("b", security))
    assert PASSWORD not in repr(Settings.from_env(sasl_env(password_file)))


@pytest.mark.parametrize("env, message", [
    ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL: 'TLS' is not one of"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "PLAIN",
      "KAFKA_SASL_USERNAME": "u"}, "KAFKA_SASL_PASSWORD_FILE: SASL mechanism PLAIN needs a password"),
    ({"KAFKA_SASL_USERNAME": "u"}, "the protocol is PLAINTEXT, which would not use them"),
    ({"KAFKA_SASL_PASSWORD_FILE": "/no/such/file"}, "KAFKA_SASL_PASSWORD_FILE: cannot read /no/such/file"),
    ({"KAFKA_SSL_CA_LOCATION": "/no/ca.pem", "KAFKA_SECURITY_PROTOCOL": "SSL"},
     "KAFKA_SSL_CA_LOCATION: no such file: /no/ca.pem"),
])
def test_unusable_security_settings_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_a_properties_file_may_not_pick_the_brokers_and_errors_never_quote_its_lines(tmp_path):
    properties = tmp_path / "client.properties"
    properties.write_text(f"sasl.password={PASSWORD}\nbootstrap.servers=elsewhere:9092\n")
    with pytest.raises(KafkaConfigError, match="line 2: bootstrap.servers is set per client") as err:
        KafkaSecurity.from_env({"KAFKA_CONFIG_FILE": str(properties)})
    properties.write_text(f"sasl.password {PASSWORD}\n")
    with pytest.raises(KafkaConfigError, match="line 1: expected key=value") as err:
        KafkaSecurity.from_env({"KAFKA_CONFIG_FILE": str(properties)})
    assert PASSWORD not in str(err.value)


def test_a_client_cannot_override_a_security_setting():
    tls = KafkaConnection("b:9093", KafkaSecurity((("security.protocol", "SSL"),)))
    with pytest.raises(KafkaConfigError, match="may not override security.protocol"):
        tls.consumer({"group.id": "g", "security.protocol": "PLAINTEXT"})


# ---- end to end against a SASL listener ----------------------------------------------------


def assert_sasl_refused(error: BaseException) -> None:
    text = str(error)
    assert "SASL authentication error" in text, text
    assert PASSWORD not in text


def test_every_flow_client_speaks_sasl(sasl_broker, password_file):
    kafka = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": sasl_broker.bootstrap, **sasl_env(password_file)}).kafka.connection
    clients = {
        "source": lambda: UsageSource(kafka, "usage", intake_factory=None).list_parts(),
        "dlq/late producer": lambda: KafkaOutputSink(kafka, "dlq", setting="DLQ_TOPIC").list_parts(),
        "alerts": lambda: AlertsPartition(kafka, "alerts", "redis://127.0.0.1:6379/0"),
        "reconcile": lambda: read_topic(kafka, "usage", timeout_s=5),
        "topic check": lambda: topic_partitions(kafka, "usage", timeout=5),
        "topic creation": lambda: ensure_topic(kafka, "usage", 1, timeout=5),
        "generate": lambda: produce(kafka, "usage", generate(1, seed=1, partitions=1, start_ms=0), flush_timeout=5),
    }
    with ThreadPoolExecutor(len(clients)) as pool:  # each waits for its metadata timeout
        outcomes = dict(zip(clients, pool.map(failure_of, clients.values())))
    for name, error in outcomes.items():
        if name in ("topic creation", "generate"):  # librdkafka's own error: the cause is in its log
            assert isinstance(error, (KafkaException, ProduceError, BrokerError)), (name, error)
            assert PASSWORD not in str(error), name
            continue
        assert isinstance(error, KafkaUnavailableError), (name, error)
        assert_sasl_refused(error)


def failure_of(connect: Callable[[], object]) -> BaseException | None:
    try:
        connect()
    except Exception as err:  # noqa: BLE001 - the test inspects it
        return err
    return None


def test_the_flow_and_the_cli_fail_on_sasl_and_never_print_the_password(sasl_broker, password_file):
    env = flow_environment(KAFKA_BOOTSTRAP_SERVERS=sasl_broker.bootstrap, USAGE_TOPIC="usage",
                           DLQ_TOPIC="dlq", CLICKHOUSE_URL="chdb://./nowhere", METRICS_PORT="0",
                           KAFKA_STOP_AT_END="1", **sasl_env(password_file))
    runs = {
        "flow": bytewax_command(),
        "generate": [sys.executable, "-m", "deploy.cli", "generate", "--count", "1", "--no-progress"],
        "reconcile": [sys.executable, "-m", "deploy.cli", "reconcile"],
    }
    started = {name: subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
               for name, command in runs.items()}
    for name, process in started.items():
        output, _ = process.communicate(timeout=120)
        assert process.returncode != 0, (name, output[-2000:])
        assert "SASL authentication error" in output, (name, output[-2000:])
        assert PASSWORD not in output, name


# ---- end to end over TLS -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    """The dev broker behind a TLS proxy that it advertises: every connection is TLS."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the test certificate")
    cert, key = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    broker_port, proxy_port = free_port(), free_port()
    proxy = TlsProxy(proxy_port, ("127.0.0.1", broker_port), cert, key)
    try:
        with DevBroker(broker_port, advertised_port=proxy_port):
            yield f"127.0.0.1:{proxy_port}", cert, proxy
    finally:
        proxy.close()


def test_generate_the_flow_and_reconcile_work_over_tls(tls_broker, tmp_path):
    bootstrap, cert, proxy = tls_broker
    topic, dlq = unique_topic("usage-tls"), unique_topic("dlq-tls")
    env = flow_environment(KAFKA_BOOTSTRAP_SERVERS=bootstrap, KAFKA_SECURITY_PROTOCOL="SSL",
                           KAFKA_SSL_CA_LOCATION=str(cert), USAGE_TOPIC=topic, DLQ_TOPIC=dlq,
                           CLICKHOUSE_URL=f"chdb://{tmp_path / 'clickhouse'}", KAFKA_STOP_AT_END="1",
                           REDIS_URL="", METRICS_PORT="0", LOG_LEVEL="WARNING")
    kafka = Settings.from_env(env).kafka.connection
    ensure_topic(kafka, dlq, 1)
    generated = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "generate", "--topic", topic, "--partitions", "2", "--count", "400",
         "--malformed", "0.05", "--very-late", "0", "--start", "2026-01-01T00:00:00Z", "--no-progress"],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert generated.returncode == 0, generated.stderr[-2000:]
    malformed = int(generated.stdout.split("malformed=")[1].split()[0])
    assert malformed > 0

    flow = subprocess.run(bytewax_command(), env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert flow.returncode == 0, flow.stderr[-3000:]
    assert len(read_topic(kafka, dlq, timeout_s=60)) == malformed  # the DLQ producer spoke TLS too
    reconciled = subprocess.run([sys.executable, "-m", "deploy.cli", "reconcile"], env=env, cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=120)
    assert reconciled.returncode == 0, reconciled.stdout[-2000:] + reconciled.stderr[-2000:]
    assert "0 differ" in reconciled.stdout

    refused_before = proxy.refused_handshakes
    with pytest.raises(KafkaUnavailableError):  # a plaintext client gets nowhere
        topic_partitions(bootstrap, topic, timeout=3)
    assert proxy.refused_handshakes > refused_before


# ---- topics checked at start ---------------------------------------------------------------


def test_a_missing_output_topic_stops_the_flow_at_start_naming_it(kafka_broker, tmp_path):
    late = unique_topic("late-missing")
    with pytest.raises(MissingTopicError, match=f"LATE_TOPIC: Kafka topic '{late}' does not exist"):
        KafkaOutputSink([kafka_broker.bootstrap], late, setting="LATE_TOPIC").list_parts()
    assert topic_partitions(kafka_broker.bootstrap, late) is None  # asking did not create it

    topic, dlq = unique_topic("usage"), unique_topic("dlq-missing")
    ensure_topic(kafka_broker.bootstrap, topic, 1)
    env = flow_environment(KAFKA_BOOTSTRAP_SERVERS=kafka_broker.bootstrap, USAGE_TOPIC=topic, DLQ_TOPIC=dlq,
                           CLICKHOUSE_URL=f"chdb://{tmp_path / 'ch'}", KAFKA_STOP_AT_END="1", METRICS_PORT="0")
    done = subprocess.run(bytewax_command(), env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert f"DLQ_TOPIC: Kafka topic '{dlq}' does not exist" in done.stderr, done.stderr[-3000:]
    assert topic_partitions(kafka_broker.bootstrap, dlq) is None
