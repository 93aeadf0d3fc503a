"""How every tallyflow Kafka client connects: bootstrap servers plus TLS/SASL settings.

One place builds the librdkafka configuration of every client (the flow's source, the DLQ,
late and alerts producers, ``reconcile``, ``generate``, the topic checks), so a security
setting given once reaches all of them. Settings come from the environment::

    KAFKA_CONFIG_FILE               a librdkafka properties file (key=value lines, # comments)
    KAFKA_SECURITY_PROTOCOL         PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL
    KAFKA_SASL_MECHANISM            PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, ...
    KAFKA_SASL_USERNAME
    KAFKA_SASL_PASSWORD_FILE        a file holding the password (e.g. a mounted Secret)
    KAFKA_SSL_CA_LOCATION           CA certificate(s) that signed the brokers' certificates
    KAFKA_SSL_CERTIFICATE_LOCATION  client certificate, for mutual TLS
    KAFKA_SSL_KEY_LOCATION          its private key
    KAFKA_SSL_KEY_PASSWORD_FILE     a file holding the key's password

The variables win over the properties file. Secrets are read from files only, at start-up,
and never appear in a ``repr``, a log line or an error message:

    >>> security = KafkaSecurity.from_env({"KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
    ...     "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "KAFKA_SASL_USERNAME": "metering"},
    ...     read_secret=lambda path: "hunter2")
    Traceback (most recent call last):
    ...
    sinks.kafka_client.KafkaConfigError: KAFKA_SASL_PASSWORD_FILE: SASL mechanism SCRAM-SHA-512 needs a password; mount it as a file and name the file here
    >>> security = KafkaSecurity.from_env({"KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
    ...     "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "KAFKA_SASL_USERNAME": "metering",
    ...     "KAFKA_SASL_PASSWORD_FILE": "/run/secrets/kafka"}, read_secret=lambda path: "hunter2")
    >>> security
    KafkaSecurity(sasl.mechanism='SCRAM-SHA-512', sasl.password=<redacted>, sasl.username='metering', security.protocol='SASL_SSL')
    >>> KafkaConnection("b1:9093", security).config({"group.id": "g"})["sasl.password"]
    'hunter2'

This module imports nothing from tallyflow, so it can sit in whichever layer holds the
settings; the clients are created only through :class:`KafkaConnection`.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_PASSWORD_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# Set by each client for itself, never by the shared security settings.
_NOT_SECURITY = ("bootstrap.servers", "group.id", "client.id", "transactional.id")
_SECRET_WORDS = ("password", "secret", "token", "key.pem", "keystore", "jaas")

# Environment variable → librdkafka property (values given as they are).
_PLAIN_VARIABLES = {
    "KAFKA_SECURITY_PROTOCOL": "security.protocol",
    "KAFKA_SASL_MECHANISM": "sasl.mechanism",
    "KAFKA_SASL_USERNAME": "sasl.username",
    "KAFKA_SSL_CA_LOCATION": "ssl.ca.location",
    "KAFKA_SSL_CERTIFICATE_LOCATION": "ssl.certificate.location",
    "KAFKA_SSL_KEY_LOCATION": "ssl.key.location",
}
# Environment variable naming a file → the librdkafka property that gets the file's content.
_SECRET_FILE_VARIABLES = {
    "KAFKA_SASL_PASSWORD_FILE": "sasl.password",
    "KAFKA_SSL_KEY_PASSWORD_FILE": "ssl.key.password",
}
_FILE_VARIABLES = ("KAFKA_SSL_CA_LOCATION", "KAFKA_SSL_CERTIFICATE_LOCATION", "KAFKA_SSL_KEY_LOCATION")


class KafkaConfigError(ValueError):
    """The Kafka security settings cannot work; the message names the variable (never a secret)."""


def is_secret(key: str) -> bool:
    """Whether librdkafka property ``key`` holds a secret that must never be shown.

    >>> is_secret("sasl.password"), is_secret("ssl.key.password"), is_secret("sasl.username")
    (True, True, False)
    """
    return any(word in key.lower() for word in _SECRET_WORDS)


def redacted(config: Mapping[str, object]) -> dict[str, object]:
    """``config`` with every secret value replaced, safe to log.

    >>> redacted({"sasl.username": "u", "sasl.password": "p"})
    {'sasl.username': 'u', 'sasl.password': '<redacted>'}
    """
    return {key: "<redacted>" if is_secret(key) else value for key, value in config.items()}


def parse_properties(text: str, source: str) -> dict[str, str]:
    """A librdkafka properties file: ``key=value`` lines, ``#``/``!`` comments, blanks ignored.

    >>> parse_properties("# TLS\\nsecurity.protocol = SSL\\n\\nssl.ca.location=/ca.pem\\n", "f")
    {'security.protocol': 'SSL', 'ssl.ca.location': '/ca.pem'}
    """
    properties = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "!")):
            continue
        key, sep, value = stripped.partition("=")
        key = key.strip()
        if not sep or not key:
            raise KafkaConfigError(f"{source} line {number}: expected key=value, got a line "
                                   f"of {len(stripped)} characters without '='")
        if key in _NOT_SECURITY:
            raise KafkaConfigError(f"{source} line {number}: {key} is set per client by tallyflow "
                                   "(use KAFKA_BOOTSTRAP_SERVERS for the brokers); remove it")
        properties[key] = value.strip()
    return properties


def _read_file(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


@dataclass(frozen=True)
class KafkaSecurity:
    """librdkafka properties every client gets (TLS, SASL...), as sorted ``(key, value)`` pairs."""

    properties: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *,
                 read_secret: Callable[[str], str] = _read_file) -> "KafkaSecurity":
        """Read the ``KAFKA_*`` security variables (see the module docstring); checks them."""
        env = os.environ if env is None else env
        properties: dict[str, str] = {}
        config_file = (env.get("KAFKA_CONFIG_FILE") or "").strip()
        if config_file:
            try:
                properties.update(parse_properties(read_secret(config_file), f"KAFKA_CONFIG_FILE {config_file}"))
            except OSError as err:
                raise KafkaConfigError(f"KAFKA_CONFIG_FILE: cannot read {config_file}: "
                                       f"{err.strerror or type(err).__name__}") from None
        for variable, key in _PLAIN_VARIABLES.items():
            value = (env.get(variable) or "").strip()
            if value:
                properties[key] = value
        for variable, key in _SECRET_FILE_VARIABLES.items():
            path = (env.get(variable) or "").strip()
            if path:
                try:
                    properties[key] = read_secret(path).rstrip("\r\n")
                except OSError as err:
                    raise KafkaConfigError(f"{variable}: cannot read {path}: "
                                           f"{err.strerror or type(err).__name__}") from None
        if "security.protocol" in properties:
            properties["security.protocol"] = properties["security.protocol"].upper()
        security = cls(tuple(sorted(properties.items())))
        security.check(env)
        return security

    def check(self, env: Mapping[str, str]) -> None:
        """Loud errors for settings that would fail later, or silently connect in the clear."""
        props = dict(self.properties)
        protocol = props.get("security.protocol", "PLAINTEXT").upper()
        if protocol not in PROTOCOLS:
            raise KafkaConfigError(f"KAFKA_SECURITY_PROTOCOL: {props['security.protocol']!r} is not "
                                   f"one of {', '.join(PROTOCOLS)}")
        sasl_keys = sorted(k for k in props if k.startswith("sasl."))
        if sasl_keys and not protocol.startswith("SASL_"):
            raise KafkaConfigError(f"KAFKA_SECURITY_PROTOCOL: {sasl_keys} are set but the protocol is "
                                   f"{protocol}, which would not use them; use SASL_SSL (or SASL_PLAINTEXT)")
        if protocol.startswith("SASL_"):
            mechanism = props.get("sasl.mechanism", "GSSAPI").upper()
            if mechanism in _PASSWORD_MECHANISMS:
                if not props.get("sasl.username"):
                    raise KafkaConfigError(f"KAFKA_SASL_USERNAME: SASL mechanism {mechanism} needs a user name")
                if not props.get("sasl.password"):
                    raise KafkaConfigError(f"KAFKA_SASL_PASSWORD_FILE: SASL mechanism {mechanism} needs a "
                                           "password; mount it as a file and name the file here")
        for variable in _FILE_VARIABLES:
            path = (env.get(variable) or "").strip()
            if path and not os.path.isfile(path):
                raise KafkaConfigError(f"{variable}: no such file: {path}")

    def __repr__(self) -> str:
        shown = ", ".join(f"{key}={value!r}" for key, value in redacted(dict(self.properties)).items())
        return f"KafkaSecurity({shown})".replace("'<redacted>'", "<redacted>")


@dataclass(frozen=True)
class KafkaConnection:
    """Where and how to connect: the one builder of every tallyflow Kafka client's config."""

    bootstrap_servers: str
    security: KafkaSecurity = KafkaSecurity()

    def config(self, settings: Mapping[str, object] | None = None) -> dict[str, object]:
        """The librdkafka config of one client: bootstrap, the security properties, ``settings``.

        A client's own ``settings`` cannot replace a security property (a typo there must not
        turn TLS off):

        >>> tls = KafkaConnection("b:9093", KafkaSecurity((("security.protocol", "SSL"),)))
        >>> tls.config({"linger.ms": 5})
        {'bootstrap.servers': 'b:9093', 'security.protocol': 'SSL', 'linger.ms': 5}
        >>> tls.config({"security.protocol": "PLAINTEXT"})
        Traceback (most recent call last):
        ...
        sinks.kafka_client.KafkaConfigError: a client may not override security.protocol
        """
        config: dict[str, object] = {"bootstrap.servers": self.bootstrap_servers, **dict(self.security.properties)}
        for key, value in (settings or {}).items():
            if key in config:
                raise KafkaConfigError(f"a client may not override {key}")
            config[key] = value
        return config

    def consumer(self, settings: Mapping[str, object] | None = None) -> "KafkaConsumer":
        return KafkaConsumer(self.config(settings), self.secrets())

    def producer(self, settings: Mapping[str, object] | None = None) -> "KafkaProducer":
        return KafkaProducer(self.config(settings), self.secrets())

    def admin(self, settings: Mapping[str, object] | None = None) -> "KafkaAdmin":
        return KafkaAdmin(self.config(settings), self.secrets())

    def secrets(self) -> tuple[str, ...]:
        """The secret values of the security settings (to scrub from any text shown)."""
        return tuple(value for key, value in self.security.properties if is_secret(key) and value)

    def __repr__(self) -> str:
        return f"KafkaConnection({self.bootstrap_servers!r}, {self.security!r})"


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with every secret value replaced.

    >>> scrub("login failed for pw hunter2", ("hunter2",))
    'login failed for pw <redacted>'
    """
    for secret in secrets:
        text = text.replace(secret, "<redacted>")
    return text


class _RecentErrors:
    """A client's last few errors from librdkafka (its ``error_cb``), bounded, secrets scrubbed."""

    _CAUSES = (KafkaError._AUTHENTICATION, KafkaError._SSL, KafkaError._RESOLVE,
               KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError.TOPIC_AUTHORIZATION_FAILED,
               KafkaError.CLUSTER_AUTHORIZATION_FAILED)

    def _init_errors(self, config: dict[str, object], secrets: tuple[str, ...]) -> dict[str, object]:
        self._errors: deque[KafkaError] = deque(maxlen=8)
        self._secrets = secrets
        return {**config, "error_cb": self._errors.append}

    def connection_problem(self) -> str | None:
        """Why the brokers could not be used, if librdkafka said so: authentication, TLS, DNS."""
        for error in reversed(self._errors):
            if error.code() in self._CAUSES:
                return scrub(error.str(), self._secrets)
        return None


