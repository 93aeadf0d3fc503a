"""A password given to tallyflow never appears in its output, even when the configuration is bad.

Each run below gets a configuration with a known password that cannot work, and everything the
process prints (stdout, stderr, logs, tracebacks) is searched for it. The Kafka SASL password
is covered in ``test_kafka_security.py``.
"""

from __future__ import annotations

import subprocess
import sys

from dataflows.settings import Settings
from deploy.broker import ensure_topic
from deploy.generator import generate, produce
from deploy.runner import REPO_ROOT, bytewax_command, flow_environment
from support.kafka import unique_topic

PASSWORD = "Sekr3t-9d2c-never-shown"


def run(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    return done.returncode, done.stdout + done.stderr


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "deploy.cli", *args]


def test_settings_show_urls_without_their_passwords():
    settings = Settings.from_env({"CLICKHOUSE_URL": f"https://metering:{PASSWORD}@ch:8443/billing",
                                  "REDIS_URL": f"rediss://default:{PASSWORD}@cache:6380/0"})
    shown = repr(settings)
    assert PASSWORD not in shown
    assert "https://metering:***@ch:8443/billing" in shown and "rediss://default:***@cache:6380/0" in shown
    assert settings.clickhouse.url.endswith(f"{PASSWORD}@ch:8443/billing")  # the value itself is intact


def test_a_redis_url_with_an_unexpected_scheme_is_refused_without_its_password(kafka_broker):
    env = flow_environment(KAFKA_BOOTSTRAP_SERVERS=kafka_broker.bootstrap, REDIS_URL=f"http://:{PASSWORD}@cache:6379/0",
                           METRICS_PORT="0")
    status, output = run(bytewax_command(), env)
    assert status != 0 and "REDIS_URL: use redis://" in output, output[-2000:]
    assert "http://:***@cache:6379/0" in output
    assert PASSWORD not in output


def test_a_clickhouse_password_is_never_printed(kafka_broker, dev_clickhouse):
    wrong_url = dev_clickhouse.url.replace(dev_clickhouse.password, PASSWORD)
    topic, dlq = unique_topic("usage"), unique_topic("dlq")
    ensure_topic(kafka_broker.bootstrap, topic, 1)
    ensure_topic(kafka_broker.bootstrap, dlq, 1)
    produce(kafka_broker.bootstrap, topic, generate(20, seed=3, partitions=1, start_ms=1_767_225_600_000))
    env = flow_environment(KAFKA_BOOTSTRAP_SERVERS=kafka_broker.bootstrap, USAGE_TOPIC=topic, DLQ_TOPIC=dlq,
                           CLICKHOUSE_URL=wrong_url, KAFKA_STOP_AT_END="1", REDIS_URL="", METRICS_PORT="0")
    runs = {
        "flow": bytewax_command(),  # fails fast: refused credentials are not retried
        "query": cli("query", "SELECT 1"),
        "migrate": cli("migrate"),
        "migrate --url": cli("migrate", "--url", wrong_url),
    }
    for name, command in runs.items():
        status, output = run(command, env)
        assert status != 0, (name, output[-2000:])
        assert "Authentication failed" in output or "authentication failed" in output, (name, output[-2000:])
        assert PASSWORD not in output, name
