"""The window store as it was before its windows became columns (``state.windows`` before
perf-snapshot): every aggregate a ``[count, total_scaled, emitted]`` list in a dict per window.
The differential tests run it next to ``state.windows.WindowStore``: the same rows, the same
snapshot bytes, the same state."""

from __future__ import annotations

from collections import deque
from itertools import compress, groupby, islice, repeat
from operator import attrgetter, is_, itemgetter, not_, setitem
from typing import Iterable

from state.packing import pack_columns, pack_entries
from state.records import WindowRow, WindowRowBlock
from state.window_kinds import WindowKind
from state.windows import NO_OWED, OWED, WindowKey, WindowSnapshot, row_version, unpack_window


def pack_window(keys: dict[WindowKey, list[int]]) -> bytes:
    """Format 2, as the store packed a window then."""
    return pack_entries(keys, key_width=3, big=1)

_ROW_START = attrgetter("window_start_ms")
_EMITTED = itemgetter(2)
_ROW_KEY = attrgetter("organization_id", "external_customer_id", "code")


class DictWindowStore:
    """Keeps aggregates until the watermark passes a window's end, then emits its rows.

    Each aggregate is ``[count, total_scaled, emitted_count]``. A row's version
    comes from the watermark it is emitted at (:func:`row_version`), so a later
    emission always replaces an earlier one in ClickHouse, across replays too.
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
        self._open: dict[int, dict[WindowKey, list[int]]] = {}
        self._segments: dict[int, list[bytes]] = {}  # what the snapshots hold, per window
        self._segment_entries: dict[int, int] = {}  # aggregates in a window's segments
        # What the next snapshot packs: a window's keys after its first ``_packed[start]`` (keys
        # leave only with their window, so those are the ones added since the last snapshot, in
        # order: nothing per key to note when adding), and ``_changed[start]``, the keys of
        # aggregates changed since. A window missing from ``_packed`` is packed whole.
        self._packed: dict[int, int] = {}
        self._changed: dict[int, dict[WindowKey, None]] = {}
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
            self._open[start] = {key: list(agg) for key, agg in packed.items()}
            return
        segments = [packed] if isinstance(packed, bytes) else list(packed)
        keys: dict[WindowKey, list[int]] = {}
        entries = 0
        for segment in segments:
            if segment.__class__ is int:  # OWED: every aggregate so far
                deque(map(setitem, keys.values(), repeat(2), repeat(OWED)), maxlen=0)
                continue
            aggregates = unpack_window(segment)
            entries += len(aggregates)
            keys.update(aggregates)
        self._open[start], self._segments[start] = keys, segments
        self._segment_entries[start], self._packed[start] = entries, len(keys)

    def add(self, start_ms: int, key: WindowKey, value_scaled: int) -> None:
        keys = self._open.get(start_ms)
        if keys is None:
            keys = self._open[start_ms] = {}
        aggregate = keys.get(key)
        if aggregate is None:
            keys[key] = [1, value_scaled, 0]  # the next snapshot packs the window's new keys
        else:
            aggregate[0] += 1
            aggregate[1] += value_scaled
            self._change(start_ms, key)

    def add_group(self, start_ms: int, key: WindowKey, count: int, total_scaled: int) -> None:
        """Add ``count`` events summing to ``total_scaled`` at once (a batch pre-aggregated)."""
        keys = self._open.get(start_ms)
        if keys is None:
            keys = self._open[start_ms] = {}
        aggregate = keys.get(key)
        if aggregate is None:
            keys[key] = [count, total_scaled, 0]  # the next snapshot packs the window's new keys
        else:
            aggregate[0] += count
            aggregate[1] += total_scaled
            self._change(start_ms, key)

    def add_groups(self, start_ms: int, keys: list[WindowKey], counts: list[int],
                   totals: list[int]) -> None:
        """``add_group`` for each of ``keys`` (distinct) in order, at once: the window's new
        keys are inserted in bulk.

        """
        if not keys:
            return
        window = self._open.get(start_ms)
        if window is None:
            window = self._open[start_ms] = {}
        if not window:  # every key is new
            window.update(zip(keys, map(list, zip(counts, totals, repeat(0)))))
            return
        aggregates = list(map(window.get, keys))
        new = list(map(is_, aggregates, repeat(None)))
        window.update(zip(compress(keys, new), map(list, zip(compress(counts, new),
                                                             compress(totals, new), repeat(0)))))
        if not all(new):  # the next snapshot packs the window's new keys; these changed
            old = list(map(not_, new))
            self._add_to_known(start_ms, compress(keys, old), compress(aggregates, old),
                               compress(counts, old), compress(totals, old))

    def _add_to_known(self, start_ms: int, keys: Iterable[WindowKey], aggregates: Iterable[list[int]],
                      counts: Iterable[int], totals: Iterable[int]) -> None:
        """Add each group to the aggregate its key already has in the window."""
        for key, aggregate, count, total in zip(keys, aggregates, counts, totals):
            aggregate[0] += count
            aggregate[1] += total
            self._change(start_ms, key)

    def _change(self, start_ms: int, key: WindowKey) -> None:
        changed = self._changed.get(start_ms)
        if changed is None:
            changed = self._changed[start_ms] = {}
        changed[key] = None

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
            keys = self._open[start]
            emitted, emitted_keys = self._rows(start, end, keys, self.grain, version, owed_now,
                                               record=not provisional, blocks=blocks)
            if provisional:  # changes nothing: the caller owes the rows (see owe)
                rows.extend(emitted)
                continue
            if end + self.allowed_lateness_ms + self.keep_ms <= watermark_ms and \
                    OWED not in map(_EMITTED, keys.values()):  # no provisional row still waits
                del self._open[start]
                self._segments.pop(start, None)
                self._segment_entries.pop(start, None)
                self._changed.pop(start, None)
            elif emitted:  # their emitted counts changed
                self._changed.setdefault(start, {}).update(dict.fromkeys(emitted_keys))
            rows.extend(emitted)
        return rows

    @staticmethod
    def _rows(start: int, end: int, keys: dict[WindowKey, list[int]], grain: str,
              version: int, owed_now: bool, record: bool,
              blocks: bool = False) -> tuple[list[WindowRow | WindowRowBlock], list[WindowKey]]:
        """The window's rows to write, and their keys; with ``record``, noted as emitted; with
        ``blocks``, a first emission as one ``WindowRowBlock``."""
        counts, totals, emitted = zip(*keys.values()) if keys else ((), (), ())
        if counts == emitted:  # nothing changed since the last emission
            return [], []
        if not any(emitted) and 0 not in counts:  # a first emission: every key, in bulk
            key_list = list(keys)
            if record:
                for aggregate in keys.values():
                    aggregate[2] = aggregate[0]
            if blocks:
                return [WindowRowBlock(grain, start, end, version, key_list, counts, totals)], key_list
            orgs, customers, codes = zip(*key_list)
            n = len(counts)
            rows = list(map(WindowRow, orgs, customers, codes, repeat(start, n), repeat(end, n), counts,
                            totals, repeat(version, n), repeat(False, n), repeat(grain, n)))
            return rows, key_list
        rows, emitted_keys = [], []
        for key, aggregate in keys.items():
            count, total, emitted = aggregate
            if count != emitted and (emitted != OWED or owed_now):
                org, customer, code = key
                rows.append(WindowRow(org, customer, code, start, end, count, total, version,
                                      count == 0, grain))
                emitted_keys.append(key)
                if record:
                    aggregate[2] = count
        return rows, emitted_keys

    def owe(self, rows: Iterable, watermark_ms: int) -> None:
        """A provisional flush wrote ``rows``: write each again, for real (or delete it), at
        the first emission after ``watermark_ms``.

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
        keys = self._open.get(start)
        if keys is None:
            keys = self._open[start] = {}
        held = len(keys)
        if held <= len(owed) and list(keys) == owed[:held]:  # the scratch's window: ours, then new keys
            deque(map(setitem, keys.values(), repeat(2), repeat(OWED)), maxlen=0)
            keys.update(zip(islice(owed, held, None), map(list, repeat((0, 0, OWED)))))
        else:
            aggregates = list(map(keys.get, owed))
            deque(map(setitem, filter(None, aggregates), repeat(2), repeat(OWED)), maxlen=0)
            if None in aggregates:
                keys.update(zip(compress(owed, map(is_, aggregates, repeat(None))),
                                map(list, repeat((0, 0, OWED)))))
        if len(keys) == len(owed):  # every key (a window never packed is packed whole anyway)
            if start in self._segments:
                self._segments[start].append(OWED)
        else:
            self._changed.setdefault(start, {}).update(dict.fromkeys(owed))

    def accepts(self, start_ms: int, watermark_before: int) -> bool:
        """Whether an event seen at ``watermark_before`` still counts in this window."""
        return self.windows.window_end(start_ms) + self.allowed_lateness_ms > watermark_before

    def open_windows(self) -> int:
        return len(self._open)

    def copy(self) -> DictWindowStore:
        """An independent copy (the provisional flush decides and emits on one), as a resume
        from :meth:`snapshot` would build, without packing every window to bytes and back.

        """
        twin = self._twin(DictWindowStore)
        twin._open = {start: dict(zip(keys, map(list, keys.values())))
                      for start, keys in self._open.items()}
        return twin

    def borrowed(self) -> DictWindowStore:
        """A copy that shares this store's aggregates and copies one only when an add changes
        it, for a computation done before this store changes again (the provisional flush: a
        copy of every aggregate cost as much as writing its row). Its provisional emissions
        change nothing either.

        """
        twin = self._twin(_BorrowedWindowStore)
        twin._open = {start: dict(keys) for start, keys in self._open.items()}
        return twin

    def _twin(self, kind: type) -> DictWindowStore:
        """A store of ``kind`` with this one's settings and snapshot bookkeeping, no windows."""
        twin = kind(self.windows, None, self.allowed_lateness_ms, self.grain, self.keep_ms,
                    self.emit_after_ms)
        twin.owed_after = self.owed_after
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

        """
        changed, self._changed = self._changed, {}
        for start, keys in self._open.items():
            if start not in self._segments:  # never packed, or forgotten and opened again
                self._pack_changes(start, keys, 0, changed.get(start, {}))
            elif (done := self._packed.get(start, 0)) < len(keys) or start in changed:
                self._pack_changes(start, keys, done, changed.get(start, {}))
        self._packed = {start: len(keys) for start, keys in self._open.items()}
        return WindowSnapshot(self.windows.fingerprint,
                              {start: tuple(segments) for start, segments in self._segments.items()},
                              self.owed_after)

    def _pack_changes(self, start: int, keys: dict[WindowKey, list[int]], done: int,
                      changed: dict[WindowKey, None]) -> None:
        """Append a segment of the window's aggregates added or changed since its first
        ``done`` keys were packed; or pack the window afresh, if its segments would then hold
        more than twice its aggregates, or if more than half of them changed (emitted), or if
        none is packed (the same bytes as one segment of every key)."""
        added = len(keys) - done
        segments = self._segments.setdefault(start, [])
        entries = self._segment_entries.get(start, 0) + added + len(changed)  # at most
        if entries > 2 * len(keys) or 2 * len(changed) > len(keys) or not (segments or done):
            segments[:] = [pack_window(keys)]
            self._segment_entries[start] = len(keys)
            return
        new_keys = list(islice(reversed(keys), added))
        values = list(islice(reversed(keys.values()), added))
        new_keys.reverse()
        values.reverse()
        if changed:  # aggregates packed before and changed since, once each, in order
            new = set(new_keys)
            before = [key for key in changed if key not in new]
            new_keys.extend(before)
            values.extend(map(keys.__getitem__, before))
        segments.append(pack_columns(new_keys, values, key_width=3, big=1))
        self._segment_entries[start] = self._segment_entries.get(start, 0) + len(new_keys)


class _BorrowedWindowStore(DictWindowStore):
    """A ``WindowStore`` sharing its aggregates with another (see ``WindowStore.borrowed``):
    an add replaces the aggregate it changes instead of changing it in place."""

    def add(self, start_ms: int, key: WindowKey, value_scaled: int) -> None:
        self.add_group(start_ms, key, 1, value_scaled)

    def add_group(self, start_ms: int, key: WindowKey, count: int, total_scaled: int) -> None:
        keys = self._open.setdefault(start_ms, {})
        aggregate = keys.get(key)
        if aggregate is None:
            keys[key] = [count, total_scaled, 0]
        else:
            keys[key] = [aggregate[0] + count, aggregate[1] + total_scaled, aggregate[2]]
            self._change(start_ms, key)

    def _add_to_known(self, start_ms: int, keys: Iterable[WindowKey], aggregates: Iterable[list[int]],
                      counts: Iterable[int], totals: Iterable[int]) -> None:
        """Replace each aggregate the groups change (the lender keeps its own).

        """
        for key, _aggregate, count, total in zip(keys, aggregates, counts, totals):
            self.add_group(start_ms, key, count, total)

    def owe(self, rows: Iterable, watermark_ms: int) -> None:
        raise TypeError("a borrowed window store shares its aggregates: owe on the store it "
                        "was borrowed from")