class KafkaConsumer(_RecentErrors, Consumer):
    def __init__(self, config: dict[str, object], secrets: tuple[str, ...] = ()) -> None:
        super().__init__(self._init_errors(config, secrets))


class KafkaProducer(_RecentErrors, Producer):
    def __init__(self, config: dict[str, object], secrets: tuple[str, ...] = ()) -> None:
        super().__init__(self._init_errors(config, secrets))


class KafkaAdmin(_RecentErrors, AdminClient):
    def __init__(self, config: dict[str, object], secrets: tuple[str, ...] = ()) -> None:
        super().__init__(self._init_errors(config, secrets))


class KafkaUnavailableError(RuntimeError):
    """The brokers could not be reached or refused this client; says why when librdkafka knows."""


def list_topics(client: KafkaConsumer | KafkaProducer | KafkaAdmin, what: str, timeout_s: float = 10.0):
    """``client.list_topics()``; on failure a KafkaUnavailableError with the cause (e.g. SASL).

    Call it before a consumer is assigned partitions: on failure it serves the client's
    callbacks (``poll``) to learn the cause.
    """
    try:
        return client.list_topics(timeout=timeout_s)
    except KafkaException as err:
        client.poll(0.2)  # serve error_cb: the reason comes separately from librdkafka
        cause = client.connection_problem()
        detail = f"{err.args[0].str() if err.args else err}" + (f"; cause: {cause}" if cause else "")
        raise KafkaUnavailableError(f"{what}: cannot reach the Kafka brokers: {detail}") from None


