"""Where vramlab's checkout and its committed data live. One place, so every module agrees."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (editable install)
RESULTS_DIR = os.path.join(ROOT, "results")
RUNS_DIR = os.path.join(RESULTS_DIR, "runs")  # records: runs/<sweep>/<gpu-driver>/<spec_hash>.json
CALIBRATION_DIR = os.path.join(RESULTS_DIR, "calibration")  # tables fitted by `vramlab fit`


class OutDirError(ValueError):
    """An output path that cannot be written: a file where a folder should be, not writable, a full disk."""


def prepare_folder(path, flag="--out", create=True):
    """Create the output folder `path` if needed (with create=False, only check that it could be); OutDirError (one
    line naming `flag`) when it cannot be written."""
    if not path:
        raise OutDirError(f"{flag} '': give a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutDirError(f"{flag} {path}: is a file, not a folder")
    if not create:
        above = os.path.abspath(path)
        while not os.path.exists(above):
            above = os.path.dirname(above)
        if not os.path.isdir(above):
            raise OutDirError(f"{flag} {path}: cannot create it ({above} is a file)")
        if not os.access(above, os.W_OK | os.X_OK):
            raise OutDirError(f"{flag} {path}: " + ("not writable" if above == os.path.abspath(path) else
                                                    f"cannot create it ({above} is not writable)"))
        return path
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OutDirError(f"{flag} {path}: cannot create it ({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutDirError(f"{flag} {path}: not writable")
    return path


def check_output_file(path, flag):
    """An output file `path` that can be written (its folder is made); OutDirError (one line naming `flag`) else."""
    if not path:
        raise OutDirError(f"{flag} '': give a file name")
    if os.path.isdir(path):
        raise OutDirError(f"{flag} {path}: is a folder, not a file")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise OutDirError(f"{flag} {path}: is not a regular file (a FIFO, a device or a broken link)")
    prepare_folder(os.path.dirname(path) or ".", flag)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise OutDirError(f"{flag} {path}: not writable")
    return path
