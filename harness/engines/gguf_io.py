"""Reading GGUF headers: local files, or a Hub repo's file by HTTP range requests (split files included).

Only the header is read — the metadata and the tensor records — never the weights: a few hundred KiB of
a 200 GB model. The parsing is formulas/engines/gguf.py's (pure); this module fetches the bytes. A split
model (`name-00001-of-00005.gguf`) is read from all its files and merged (the metadata is in the first).
"""

import os

from formulas.engines.gguf import NeedMoreBytes, merge_splits, parse_header, split_names

FIRST_READ = 1 << 20  # bytes asked for first; the vocabulary of a 256k-token model needs a few MiB
MAX_HEADER = 256 << 20  # a GGUF header larger than this is not one this reads


def _parse_growing(read, size, where):
    """parse_header over read(start, end) ranges, asking for more until the header ends."""
    buf = read(0, min(FIRST_READ, size) - 1) if size else read(0, FIRST_READ - 1)
    while True:
        try:
            model, _ = parse_header(buf, where)
            return model
        except NeedMoreBytes as e:
            want = min(max(e.at_least, 2 * len(buf)), MAX_HEADER)
            if size and want > size:
                want = size
            if want <= len(buf):
                raise ValueError(f"{where}: the GGUF header does not end within {len(buf):,} bytes") from None
            buf += read(len(buf), want - 1)


def read_local(path):
    """GGUFModel of a local .gguf file (all parts of a split model)."""
    names = split_names(path)
    parts = []
    for name in names:
        try:
            size = os.path.getsize(name)
            with open(name, "rb") as f:
                def read(a, b, f=f):
                    f.seek(a)
                    return f.read(b - a + 1)

                m = _parse_growing(read, size, name)
        except FileNotFoundError:
            raise ValueError(f"--model {path}: split file {name} is missing") from None
        except OSError as e:
            raise ValueError(f"--model {name}: cannot read it ({e.strerror or e})") from None
        parts.append(_with_size(m, size))
    if len(parts) == 1 and not parts[0].metadata.get("split.count"):
        return parts[0]
    return merge_splits(parts, path)


def _with_size(m, size):
    import dataclasses

    return dataclasses.replace(m, file_bytes=size)


def read_hub(repo, filename, revision="main"):
    """GGUFModel of `filename` in a Hub repo (range requests of its first bytes; every part of a split model)."""
    from ..hub import _huggingface_hub, _request, endpoint

    instead = "pass a local .gguf file with --model path.gguf"
    hf = _huggingface_hub(repo, filename + " is", instead)
    parts = []
    for name in split_names(filename):
        where = f"{endpoint()}/{repo}@{revision}/{name}"
        try:
            meta = _request(hf, repo, revision, name, instead)
        except FileNotFoundError:
            raise ValueError(f"--model {repo}: the repo has no file {name}") from None
        size = getattr(meta, "size", None) or 0

        def read(a, b, name=name):
            return _request(hf, repo, revision, name, instead, (a, b))

        parts.append(_with_size(_parse_growing(read, size, where), size))
    if len(parts) == 1 and not parts[0].metadata.get("split.count"):
        return parts[0]
    return merge_splits(parts, f"{repo}/{filename}")
