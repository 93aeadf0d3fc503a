"""The container entrypoint: turn a StatefulSet pod's environment into a ``bytewax.run`` command.

A pod named ``tallyflow-2`` of a StatefulSet with ``TALLYFLOW_PROCESSES=3`` behind the headless
service ``tallyflow`` in namespace ``metering`` is Bytewax process 2 of 3, and every process
reaches the others at ``<pod>.<service>.<namespace>.svc.<cluster domain>:<worker port>``::

    >>> plan = plan_from_env({"POD_NAME": "tallyflow-2", "POD_NAMESPACE": "metering",
    ...                       "TALLYFLOW_PROCESSES": "3", "TALLYFLOW_SERVICE": "tallyflow"})
    >>> plan.process_id, plan.addresses[0]
    (2, 'tallyflow-0.tallyflow.metering.svc.cluster.local:2101')
    >>> bytewax_argv(plan)[1:]
    ['-m', 'bytewax.run', 'dataflows.usage:flow', '-w', '1', '-i', '2', '-a', 'tallyflow-0.tallyflow.metering.svc.cluster.local:2101;tallyflow-1.tallyflow.metering.svc.cluster.local:2101;tallyflow-2.tallyflow.metering.svc.cluster.local:2101']

Environment (the flow's own settings, e.g. ``KAFKA_BOOTSTRAP_SERVERS``, pass through untouched):

* ``POD_NAME`` (else ``HOSTNAME``): ``<statefulset>-<ordinal>``; the ordinal is the process id.
* ``TALLYFLOW_PROCESSES``: the StatefulSet's replicas (default 1; one process gets no -i/-a).
* ``TALLYFLOW_SERVICE`` (default: the StatefulSet name), ``POD_NAMESPACE`` (needed for >1 process),
  ``TALLYFLOW_CLUSTER_DOMAIN`` (default ``cluster.local``, the cluster's DNS domain).
* ``TALLYFLOW_WORKER_PORT`` (default 2101), ``TALLYFLOW_WORKERS_PER_PROCESS`` (default 1).
* ``RECOVERY_DIR`` turns recovery on; ``SNAPSHOT_INTERVAL`` and ``BACKUP_INTERVAL`` are whole
  seconds (defaults 5 and 30, as ``deploy.runner``); ``TALLYFLOW_RECOVERY_PARTITIONS`` is the
  number of recovery partitions (default ``TALLYFLOW_PROCESSES``), fixed at the first start.

Recovery partitions live on the pods' own volumes, one per pod: on its first start (an empty
``RECOVERY_DIR``) pod *k* creates partition *k* of ``TALLYFLOW_RECOVERY_PARTITIONS`` and pods
with a higher ordinal create none. So every partition exists exactly once in the cluster, and
adding pods later never adds an empty copy of a partition that holds state elsewhere (Bytewax
would be free to pick the empty copy). The price: at least ``TALLYFLOW_RECOVERY_PARTITIONS``
pods must run, or Bytewax stops with ``MissingPartitionsError`` (see deploy/README.md).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from dataflows.settings import SettingsError, env_integer
from deploy.runner import REPO_ROOT, bytewax_command, init_recovery_store

log = logging.getLogger("tallyflow.entrypoint")

DEFAULT_WORKER_PORT = 2101
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
DEFAULT_SNAPSHOT_S = 5  # as deploy.runner.bytewax_command
DEFAULT_BACKUP_S = 30
_POD_NAME_RE = re.compile(r"^(?P<statefulset>[a-z0-9]([-a-z0-9]*[a-z0-9])?)-(?P<ordinal>\d+)$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class EntrypointError(ValueError):
    """The pod's environment cannot be turned into a Bytewax command; the message says why."""


@dataclass(frozen=True)
class LaunchPlan:
    """Everything the entrypoint decided, before anything touches the disk or execs."""

    workers_per_process: int
    process_id: int | None  # None when the cluster is a single process
    addresses: tuple[str, ...]
    recovery_dir: str | None
    snapshot_s: int
    backup_s: int
    recovery_partitions: int
    owned_partitions: tuple[int, ...]  # created here on a first start


def parse_pod_name(name: str) -> tuple[str, int]:
    """``tallyflow-2`` → ``("tallyflow", 2)``: the StatefulSet name and the pod's ordinal.

    >>> parse_pod_name("usage-meter-10")
    ('usage-meter', 10)
    """
    match = _POD_NAME_RE.match(name.strip())
    if match is None:
        raise EntrypointError(f"pod name {name!r} is not <statefulset>-<ordinal> (set POD_NAME)")
    return match.group("statefulset"), int(match.group("ordinal"))


def worker_addresses(statefulset: str, service: str, namespace: str, processes: int,
                     port: int = DEFAULT_WORKER_PORT, domain: str = DEFAULT_CLUSTER_DOMAIN) -> list[str]:
    """The stable DNS name and worker port of every pod, in ordinal order.

    >>> worker_addresses("tallyflow", "tallyflow", "ns", 2)
    ['tallyflow-0.tallyflow.ns.svc.cluster.local:2101', 'tallyflow-1.tallyflow.ns.svc.cluster.local:2101']
    """
    for what, label in (("service", service), ("namespace", namespace)):
        if not _DNS_LABEL_RE.match(label):
            raise EntrypointError(f"{what} {label!r} is not a DNS label")
    return [f"{statefulset}-{i}.{service}.{namespace}.svc.{domain.strip('.')}:{port}" for i in range(processes)]


