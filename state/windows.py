"""Open windows of one shard: exact count and scaled-integer sum per key and window.

    >>> from state.window_kinds import TumblingWindows
    >>> store = WindowStore(TumblingWindows(60_000))
    >>> store.add(0, ("org", "cust", "api_calls"), 1_500_000_000_000_000_000)
    >>> [(r.event_count, r.total_scaled) for r in store.emit_closed(closing_ms=60_000, watermark_ms=60_000)]
    [(1, 1500000000000000000)]
    >>> store.open_windows()
    0
"""

from __future__ import annotations

import bisect
import copy
from dataclasses import dataclass, field
from itertools import compress, groupby, repeat
from operator import attrgetter, is_, ne, not_
from typing import Callable, Iterable

from state.compiled import compiled_function
from state.packing import compressed, pack_key_columns, unpack_entries, unpack_key_columns
from state.records import WindowRow, WindowRowBlock
from state.window_kinds import WindowKind

WindowKey = tuple  # (organization_id, external_customer_id, code)
END_OF_TIME = 2**63
NO_OWED = -(2**63)

OWED = -1
"""``emitted_count`` of a row a provisional flush wrote: re-emit it (or its tombstone) for real."""

_ROW_START = attrgetter("window_start_ms")
_ROW_KEY = attrgetter("organization_id", "external_customer_id", "code")


def row_version(watermark_ms: int, provisional: bool = False) -> int:
    """The version of a row emitted at the flow watermark ``watermark_ms``.

    What a shard has decided at a watermark depends only on the input (every event whose
    windows the watermark has passed, in event-time order), so a row emitted at a higher
    watermark never holds less settled data: versions only grow, across replays too, even
    where an interrupted run wrote a higher event count. A provisional row (the end of
    input flushes windows the watermark has not passed) outranks real rows of the same
    watermark and loses to any later one.

    >>> row_version(1_000) < row_version(1_000, provisional=True) < row_version(1_001)
    True
    """
    return max(watermark_ms, 0) * 4 + (2 if provisional else 1)


@dataclass(frozen=True)
class WindowSnapshot:
    """Open windows: ``{start: segments}``, each a tuple of ``pack_window`` bytes (large ones
    compressed: ``state.packing.compressed``), oldest first; a later segment's aggregate
    replaces an earlier one's (see ``WindowStore.snapshot``). A segment ``OWED`` (the int)
    marks every aggregate of the segments before it owed (a provisional flush wrote the whole
    window: see ``WindowStore.owe``).

    (Earlier snapshots hold one ``bytes`` per window, or before that
    ``{start: {key: (count, total, emitted)}}``; a store resumes from any of them.)
    """

    fingerprint: str
    windows: dict[int, tuple[bytes | int, ...] | bytes | dict[WindowKey, tuple[int, int, int]]]
    owed_after: int = NO_OWED  # see WindowStore.owe


def pack_window(keys: dict[WindowKey, list[int]]) -> bytes:
    """One window's ``{key: [count, total_scaled, emitted]}`` as compact bytes (``state.packing``
    format 3, what a store's snapshots hold).

        >>> packed = pack_window({("o", "c", "x"): [2, -10**40, 1], ("o", "d", "x"): [1, 5, 0]})
        >>> unpack_window(packed)
        {('o', 'c', 'x'): [2, -10000000000000000000000000000000000000000, 1], ('o', 'd', 'x'): [1, 5, 0]}
    """
    return _Window.of(keys).packed(0, [])


def unpack_window(packed: bytes) -> dict[WindowKey, list[int]]:
    """The aggregates ``pack_window`` packed (or an earlier release), as ``{key: [count,
    total_scaled, emitted]}``."""
    return unpack_entries(packed, key_width=3)


def _compiled(name: str) -> Callable | None:
    """The compiled fast path's function ``name`` (``state/_fastwindows.c``, built by ``make
    install``) at :data:`_INTERFACE`, or None: groups are added then in pure Python, slower, the same."""
    return compiled_function("state._fastwindows", _INTERFACE, name)


_INTERFACE = 1
"""The version of ``state/_fastwindows.c``'s functions this module calls (its ``INTERFACE``)."""

_fast_add_known = _compiled("add_known")
"""What :meth:`WindowStore.add_groups` uses; tests set it to None for the pure path."""


