"""Query results as an aligned text table.

    >>> from decimal import Decimal
    >>> print(format_table(["code", "total"], [("api_calls", Decimal("12.500")), ("egress", 7)]))
    code      |  total
    ----------+-------
    api_calls | 12.500
    egress    |      7
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any, Sequence

_NUMBER_TYPES = (int, float, Decimal)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Header, rule and one line per row; numeric columns are right-aligned.

    Decimals are written exactly as they are (``Decimal("1.500")`` stays ``1.500``, never in
    exponent form), NULL as ``NULL``.
    """
    cells = [[_cell(value) for value in row] for row in rows]
    numeric = [_numeric_column([row[i] for row in rows]) for i in range(len(columns))]
    widths = [max([len(name)] + [len(row[i]) for row in cells]) for i, name in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return " | ".join(parts).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(columns), rule] + [line(row) for row in cells])


def _numeric_column(values: list[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(
        isinstance(v, _NUMBER_TYPES) and not isinstance(v, bool) for v in present
    )


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    return str(value).replace("\n", "\\n").replace("\t", "\\t")  # one row, one line
