"""Error statistics shared by calibration, reports and checks. numpy is imported here only when called."""


def relative_errors(predicted, observed):
    """(predicted − observed) / observed, elementwise, as a float array."""
    import numpy as np

    p, m = np.asarray(predicted, float), np.asarray(observed, float)
    return (p - m) / m


def error_stats(errors):
    """n, median and 95th percentile of |relative error|, and the worst (signed) relative error."""
    import numpy as np

    err = np.asarray(errors, float)
    if len(err) == 0:
        return {"n": 0, "median": None, "p95": None, "worst": None}
    a = np.abs(err)
    return {"n": len(err), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "worst": float(err[np.argmax(a)])}


def percentile(values, q):
    """The q-th percentile of `values` with numpy's default (linear) interpolation, in plain Python."""
    v = sorted(values)
    if not v:
        raise ValueError("percentile of no values")
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)
