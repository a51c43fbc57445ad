"""Bytes are integers everywhere; binary units appear only when printing."""

import re

KiB = 2**10
MiB = 2**20
GiB = 2**30
GB = 10**9  # decimal: used only to explain rules of thumb that mix the two up

_UNITS = {"b": 1, "kib": KiB, "mib": MiB, "gib": GiB, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": GB, "tb": 10**12}


def gib(n_bytes):
    """Bytes → GiB as a float, for display."""
    return n_bytes / GiB


def fmt_bytes(n_bytes, unit="GiB", digits=2):
    """Format a byte count in a binary unit, e.g. '14.96 GiB'."""
    div = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB}[unit]
    if unit == "B":
        return f"{int(n_bytes):,} B"
    return f"{n_bytes / div:,.{digits}f} {unit}"


def parse_size(text):
    """'24GiB', '80 GB', '512MiB', '1024' → bytes (int). Decimal and binary units are kept apart."""
    s = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", s)
    unit = m.group(2) if m else None
    if m is None or (unit or "b") not in _UNITS or (not unit and "." in m.group(1)):
        raise ValueError(f"cannot read {text!r} as a size: use e.g. 24GiB, 80GB, 512MiB or plain bytes")
    return int(round(float(m.group(1)) * _UNITS[unit or "b"]))