class _Window:
    """One window's aggregates as columns: its ``keys`` in the order they came, ``positions``
    (key → index in ``keys``), and per index the event count, the scaled sum and the emitted
    count (``OWED``: see ``WindowStore.owe``). Keys leave only with their window, so a key's
    index never changes: a snapshot packs the keys after the first ``done`` as the new ones.

    Columns of integers, not a ``[count, total, emitted]`` list per key: adding a window's new
    keys appends to four lists, a first emission reads and records its columns whole, and a
    copy copies five containers instead of a list per key.

    ``positions`` is built at the first look-up: at one row per event a usage window takes its
    keys in one decision, is emitted and forgotten, and never needs one (a dict insert per key,
    ~0.3 µs, saved).

        >>> window = _Window()
        >>> window.extend([("o", "c", "x"), ("o", "d", "x")], [2, 1], [7, 3])
        >>> window.aggregates()
        {('o', 'c', 'x'): [2, 7, 0], ('o', 'd', 'x'): [1, 3, 0]}
    """

    __slots__ = ("keys", "_positions", "counts", "totals", "emitted")

    def __init__(self) -> None:
        self.keys: list[WindowKey] = []
        self._positions: dict[WindowKey, int] | None = None  # see positions
        self.counts: list[int] = []
        self.totals: list[int] = []
        self.emitted: list[int] = []

    @classmethod
    def of(cls, aggregates: dict[WindowKey, Iterable[int]]) -> _Window:
        """The window of ``{key: (count, total_scaled, emitted)}``, in its order."""
        window = cls()
        if aggregates:
            window.extend(list(aggregates), *zip(*aggregates.values()))
        return window

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def positions(self) -> dict[WindowKey, int]:
        """Each key's index in ``keys``."""
        if self._positions is None:
            self._positions = dict(zip(self.keys, range(len(self.keys))))
        return self._positions

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Window) and (self.keys, self.counts, self.totals, self.emitted) == \
            (other.keys, other.counts, other.totals, other.emitted)

    def extend(self, keys: list[WindowKey], counts: Iterable[int], totals: Iterable[int],
               emitted: Iterable[int] | None = None) -> None:
        """Append new ``keys`` (none already here) with their aggregates (emitted 0 unless given)."""
        held = len(self.keys)
        self.keys += keys
        if self._positions is not None:
            self._positions.update(zip(keys, range(held, len(self.keys))))
        self.counts += counts
        self.totals += totals
        self.emitted += repeat(0, len(keys)) if emitted is None else emitted

    def aggregates(self) -> dict[WindowKey, list[int]]:
        """``{key: [count, total_scaled, emitted]}``, in order."""
        return dict(zip(self.keys, map(list, zip(self.counts, self.totals, self.emitted))))

    def merge(self, keys: list[WindowKey], counts: list[int], totals: list[int],
              emitted: list[int]) -> None:
        """Take ``keys``' aggregates (a later snapshot segment's), replacing those it holds."""
        if not self.keys:
            self.extend(keys, counts, totals, emitted)
            return
        positions = list(map(self.positions.get, keys))
        new = list(map(is_, positions, repeat(None)))
        self.extend(list(compress(keys, new)), compress(counts, new), compress(totals, new),
                    compress(emitted, new))
        for position, count, total, was_emitted in zip(positions, counts, totals, emitted):
            if position is not None:
                self.counts[position], self.totals[position] = count, total
                self.emitted[position] = was_emitted

    def packed(self, done: int, before: list[int]) -> bytes:
        """The keys after the first ``done``, then those at positions ``before`` (below
        ``done``), with their aggregates, as bytes (``pack_key_columns``, ``compressed``);
        the columns themselves when that is every key."""
        columns = [self.keys, self.counts, self.totals, self.emitted]
        if done or before:
            parts = [column[done:] for column in columns]
            for part, column in zip(parts, columns):
                part += map(column.__getitem__, before)
            columns = parts
        return compressed(pack_key_columns(columns[0], columns[1:]))

    def copy(self) -> _Window:
        twin = _Window()
        twin.keys = self.keys[:]
        twin._positions = None if self._positions is None else self._positions.copy()
        twin.counts, twin.totals, twin.emitted = self.counts[:], self.totals[:], self.emitted[:]
        return twin


