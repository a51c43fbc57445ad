"""Arithmetic that works alike on Python numbers and numpy arrays.

The formulas take batch, sequence and generated tokens either as integers (`predict`) or as
numpy arrays (`grid.predict_grid`, 100,000 specs at once); these helpers use only
+ - * // and abs, so both broadcast, and formulas/ never imports numpy.
"""


def vmax(a, b):
    """max() that also works elementwise on numpy arrays."""
    return (a + b + abs(a - b)) // 2


def vmin(a, b):
    """min() that also works elementwise on numpy arrays."""
    return (a + b - abs(a - b)) // 2


def pick(cond, a, b):
    """a where cond else b."""
    c = cond * 1
    return a * c + b * (1 - c)


def to_int(x, rounding=True):
    """Round (or truncate) to integer bytes: an int, or an int64 array."""
    try:
        return int(round(x)) if rounding else int(x)
    except TypeError:  # a numpy array
        return (x.round() if rounding else x).astype("int64")
