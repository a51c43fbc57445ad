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