class WindowStore:
    """Keeps aggregates until the watermark passes a window's end, then emits its rows.

    Each aggregate is ``[count, total_scaled, emitted_count]`` (a window holds them as
    columns: ``_Window``). A row's version comes from the watermark it is emitted at
    (:func:`row_version`), so a later emission always replaces an earlier one in ClickHouse,
    across replays too.
    """

    def __init__(self, windows: WindowKind, resume: WindowSnapshot | None = None,
                 allowed_lateness_ms: int = 0, grain: str = "", keep_ms: int = 0,
                 emit_after_ms: int = 0) -> None:
        self.windows = windows
        self.allowed_lateness_ms = allowed_lateness_ms
        self.keep_ms = keep_ms  # how much longer than the lateness a window must stay open
        # How long after a window's end its last events are decided (sliding windows): its
        # row is written then, whole, rather than once per slide.
        self.emit_after_ms = emit_after_ms
        self.grain = grain
        self.owed_after = resume.owed_after if resume is not None else NO_OWED
        self._open: dict[int, _Window] = {}
        self._segments: dict[int, list[bytes]] = {}  # what the snapshots hold, per window
        self._segment_entries: dict[int, int] = {}  # aggregates in a window's segments
        # What the next snapshot packs: a window's keys after its first ``_packed[start]``
        # (those added since the last snapshot: nothing per key to note when adding), and
        # ``_changed[start]``, the positions of aggregates changed since, in the order they
        # changed. A window missing from ``_packed`` is packed whole.
        self._packed: dict[int, int] = {}
        self._changed: dict[int, dict[int, None]] = {}
        if resume is not None:
            if resume.fingerprint != windows.fingerprint:
                raise ValueError(
                    f"window state was built for {resume.fingerprint}, the flow now uses "
                    f"{windows.fingerprint}; start a new recovery store to change windows"
                )
            for start, packed in resume.windows.items():
                self._resume_window(start, packed)

    def _resume_window(self, start: int, packed) -> None:
        if isinstance(packed, dict):  # a snapshot from before packing: packed at the next one
            self._open[start] = _Window.of(packed)
            return
        segments = [packed] if isinstance(packed, bytes) else list(packed)
        window, entries = _Window(), 0
        for segment in segments:
            if segment.__class__ is int:  # OWED: every aggregate so far
                window.emitted = [OWED] * len(window)
                continue
            keys, columns = unpack_key_columns(segment)
            if keys:
                window.merge(keys, *columns)
            entries += len(keys)
        self._open[start], self._segments[start] = window, segments
        self._segment_entries[start], self._packed[start] = entries, len(window)

    def _window(self, start_ms: int) -> _Window:
        window = self._open.get(start_ms)
        if window is None:
            window = self._open[start_ms] = _Window()
        return window

    def add(self, start_ms: int, key: WindowKey, value_scaled: int) -> None:
        self.add_group(start_ms, key, 1, value_scaled)

    def add_group(self, start_ms: int, key: WindowKey, count: int, total_scaled: int) -> None:
        """Add ``count`` events summing to ``total_scaled`` at once (a batch pre-aggregated)."""
        window = self._window(start_ms)
        position = window.positions.get(key)
        if position is None:  # the next snapshot packs the window's new keys
            window.extend([key], (count,), (total_scaled,))
        else:
            window.counts[position] += count
            window.totals[position] += total_scaled
            self._changed_in(start_ms)[position] = None

    def add_groups(self, start_ms: int, keys: list[WindowKey], counts: list[int],
                   totals: list[int]) -> None:
        """``add_group`` for each of ``keys`` (distinct) in order, at once: the window's new
        keys are appended in bulk.

            >>> from state.window_kinds import TumblingWindows
            >>> store = WindowStore(TumblingWindows(60_000))
            >>> store.add(0, ("o", "c", "x"), 5)
            >>> store.add_groups(0, [("o", "d", "x"), ("o", "c", "x")], [2, 3], [7, 1])
            >>> store._open[0].aggregates()
            {('o', 'c', 'x'): [4, 6, 0], ('o', 'd', 'x'): [2, 7, 0]}
        """
        if not keys:
            return
        window = self._window(start_ms)
        if not window:  # every key is new
            window.extend(keys, counts, totals)
            return
        if _fast_add_known is not None:
            self._add_compiled(start_ms, window, keys, counts, totals)
            return
        positions = list(map(window.positions.get, keys))
        new = list(map(is_, positions, repeat(None)))
        if any(new):  # the next snapshot packs the window's new keys
            window.extend(list(compress(keys, new)), compress(counts, new), compress(totals, new))
        if not all(new):  # these changed
            old = list(map(not_, new))
            self._add_to_known(start_ms, window, list(compress(positions, old)),
                               compress(counts, old), compress(totals, old))

    def _add_compiled(self, start_ms: int, window: _Window, keys: list[WindowKey], counts: list[int],
                      totals: list[int]) -> None:
        """:meth:`add_groups` on a window holding keys, by the compiled fast path: one pass adds
        the known keys' groups (their columns fetched ahead: at a key per event the time goes to
        cache misses), the new keys' come back to be appended."""
        new_keys, new_counts, new_totals, changed = _fast_add_known(
            window.positions, keys, counts, totals, window.counts, window.totals,
            self._changed.get(start_ms))
        if changed is not None:  # made at the window's first change
            self._changed[start_ms] = changed
        if new_keys:  # the next snapshot packs the window's new keys
            window.extend(new_keys, new_counts, new_totals)

    def _add_to_known(self, start_ms: int, window: _Window, positions: list[int],
                      counts: Iterable[int], totals: Iterable[int]) -> None:
        """Add each group to the aggregate at its key's position in the window."""
        window_counts, window_totals = window.counts, window.totals
        for position, count, total in zip(positions, counts, totals):
            window_counts[position] += count
            window_totals[position] += total
        self._changed_in(start_ms).update(dict.fromkeys(positions))

    def _changed_in(self, start_ms: int) -> dict[int, None]:
        changed = self._changed.get(start_ms)
        if changed is None:
            changed = self._changed[start_ms] = {}
        return changed

    def emit_closed(self, closing_ms: int, watermark_ms: int, provisional: bool = False,
                    blocks: bool = False) -> list[WindowRow | WindowRowBlock]:
        """Rows of windows ending at or before ``closing_ms``.

        Windows the real ``watermark_ms`` has passed by more than the allowed
        lateness (and ``keep_ms``) are forgotten; until then (and when only flushed
        because the input ended) they stay open, so later events correct their rows.
        A ``provisional`` emission changes nothing: the caller owes its rows (:meth:`owe`).
        With ``blocks``, a window emitted for the first time gives one ``WindowRowBlock``
        (its rows as columns) instead of a ``WindowRow`` per key.
        """
        rows: list[WindowRow] = []
        version = row_version(watermark_ms, provisional)
        owed_now = provisional or max(watermark_ms, 0) > max(self.owed_after, 0)  # as versions do
        complete = closing_ms - self.emit_after_ms
        for start in sorted(self._open):
            end = self.windows.window_end(start)
            if end > complete:
                break
            window = self._open[start]
            emitted, positions = self._rows(start, end, window, self.grain, version, owed_now,
                                            record=not provisional, blocks=blocks)
            if provisional:  # changes nothing: the caller owes the rows (see owe)
                rows.extend(emitted)
                continue
            if end + self.allowed_lateness_ms + self.keep_ms <= watermark_ms and \
                    OWED not in window.emitted:  # no provisional row still waits
                del self._open[start]
                self._segments.pop(start, None)
                self._segment_entries.pop(start, None)
                self._changed.pop(start, None)
            elif emitted:  # their emitted counts changed
                self._changed_in(start).update(dict.fromkeys(positions))
            rows.extend(emitted)
        return rows

    @staticmethod
    def _rows(start: int, end: int, window: _Window, grain: str, version: int, owed_now: bool,
              record: bool, blocks: bool = False) -> tuple[list[WindowRow | WindowRowBlock], Iterable[int]]:
        """The window's rows to write, and their positions; with ``record``, noted as emitted;
        with ``blocks``, a first emission as one ``WindowRowBlock``."""
        counts, totals, emitted = window.counts, window.totals, window.emitted
        if counts == emitted:  # nothing changed since the last emission
            return [], ()
        if not any(emitted) and 0 not in counts:  # a first emission: every key, in bulk
            n = len(counts)
            key_list, counts, totals = window.keys[:], tuple(counts), tuple(totals)
            if record:
                window.emitted = list(counts)
            if blocks:
                return [WindowRowBlock(grain, start, end, version, key_list, counts, totals)], range(n)
            orgs, customers, codes = zip(*key_list)
            rows = list(map(WindowRow, orgs, customers, codes, repeat(start, n), repeat(end, n), counts,
                            totals, repeat(version, n), repeat(False, n), repeat(grain, n)))
            return rows, range(n)
        due = [position for position in compress(range(len(counts)), map(ne, counts, emitted))
               if owed_now or emitted[position] != OWED]
        rows = []
        for position in due:
            org, customer, code = window.keys[position]
            count = counts[position]
            rows.append(WindowRow(org, customer, code, start, end, count, totals[position], version,
                                  count == 0, grain))
            if record:
                emitted[position] = count
        return rows, due

    def owe(self, rows: Iterable, watermark_ms: int) -> None:
        """A provisional flush wrote ``rows``: write each again, for real (or delete it), at
        the first emission after ``watermark_ms``.

            >>> from state.window_kinds import TumblingWindows
            >>> store = WindowStore(TumblingWindows(60_000))
            >>> store.add(0, ("o", "c", "x"), 5)
            >>> store.owe([WindowRowBlock("", 0, 60_000, 3, [("o", "c", "x"), ("o", "d", "x")], (1, 1), (5, 2))], 0)
            >>> store._open[0].aggregates()
            {('o', 'c', 'x'): [1, 5, -1], ('o', 'd', 'x'): [0, 0, -1]}
        """
        self.owed_after = watermark_ms
        for start, window_rows in groupby(rows, _ROW_START):  # rows come window by window
            window_rows = list(window_rows)
            if len(window_rows) == 1 and window_rows[0].__class__ is WindowRowBlock:
                self._owe_window(start, window_rows[0].keys)  # a first emission: read, not copied
                continue
            owed: list = []
            for row in window_rows:
                if row.__class__ is WindowRowBlock:
                    owed += row.keys
                else:
                    owed.append(_ROW_KEY(row))
            self._owe_window(start, owed)

    def _owe_window(self, start: int, owed: list[WindowKey]) -> None:
        """Mark the window's ``owed`` keys (distinct) OWED in bulk; keys it lacks get
        ``[0, 0, OWED]``. A window owed whole is not packed again: a segment ``OWED`` marks
        what its snapshots hold owed (the next snapshot packs only its new keys)."""
        window = self._window(start)
        held = len(window)
        if held <= len(owed) and window.keys == owed[:held]:  # the scratch's window: ours, then new keys
            window.emitted = [OWED] * held
            new = owed[held:]
        else:
            positions = list(map(window.positions.get, owed))
            emitted = window.emitted
            for position in positions:
                if position is not None:
                    emitted[position] = OWED
            new = list(compress(owed, map(is_, positions, repeat(None))))
        window.extend(new, repeat(0, len(new)), repeat(0, len(new)), repeat(OWED, len(new)))
        if len(window) == len(owed):  # every key (a window never packed is packed whole anyway)
            if start in self._segments:
                self._segments[start].append(OWED)
        else:
            self._changed_in(start).update(dict.fromkeys(map(window.positions.__getitem__, owed)))

    def accepts(self, start_ms: int, watermark_before: int) -> bool:
        """Whether an event seen at ``watermark_before`` still counts in this window."""
        return self.windows.window_end(start_ms) + self.allowed_lateness_ms > watermark_before

    def open_windows(self) -> int:
        return len(self._open)

    def copy(self) -> WindowStore:
        """An independent copy (the provisional flush decides and emits on one), as a resume
        from :meth:`snapshot` would build, without packing every window to bytes and back:
        each window's columns copied, not an aggregate per key.

            >>> from state.window_kinds import TumblingWindows
            >>> store = WindowStore(TumblingWindows(60_000))
            >>> store.add(0, ("o", "c", "x"), 5)
            >>> scratch = store.copy()
            >>> scratch.add(0, ("o", "c", "x"), 1); scratch.add(0, ("o", "d", "x"), 2)
            >>> [r.total_scaled for r in scratch.emit_closed(60_000, 0, provisional=True)], store._open[0].aggregates()
            ([6, 2], {('o', 'c', 'x'): [1, 5, 0]})
        """
        twin = WindowStore(self.windows, None, self.allowed_lateness_ms, self.grain, self.keep_ms,
                           self.emit_after_ms)
        twin.owed_after = self.owed_after
        twin._open = {start: window.copy() for start, window in self._open.items()}
        twin._segments = {start: list(segments) for start, segments in self._segments.items()}
        twin._segment_entries = dict(self._segment_entries)
        twin._packed = dict(self._packed)
        twin._changed = {start: dict(changed) for start, changed in self._changed.items()}
        return twin

    def snapshot(self) -> WindowSnapshot:
        """Every open window as packed segments; only what changed since the last snapshot is
        packed, as a new segment (incremental). A window whose segments hold more than twice
        its live aggregates (superseded ones) is packed afresh as one segment, so the work is
        proportional to the changes, amortised, and the bytes to twice the state at most.

        An hour rollup at one row per event holds every key of the hour: packing it whole at
        each epoch cost as much as counting the events.

            >>> from state.window_kinds import TumblingWindows
            >>> store = WindowStore(TumblingWindows(3_600_000))
            >>> for i in range(4): store.add(0, ("o", f"c{i}", "x"), 1)
            >>> [len(unpack_window(s)) for s in store.snapshot().windows[0]]
            [4]
            >>> store.add(0, ("o", "c1", "x"), 1)
            >>> [len(unpack_window(s)) for s in store.snapshot().windows[0]]   # just the change
            [4, 1]
        """
        changed, self._changed = self._changed, {}
        for start, window in self._open.items():
            if start not in self._segments:  # never packed, or forgotten and opened again
                self._pack_changes(start, window, 0, changed.get(start, {}))
            elif (done := self._packed.get(start, 0)) < len(window) or start in changed:
                self._pack_changes(start, window, done, changed.get(start, {}))
        self._packed = {start: len(window) for start, window in self._open.items()}
        return WindowSnapshot(self.windows.fingerprint,
                              {start: tuple(segments) for start, segments in self._segments.items()},
                              self.owed_after)

    def _pack_changes(self, start: int, window: _Window, done: int, changed: dict[int, None]) -> None:
        """Append a segment of the window's aggregates added or changed since its first
        ``done`` keys were packed; or pack the window afresh, if its segments would then hold
        more than twice its aggregates, or if more than half of them changed (emitted), or if
        none is packed (the same bytes as one segment of every key)."""
        held = len(window)
        segments = self._segments.setdefault(start, [])
        entries = self._segment_entries.get(start, 0) + held - done + len(changed)  # at most
        if entries > 2 * held or 2 * len(changed) > held or not (segments or done):
            segments[:] = [window.packed(0, [])]
            self._segment_entries[start] = held
            return
        before = [position for position in changed if position < done]  # once each, in order
        segments.append(window.packed(done, before))
        self._segment_entries[start] = self._segment_entries.get(start, 0) + held - done + len(before)


