"""Docker-style human output: sizes, ages, tables."""

from __future__ import annotations

import time


def parse_iso(ts: str | None) -> float | None:
    if not ts:
        return None
    base = ts.rstrip("Z").split(".")[0]
    import calendar  # (imported when used: `run` never formats a date)

    try:
        return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def ago(ts: str | None, now: float | None = None) -> str:
    t = parse_iso(ts)
    if t is None:
        return "N/A"
    d = max(0, (now or time.time()) - t)
    if d < 1:
        return "Less than a second ago"
    for unit, secs in (("year", 31536000), ("month", 2592000), ("week", 604800), ("day", 86400),
                       ("hour", 3600), ("minute", 60), ("second", 1)):
        n = int(d // secs)
        if n >= 1:
            if unit == "hour" and n == 1:
                return "About an hour ago"
            if unit == "minute" and n == 1:
                return "About a minute ago"
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "Less than a second ago"


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s < 60:
        return f"{s} seconds" if s > 1 else "1 second"
    m = s // 60
    if m < 60:
        return f"{m} minutes" if m > 1 else "About a minute"
    h = m // 60
    return f"{h} hours" if h > 1 else "About an hour"


def size(n: int) -> str:
    """Docker's HumanSize: decimal units, 3 significant digits."""
    units = ["B", "kB", "MB", "GB", "TB"]
    f = float(n)
    i = 0
    while f >= 1000 and i < len(units) - 1:
        f /= 1000
        i += 1
    s = f"{f:.3g}"
    return f"{s}{units[i]}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in headers]
    for r in rows:
        for i, cell in enumerate(r):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for r in [headers] + rows:
        cells = [c.ljust(widths[i]) for i, c in enumerate(r)]
        lines.append("   ".join(cells).rstrip())
    return "\n".join(lines)


def trunc(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"
