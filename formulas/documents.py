"""Reading a JSON document that vramlab did not write itself, with limits: the one JSON reader.

config.json files, safetensors headers and indexes, records, calibration tables and sweep, import
and resume files all come from outside: a user, the Hub, another tool, a disk that filled up. Each
is read here, so each is refused the same way — one DocumentError (a ValueError) naming the file
and what is wrong with it — instead of hanging or ending in a traceback:

- only a regular file is opened, without blocking (a FIFO named `config.json` would wait forever
  for a writer; a folder or a device is no document);
- at most `max_bytes` are read (MAX_BYTES unless the caller knows better);
- the text must be UTF-8;
- nesting deeper than MAX_DEPTH is refused (Python's parser recurses once per level and would end
  in a RecursionError; nothing vramlab reads nests past a dozen levels);
- integers longer than MAX_INT_DIGITS digits are refused (no byte count or length needs more).

YAML (sweep files, published measurement sets) goes through harness/sweep/documents.py, which adds the
limits that only YAML needs (aliases, their expansion, keys given twice) on top of read_bytes.
"""

import json
import os
import stat

MAX_BYTES = 64 * 2**20  # a document: the largest record or config.json vramlab writes or reads is under 1 MiB
MAX_DEPTH = 64  # nesting levels
MAX_INT_DIGITS = 30  # 10^30 is more bytes than any machine has


class DocumentError(ValueError):
    """A file that cannot be read as the document it should be; the message names the file."""


def _kind(mode):
    for test, word in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return word
    return "not a regular file"


def open_regular(path, where=None):
    """The regular file at `path` opened for binary reading; DocumentError for anything else.

    It is opened non-blocking and checked after opening (fstat), so a FIFO or a device put in its
    place between a check and the open is refused all the same, and never waited on."""
    where = where or path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DocumentError(f"{where}: cannot read it ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DocumentError(f"{where}: {_kind(st.st_mode)}, not a file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path, max_bytes=MAX_BYTES, where=None):
    """The bytes of the regular file at `path` (open_regular), at most `max_bytes`; DocumentError otherwise."""
    where = where or path
    with open_regular(path, where) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise DocumentError(f"{where}: {size:,} bytes, more than the {max_bytes:,} such a file may have")
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise DocumentError(f"{where}: cannot read it ({e.strerror or e})") from None
    if len(data) > max_bytes:  # it grew while being read
        raise DocumentError(f"{where}: more than the {max_bytes:,} bytes such a file may have")
    return data


def decode(data, where):
    """UTF-8 text of `data` (bytes or str); DocumentError naming the place of the first bad byte."""
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def depth(obj, limit=MAX_DEPTH):
    """Nesting depth of parsed JSON/YAML (lists and mappings), counted without recursion; stops past `limit`."""
    if not isinstance(obj, (dict, list, tuple)):
        return 0
    deepest, stack, seen = 1, [(obj, 1)], {id(obj)}
    while stack:
        o, d = stack.pop()
        for v in (o.values() if isinstance(o, dict) else o):
            if isinstance(v, (dict, list, tuple)) and id(v) not in seen:  # a YAML alias: a node already counted
                if d + 1 > limit:
                    return d + 1
                deepest = max(deepest, d + 1)
                seen.add(id(v))
                stack.append((v, d + 1))
    return deepest


def _int(text):
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def parse_json(data, where, max_depth=MAX_DEPTH, allow_nan=True):
    """The JSON value in `data` (bytes or str), within the limits above; DocumentError naming `where`.

    allow_nan=False also refuses NaN and Infinity, which JSON does not have but Python writes."""
    text = decode(data, where)

    def constant(name):
        if not allow_nan:
            raise ValueError(f"{name} is not a JSON number")
        return float(name)

    try:
        obj = json.loads(text, parse_int=_int, parse_constant=constant)
    except RecursionError:
        raise DocumentError(f"{where}: nested more than {max_depth} levels deep") from None
    except ValueError as e:  # JSONDecodeError, and the hooks' refusals
        raise DocumentError(f"{where}: not JSON ({str(e).splitlines()[0][:200]})") from None
    if depth(obj, max_depth) > max_depth:
        raise DocumentError(f"{where}: nested more than {max_depth} levels deep")
    return obj


def load_json(path, max_bytes=MAX_BYTES, max_depth=MAX_DEPTH, allow_nan=True, where=None):
    """parse_json of the regular file at `path` (read_bytes)."""
    where = where or path
    return parse_json(read_bytes(path, max_bytes, where), where, max_depth, allow_nan)