def owned_partitions(ordinal: int, partitions: int) -> tuple[int, ...]:
    """Recovery partitions pod ``ordinal`` creates on its first start: its own, if it has one.

    >>> owned_partitions(1, 2), owned_partitions(2, 2)
    ((1,), ())
    """
    return (ordinal,) if ordinal < partitions else ()


def _integer(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    try:
        return env_integer(env, name, default, minimum)
    except SettingsError as err:
        raise EntrypointError(str(err)) from None


def plan_from_env(env: Mapping[str, str]) -> LaunchPlan:
    """Decide process id, addresses and recovery flags from a pod's environment (pure)."""
    processes = _integer(env, "TALLYFLOW_PROCESSES", 1, 1)
    workers = _integer(env, "TALLYFLOW_WORKERS_PER_PROCESS", 1, 1)
    port = _integer(env, "TALLYFLOW_WORKER_PORT", DEFAULT_WORKER_PORT, 1)
    if port > 65535:
        raise EntrypointError(f"TALLYFLOW_WORKER_PORT: not a port: {port}")
    pod_name = (env.get("POD_NAME") or env.get("HOSTNAME") or "").strip()
    if processes == 1 and not _POD_NAME_RE.match(pod_name):
        statefulset, ordinal = "", 0  # e.g. `docker run`: HOSTNAME is a container id
    else:
        statefulset, ordinal = parse_pod_name(pod_name)
    if ordinal >= processes:
        raise EntrypointError(
            f"pod {pod_name} has ordinal {ordinal} but TALLYFLOW_PROCESSES={processes}: "
            "set TALLYFLOW_PROCESSES to the StatefulSet's replicas")
    addresses: tuple[str, ...] = ()
    if processes > 1:
        namespace = (env.get("POD_NAMESPACE") or "").strip()
        if not namespace:
            raise EntrypointError("POD_NAMESPACE is required for more than one process "
                                  "(the downward API's metadata.namespace)")
        service = (env.get("TALLYFLOW_SERVICE") or "").strip() or statefulset
        domain = (env.get("TALLYFLOW_CLUSTER_DOMAIN") or "").strip() or DEFAULT_CLUSTER_DOMAIN
        addresses = tuple(worker_addresses(statefulset, service, namespace, processes, port, domain))
    recovery_dir = (env.get("RECOVERY_DIR") or "").strip() or None
    partitions = _integer(env, "TALLYFLOW_RECOVERY_PARTITIONS", processes, 1)
    return LaunchPlan(
        workers_per_process=workers,
        process_id=ordinal if processes > 1 else None,
        addresses=addresses,
        recovery_dir=recovery_dir,
        snapshot_s=_integer(env, "SNAPSHOT_INTERVAL", DEFAULT_SNAPSHOT_S, 1),
        backup_s=_integer(env, "BACKUP_INTERVAL", DEFAULT_BACKUP_S, 0),
        recovery_partitions=partitions,
        owned_partitions=owned_partitions(ordinal, partitions) if recovery_dir else (),
    )


def bytewax_argv(plan: LaunchPlan) -> list[str]:
    """``python -m bytewax.run dataflows.usage:flow -w … [-i … -a …] [-r … -s … -b …]``."""
    return bytewax_command(
        workers=plan.workers_per_process,
        recovery_dir=plan.recovery_dir,
        snapshot_s=plan.snapshot_s,
        backup_s=plan.backup_s,
        process_id=plan.process_id,
        addresses=list(plan.addresses) or None,
    )


def prepare_recovery_store(directory: str | os.PathLike, partitions: int,
                           owned: tuple[int, ...]) -> tuple[int, ...]:
    """On a first start (no ``part-*.sqlite3`` here), create the ``owned`` partitions of ``partitions``.

    Returns the indexes created (empty when the store already existed or nothing is owned).
    Partitions are made in a staging directory beside the store and moved in with a rename,
    so a crash half-way leaves either nothing or whole partitions.
    """
    store = Path(directory)
    store.mkdir(parents=True, exist_ok=True)
    for leftover in store.glob(".init-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if any(store.glob("part-*.sqlite3")) or not owned:
        return ()
    staging = Path(tempfile.mkdtemp(prefix=".init-", dir=store))
    try:
        init_recovery_store(staging, partitions)
        for index in owned:
            for file in staging.glob(f"part-{index}.sqlite3*"):
                os.replace(file, store / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return owned


def main() -> int:
    """Plan from ``os.environ``, prepare the recovery store, then exec Bytewax (never returns)."""
    from dataflows.logs import configure_logging

    configure_logging()
    try:
        plan = plan_from_env(os.environ)
    except EntrypointError as err:
        print(f"tallyflow entrypoint: error: {err}", file=sys.stderr)
        return 2
    if plan.recovery_dir is not None:
        recovery_dir = str(Path(plan.recovery_dir).resolve())
        plan = replace(plan, recovery_dir=recovery_dir)
        created = prepare_recovery_store(recovery_dir, plan.recovery_partitions, plan.owned_partitions)
        if created:
            log.warning("recovery partitions created", extra={"partitions": list(created),
                                                              "of": plan.recovery_partitions,
                                                              "recovery_dir": recovery_dir})
    argv = bytewax_argv(plan)
    log.info("starting bytewax", extra={"process_id": plan.process_id, "argv": argv[1:]})
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(REPO_ROOT)  # bytewax.run imports dataflows.usage relative to the working directory
    os.execv(argv[0], argv)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