@dataclass(frozen=True)
class StoreRow:
    """A generic aggregate row: key, window, event count, scaled result, version."""

    key: tuple
    start_ms: int
    end_ms: int
    count: int
    result: int
    version: int
    is_deleted: bool = False


@dataclass(frozen=True)
class AggregateSnapshot:
    fingerprint: str
    windows: dict
    carried: dict = field(default_factory=dict)  # recurring: key → [state, events so far, from]
    owed_after: int = NO_OWED


class AggregateWindowStore:
    """Fixed (tumbling, sliding or calendar) windows folding events with any catalog aggregation.

    >>> from state.aggregations import Max
    >>> from state.window_kinds import TumblingWindows
    >>> store = AggregateWindowStore(TumblingWindows(60_000), Max())
    >>> store.add(("org", "cust", ()), 1_000, 5, watermark_before=0), store.add(("org", "cust", ()), 2_000, 9, 0)
    (True, True)
    >>> [(r.count, r.result, r.version) for r in store.emit(closing_ms=60_000, watermark_ms=60_000)]
    [(2, 9, 240001)]

    With ``recurring``, a window's row folds in the state carried from every earlier
    window of its key, and once the watermark passes a window's end a key whose
    carried state still bills something gets a row there even without an event. A
    row is written again whenever the number of events behind it (the key's events so
    far) changed, so a correction of an earlier window re-emits the later ones::

        >>> from state.aggregations import Sum
        >>> running = AggregateWindowStore(TumblingWindows(60_000), Sum(), recurring=True)
        >>> running.add(("o", "c", ()), 1_000, 5, watermark_before=0)
        True
        >>> [(r.start_ms, r.count, r.result) for r in running.emit(180_000, 180_000)]
        [(0, 1, 5), (60000, 0, 5), (120000, 0, 5)]
    """

    def __init__(self, windows: WindowKind, aggregation, allowed_lateness_ms: int = 0,
                 resume: AggregateSnapshot | None = None, recurring: bool = False,
                 keep_ms: int = 0) -> None:
        if recurring and not aggregation.RECURS:
            raise ValueError(f"aggregation {aggregation.name!r} cannot be recurring")
        self.windows = windows
        self.aggregation = aggregation
        self.allowed_lateness_ms = allowed_lateness_ms
        self.keep_ms = keep_ms
        self.owed_after = resume.owed_after if resume is not None else NO_OWED
        self.recurring = recurring
        self._open: dict[int, dict[tuple, list]] = {}  # start → key → [state, count, emitted version]
        self._carried: dict[tuple, list] = {}  # key → [state at ``from``, events before ``from``, from]
        if resume is not None:
            if resume.fingerprint != self.fingerprint:
                raise ValueError(f"window state was built for {resume.fingerprint}, the flow "
                                 f"now uses {self.fingerprint}; start a new recovery store")
            self._open = {start: {k: list(v) for k, v in keys.items()}
                          for start, keys in resume.windows.items()}
            self._carried = {k: list(v) for k, v in resume.carried.items()}
        self._carry_due = -END_OF_TIME  # the watermark at which a carried key needs a new window

    @property
    def fingerprint(self) -> str:
        recurring = ":recurring" if self.recurring else ""
        return (f"{self.windows.fingerprint}:{self.aggregation.fingerprint}:"
                f"{self.allowed_lateness_ms}{recurring}")

    def add(self, key: tuple, timestamp_ms: int, value, watermark_before: int) -> bool:
        """Fold the event into each of its windows still open; False if none was."""
        agg, lateness, added = self.aggregation, self.allowed_lateness_ms, False
        for start in self.windows.starts_for(timestamp_ms):
            if self.windows.window_end(start) + lateness <= watermark_before:
                continue
            keys = self._open.setdefault(start, {})
            entry = keys.get(key)
            if entry is None:
                entry = keys[key] = [agg.create(), 0, 0]
            entry[0] = agg.add(entry[0], value, timestamp_ms)
            entry[1] += 1
            added = True
        return added

    def emit(self, closing_ms: int, watermark_ms: int, provisional: bool = False) -> list[StoreRow]:
        """Rows of the windows ending at or before ``closing_ms`` that changed since last emitted.

        Windows the real ``watermark_ms`` has passed by more than the allowed
        lateness (and ``keep_ms``) are forgotten (a recurring key keeps what it carries
        out of them). Versions come from the watermark (:func:`row_version`).
        """
        version = row_version(watermark_ms, provisional)
        owed_now = provisional or max(watermark_ms, 0) > max(self.owed_after, 0)  # as versions do
        starts = sorted(self._open)
        if self.recurring and watermark_ms >= self._carry_due:
            self._open_carried_windows(watermark_ms, starts)
        rows: list[StoreRow] = []
        running: dict[tuple, tuple] = {}  # recurring: key → (state at the window start, events so far)
        index = 0
        while index < len(starts) and (end := self.windows.window_end(start := starts[index])) <= closing_ms:
            keys = self._open[start]
            if self.recurring:
                self._emit_recurring(start, end, keys, running, rows, watermark_ms, starts,
                                     version, owed_now)
            else:
                result = self.aggregation.result
                for key, entry in keys.items():
                    if entry[1] != entry[2] and (entry[2] != OWED or owed_now):
                        rows.append(StoreRow(key, start, end, entry[1], result(entry[0], end, start),
                                             version, entry[1] == 0))
                        entry[2] = entry[1]
            if end + self.allowed_lateness_ms + self.keep_ms <= watermark_ms:
                del self._open[start]
                for key in keys if self.recurring else ():
                    self._carried[key] = [*running[key], end]
                    self._carry_due = min(self._carry_due, self.windows.window_end(end))
            index += 1
        return rows

    def _emit_recurring(self, start: int, end: int, keys: dict, running: dict, rows: list,
                        watermark_ms: int, starts: list[int], version: int, owed_now: bool) -> None:
        """Rows of one window of a recurring metric; keys still billing open the next window."""
        opens_next = self.windows.window_end(end) <= watermark_ms
        for key, entry in keys.items():
            row = self._recurring_row(key, start, end, entry, running, version, owed_now)
            if row is not None:
                rows.append(row)
            if opens_next:
                self._open_successor(key, end, running[key][0], starts)

    def _recurring_row(self, key: tuple, start: int, end: int, entry: list,
                       running: dict, version: int, owed_now: bool) -> StoreRow | None:
        """The window's row if it or an earlier window changed since it was written (and it
        bills something); notes in ``running`` what the key carries into its next window."""
        agg = self.aggregation
        before, events_before = running.get(key) or self._carried.get(key, [agg.create(), 0])[:2]
        state, events = agg.merge(before, entry[0]), events_before + entry[1]
        running[key] = (agg.carry(state, end), events)
        if events == entry[2] or (entry[2] == 0 and entry[1] == 0 and agg.is_empty(state)) or (
                entry[2] == OWED and not owed_now):
            return None  # unchanged, or carried into a window where nothing is billed any more
        deleted = entry[2] == OWED and entry[1] == 0 and agg.is_empty(state)
        entry[2] = events
        return StoreRow(key, start, end, entry[1], agg.result(state, end, start), version, deleted)

    def _open_successor(self, key: tuple, start: int, carried, starts: list[int]) -> None:
        """A recurring key still billing something gets an entry in the next window."""
        if self.aggregation.is_empty(carried):
            return
        keys = self._open.get(start)
        if keys is None:
            keys = self._open[start] = {}
            bisect.insort(starts, start)
        if key not in keys:
            keys[key] = [self.aggregation.create(), 0, 0]

    def _open_carried_windows(self, watermark_ms: int, starts: list[int]) -> None:
        """Open the first window after the forgotten ones for keys that carry a state into it
        and that the watermark has passed; note when the next such window is due."""
        due = END_OF_TIME
        for key, (state, _events, start) in self._carried.items():
            if key in self._open.get(start, ()):
                continue
            end = self.windows.window_end(start)
            if end <= watermark_ms:
                self._open_successor(key, start, state, starts)
            elif not self.aggregation.is_empty(state):
                due = min(due, end)
        self._carry_due = due

    def owe(self, rows: Iterable[StoreRow], watermark_ms: int) -> None:
        """As :meth:`WindowStore.owe`."""
        self.owed_after = watermark_ms
        for row in rows:
            entry = self._open.setdefault(row.start_ms, {}).get(row.key)
            if entry is None:
                self._open[row.start_ms][row.key] = [self.aggregation.create(), 0, OWED]
            else:
                entry[2] = OWED

    def copy(self) -> AggregateWindowStore:
        """An independent copy, as a resume from :meth:`snapshot` would build (a copy
        re-checks its carried keys at its first emission, as a resumed store does)."""
        twin = AggregateWindowStore(self.windows, self.aggregation, self.allowed_lateness_ms,
                                    None, self.recurring, self.keep_ms)
        twin.owed_after = self.owed_after
        twin._open = {start: {key: [copy.deepcopy(entry[0]), *entry[1:]] for key, entry in keys.items()}
                      for start, keys in self._open.items()}
        twin._carried = {key: [copy.deepcopy(carried[0]), *carried[1:]]
                         for key, carried in self._carried.items()}
        return twin

    def snapshot(self) -> AggregateSnapshot:
        return AggregateSnapshot(self.fingerprint, copy.deepcopy(self._open),
                                 copy.deepcopy(self._carried), self.owed_after)