class MissingTopicError(RuntimeError):
    """A topic the flow writes to or reads from does not exist (or cannot be described)."""


def require_topic(client: KafkaConsumer | KafkaProducer | KafkaAdmin, topic: str, setting: str,
                  timeout_s: float = 10.0) -> int:
    """The partition count of ``topic``; MissingTopicError naming it and ``setting`` if absent.

    Asks for the metadata of all topics, not of ``topic`` by name: a broker with topic
    auto-creation (Tansu, or Kafka's ``auto.create.topics.enable``) would create it with
    defaults the operator never chose.
    """
    metadata = list_topics(client, setting, timeout_s)
    found = metadata.topics.get(topic)
    if found is None:
        raise MissingTopicError(
            f"{setting}: Kafka topic {topic!r} does not exist on {metadata.orig_broker_name}; "
            "create it (e.g. `tallyflow broker --topic`, or your cluster's tooling) or fix "
            f"{setting} before starting the flow")
    if found.error is not None or not found.partitions:
        reason = found.error.str() if found.error is not None else "it has no partitions"
        raise MissingTopicError(f"{setting}: Kafka topic {topic!r} cannot be used: {reason}")
    return len(found.partitions)


def as_connection(where: "KafkaConnection | str | list[str] | tuple[str, ...]") -> KafkaConnection:
    """A connection from a connection, or from bootstrap servers alone (plaintext, no SASL).

    >>> as_connection(["a:9092", "b:9092"]).bootstrap_servers
    'a:9092,b:9092'
    """
    if isinstance(where, KafkaConnection):
        return where
    if isinstance(where, str):
        return KafkaConnection(where)
    return KafkaConnection(",".join(where))
