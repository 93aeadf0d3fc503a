"""Session windows of one shard: per key, sessions that merge when an event bridges them.

A session is ``[first, last + gap)``. It is emitted once the watermark passes its
end, corrected while it is within the allowed lateness, and kept one more gap
after that so no event that can still arrive could have joined it. When sessions
merge, rows already written under another start get a tombstone (a deleted row
with a higher version), so ``FINAL`` shows only the merged session::

    >>> from state.aggregations import Sum
    >>> store = SessionStore(gap_ms=10, aggregation=Sum())
    >>> store.add(("k",), 100, 1, watermark_before=0); store.add(("k",), 130, 2, watermark_before=0)
    True
    True
    >>> [(r.start_ms, r.end_ms, r.count, r.result) for r in store.emit(closing_ms=200, watermark_ms=200)]
    [(100, 110, 1, 1), (130, 140, 1, 2)]
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from state.aggregations import Aggregation
from state.windows import NO_OWED, OWED, StoreRow, row_version


@dataclass
class Session:
    first: int
    last: int
    count: int
    state: Any
    emitted_count: int = 0
    written: dict[int, int] = field(default_factory=dict)  # start → version already written


@dataclass(frozen=True)
class SessionSnapshot:
    fingerprint: str
    sessions: dict
    owed_after: int = NO_OWED
    owed_tombstones: tuple = ()  # (key, start) a provisional flush wrote and no session has


class SessionStore:
    """Sessions per key with merging, allowed lateness and tombstones.

    When sessions merge, the start of every session merged away gets a tombstone, whether
    or not this run wrote a row for it: a run interrupted by a crash may have, and the
    replay, deciding the bridging event before ever emitting, would not know.
    """

    def __init__(self, gap_ms: int, aggregation: Aggregation, allowed_lateness_ms: int = 0,
                 resume: SessionSnapshot | None = None, keep_ms: int = 0,
                 emit_after_ms: int = 0) -> None:
        self.gap_ms = gap_ms
        # Events reach the store this long after their time at the latest (the shard decides
        # them then): a session is emitted once no event still to come can extend it.
        self.emit_after_ms = emit_after_ms
        self.aggregation = aggregation
        self.allowed_lateness_ms = allowed_lateness_ms
        self.keep_ms = keep_ms
        self._sessions: dict[tuple, list[Session]] = {}
        self.owed_after = resume.owed_after if resume is not None else NO_OWED
        self._owed_tombstones: set = set(resume.owed_tombstones) if resume is not None else set()
        if resume is not None:
            if resume.fingerprint != self.fingerprint:
                raise ValueError(f"session state was built for {resume.fingerprint}, the flow "
                                 f"now uses {self.fingerprint}; start a new recovery store")
            self._sessions = {k: [Session(**vars(s)) for s in v] for k, v in resume.sessions.items()}

    @property
    def fingerprint(self) -> str:
        return f"session:{self.gap_ms}:{self.aggregation.fingerprint}:{self.allowed_lateness_ms}"

    def add(self, key: tuple, timestamp_ms: int, value: Any, watermark_before: int) -> bool:
        """Add an event unless its own minimal session is past the allowed lateness."""
        if timestamp_ms + self.gap_ms + self.allowed_lateness_ms <= watermark_before:
            return False
        agg = self.aggregation
        joined = Session(timestamp_ms, timestamp_ms, 1, agg.add(agg.create(), value, timestamp_ms))
        kept = []
        for session in self._sessions.get(key, []):
            if _overlaps(session, joined, self.gap_ms):
                joined = _merge(joined, session, agg)
            else:
                kept.append(session)
        kept.append(joined)
        kept.sort(key=lambda s: s.first)
        self._sessions[key] = kept
        return True

    def emit(self, closing_ms: int, watermark_ms: int, provisional: bool = False) -> list[StoreRow]:
        """Rows for sessions whose end ``closing_ms`` passed; forget those long settled."""
        rows: list[StoreRow] = []
        version = row_version(watermark_ms, provisional)
        owed_now = provisional or max(watermark_ms, 0) > max(self.owed_after, 0)  # as versions do
        if owed_now and self._owed_tombstones:
            rows += self._settle_owed(version)
        settle = self.allowed_lateness_ms + self.gap_ms + self.keep_ms
        complete = closing_ms - self.emit_after_ms
        for key in list(self._sessions):
            sessions = self._sessions[key]
            for session in sessions:
                end = session.last + self.gap_ms
                if end <= complete and session.count != session.emitted_count and (
                        session.emitted_count != OWED or owed_now):
                    rows.extend(self._rows(key, session, end, version))
            remaining = [s for s in sessions if s.last + self.gap_ms + settle > watermark_ms
                         or s.count != s.emitted_count]
            if remaining:
                self._sessions[key] = remaining
            else:
                del self._sessions[key]
        return rows

    def _rows(self, key: tuple, session: Session, end: int, version: int) -> list[StoreRow]:
        rows = [StoreRow(key, start, start + self.gap_ms, 0, 0, version, True)
                for start in session.written if start != session.first]
        result = self.aggregation.result(session.state, end, session.first)
        rows.append(StoreRow(key, session.first, end, session.count, result, version,
                             session.count == 0))
        session.written = {session.first: version}
        session.emitted_count = session.count
        return rows

    def owe(self, rows: list[StoreRow], watermark_ms: int) -> None:
        """A provisional flush wrote ``rows``: write each again, for real, or delete it, at
        the first emission after ``watermark_ms``."""
        self.owed_after = watermark_ms
        for row in rows:
            if row.is_deleted:
                continue
            session = self._starting_at(row.key, row.start_ms)
            if session is None:
                self._owed_tombstones.add((row.key, row.start_ms))
            else:
                session.emitted_count = OWED

    def _starting_at(self, key: tuple, start_ms: int) -> Session | None:
        for session in self._sessions.get(key, ()):
            if session.first == start_ms:
                return session
        return None

    def _settle_owed(self, version: int) -> list[StoreRow]:
        rows = []
        for key, start in sorted(self._owed_tombstones):
            session = self._starting_at(key, start)
            if session is None:
                rows.append(StoreRow(key, start, start + self.gap_ms, 0, 0, version, True))
            else:
                session.emitted_count = OWED
        self._owed_tombstones.clear()
        return rows

    def open_sessions(self) -> int:
        return sum(len(v) for v in self._sessions.values())

    def copy(self) -> SessionStore:
        """An independent copy, as a resume from :meth:`snapshot` would build."""
        twin = SessionStore(self.gap_ms, self.aggregation, self.allowed_lateness_ms, None,
                            self.keep_ms, self.emit_after_ms)
        twin.owed_after = self.owed_after
        twin._owed_tombstones = set(self._owed_tombstones)
        twin._sessions = {key: [_copied(session) for session in sessions]
                          for key, sessions in self._sessions.items()}
        return twin

    def snapshot(self) -> SessionSnapshot:
        return SessionSnapshot(self.fingerprint, {
            key: [_copied(session) for session in sessions]
            for key, sessions in self._sessions.items()
        }, self.owed_after, tuple(sorted(self._owed_tombstones)))


def _copied(session: Session) -> Session:
    """A session that shares nothing mutable with ``session``."""
    return Session(session.first, session.last, session.count, copy.deepcopy(session.state),
                   session.emitted_count, dict(session.written))


def _overlaps(a: Session, b: Session, gap: int) -> bool:
    return a.first < b.last + gap and b.first < a.last + gap


def _merge(joined: Session, existing: Session, agg: Aggregation) -> Session:
    """``existing`` taken into the session an event is ``joined`` to: the existing session's
    start may have been written (by this run or by one a crash interrupted), the new event's
    never was (it joins as soon as it is decided)."""
    a, b = joined, existing
    written = {**a.written, **b.written, b.first: 0}
    return Session(min(a.first, b.first), max(a.last, b.last), a.count + b.count,
                   agg.merge(a.state, b.state), -2, written)
