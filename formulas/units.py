"""Bytes are integers everywhere; binary units appear only when printing. Also the unit parsers of the CLI.

Sizes: KiB/MiB/GiB/TiB are binary; K/M/G/T, with or without a trailing B, are decimal — the way
text sizes and vendors' "GB" are quoted. Every parser raises ValueError saying what it expected;
the CLI prefixes the flag and the value.
"""

import math
import re

KiB = 2**10
MiB = 2**20
GiB = 2**30
GB = 10**9  # decimal: used only to explain rules of thumb that mix the two up

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": GB, "gb": GB, "t": 10**12,
               "tb": 10**12, "kib": KiB, "mib": MiB, "gib": GiB, "tib": 2**40}
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_DURATION_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "hours": 3600, "d": 86_400,
                   "day": 86_400, "days": 86_400, "w": 7 * 86_400, "week": 7 * 86_400, "weeks": 7 * 86_400}
_NUMBER = r"(\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+)"


def fmt_gib(n_bytes, digits=2, suffix=" GiB"):
    """Bytes → '14.96 GiB' for display; a positive amount that rounds to zero shows as '<0.01 GiB'."""
    q = n_bytes / GiB
    if 0 < q < 0.5 * 10**-digits:
        return f"<{10**-digits:.{digits}f}{suffix}"
    return f"{q:.{digits}f}{suffix}"


def _number_and_unit(text, units, what):
    s = str(text).strip().lower().replace(" ", "").replace(",", "").replace("_", "")
    m = re.fullmatch(_NUMBER + r"([a-z]*)", s)
    if m is None or m.group(2) not in units:
        raise ValueError(what)
    v = float(m.group(1)) * units[m.group(2)]
    if not math.isfinite(v):
        raise ValueError(what)
    return v


def parse_size(text, minimum=0):
    """'24GiB', '80 GB', '10G', '512MiB', '1e9' → bytes (int), at least `minimum`."""
    what = "give a size, e.g. 24GiB, 80GB, 10G, 512MiB or plain bytes (KiB/MiB/GiB binary, K/M/G/KB/MB/GB decimal)"
    v = int(round(_number_and_unit(text, _SIZE_UNITS, what)))
    if v < minimum:
        raise ValueError(what)
    return v


def parse_count(text):
    """'2.5B', '500M', '1T', '1e9' → a positive integer count (decimal multipliers)."""
    what = "give a positive count, e.g. 1B, 500M, 2.5e9"
    v = _number_and_unit(text, _COUNT_UNITS, what)
    if v < 1:
        raise ValueError(what)
    return int(round(v))


def parse_duration(text):
    """'1d', '24h', '90m', '3600s', '2 weeks' → seconds (float). A bare number is refused: the unit matters."""
    what = "give a positive duration with a unit, e.g. 1d, 24h, 90m, 3600s"
    units = dict(_DURATION_UNITS)
    units.pop("", None)
    v = _number_and_unit(text, units, what)
    if v <= 0:
        raise ValueError(what)
    return v


def parse_fraction(text, allow_zero=True, allow_one=False):
    """'5%' or '0.05' → 0.05, within [0, 1) by default."""
    lo, hi = ("[0" if allow_zero else "(0"), ("1]" if allow_one else "1)")
    what = f"give a fraction in {lo}, {hi} or a percentage, e.g. 0.05 or 5%"
    t = str(text).strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise ValueError(what) from None
    if not ((0 <= v if allow_zero else 0 < v) and (v <= 1 if allow_one else v < 1)):
        raise ValueError(what)
    return v
