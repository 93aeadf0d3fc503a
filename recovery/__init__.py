"""tallyflow recovery: the resumable Kafka source and ``reconcile``, which reads the sinks' tables
back. Imports :mod:`sinks`, :mod:`operators` and :mod:`state` below it."""
