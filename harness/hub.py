"""Models by their Hugging Face id: config.json from the local cache or the Hub, weights from safetensors headers.

`--model org/name[@revision]` resolves, in order: the shipped catalog, a local path, the local
Hugging Face cache, then the Hub through huggingface_hub (HF_ENDPOINT, HF_TOKEN or the saved
token), unless HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set. The cache is found as
huggingface_hub finds it: HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else HF_HOME/hub, else
XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub, in the
`models--org--name/snapshots/<commit>/` layout. Only config.json is fetched, into that cache, so the
next prediction of that model needs no network.

`checkpoint_tensors` reads a checkpoint's safetensors headers — the local files of a cached snapshot
or model directory, or from the Hub the first bytes of each shard by HTTP range requests, never the
weights — and returns (name, dtype, shape) per stored tensor; formulas.checkpoint turns them into
bytes per category.

The cache is looked up without importing huggingface_hub; it is imported only to reach the Hub (a
dependency of vramlab, so a catalog prediction never pays for its import). Every request has a timeout
(VRAMLAB_HUB_TIMEOUT, 10 s) and none is retried: a file's metadata is asked for first, without
huggingface_hub's retries (which back off for minutes on an unreachable or failing Hub), and the
download follows only when that answered. Every failure is a HubError: one line saying what could
not be reached or read, and what to pass instead.
"""

import math
import os
import re
import struct

from formulas.documents import DocumentError, load_json, open_regular, parse_json, read_bytes

MAX_HEADER = 100 * 2**20  # a header larger than this is not a safetensors header
HEADER_PREFETCH = 100_000  # bytes asked for at once: most headers fit (huggingface_hub asks for the same)
_ID = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]*)/([A-Za-z0-9][A-Za-z0-9_.-]*)(?:@([A-Za-z0-9_.+/-]+))?")
_TRUE = ("1", "ON", "YES", "TRUE")  # huggingface_hub's ENV_VARS_TRUE_VALUES
# exception class names that mean the Hub was not reached (httpx, requests, urllib, huggingface_hub)
_NETWORK = ("ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException",
            "NetworkError", "TransportError", "ProtocolError", "RemoteProtocolError", "ConnectionError",
            "Timeout", "TimeoutError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "SSLError", "ProxyError")


class HubError(ValueError):
    """A model the catalog, the paths, the cache and the Hub could not provide; the message says what to pass."""


def split_id(text):
    """'org/name@rev' → ('org/name', 'rev'), revision 'main' by default; None when text is not a Hub id.

    A revision is a branch, tag or commit; one that climbs out of the cache ('..', a leading '/') is not."""
    m = _ID.fullmatch(text.strip())
    if not m:
        return None
    rev = m.group(3) or "main"
    if rev.startswith("/") or ".." in rev.split("/"):
        return None
    return f"{m.group(1)}/{m.group(2)}", rev


def _env_path(value):
    return os.path.expandvars(os.path.expanduser(value))


def cache_dir():
    """The Hugging Face hub cache, found as huggingface_hub finds it (huggingface_hub/constants.py)."""
    home = _env_path(os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"))
    legacy = os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return _env_path(os.environ.get("HF_HUB_CACHE") or legacy)


def offline():
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


def endpoint():
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def timeout_s():
    """Seconds any one request may take (VRAMLAB_HUB_TIMEOUT, default 10)."""
    text = os.environ.get("VRAMLAB_HUB_TIMEOUT", "10")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise HubError(f"VRAMLAB_HUB_TIMEOUT={text}: give the seconds a Hub request may take, a number > 0")
    return value


def _repo_dir(repo):
    return os.path.join(cache_dir(), "models--" + repo.replace("/", "--"))


def cached_snapshot(repo, revision="main"):
    """The cached snapshot folder of repo at revision (a branch or tag through refs/, or a commit), or None."""
    root = _repo_dir(repo)
    commit = revision
    ref = os.path.join(root, "refs", revision)
    if os.path.lexists(ref):
        try:
            text = read_bytes(ref, 4096).decode("utf-8")
        except (DocumentError, UnicodeDecodeError) as e:
            why = str(e).split(": ", 1)[-1] if isinstance(e, DocumentError) else "not UTF-8 text"
            raise HubError(f"--model {repo}@{revision}: the Hugging Face cache's {ref} is no commit ({why}); "
                           "delete it, or pass a path to the model's config.json") from None
        commit = text.strip()
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", commit) or commit in (".", ".."):
        return None
    snap = os.path.join(root, "snapshots", commit)
    return snap if os.path.isdir(snap) else None


# ------------------------------------------------------------------ reaching the Hub

def _huggingface_hub(repo, what, instead):
    try:
        import huggingface_hub
        from huggingface_hub import utils
    except ImportError:
        raise HubError(f"--model {repo}: {what} not in the Hugging Face cache {cache_dir()}, and reaching the Hub "
                       "needs huggingface_hub (pip install huggingface_hub; vramlab depends on it, so this install "
                       f"lacks it); or {instead}") from None
    # Quiet: its retry warnings and progress bars would break the one line. Its logging module resets
    # the level when first loaded, so it is loaded (through the attribute) before the level is set.
    try:
        utils.logging.set_verbosity_error()
        utils.disable_progress_bars()
    except AttributeError:
        pass
    return huggingface_hub


def _names(e):
    return {c.__name__ for c in type(e).__mro__}


def _reason(e):
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if len(reason) > 160:
        cut = reason[:160].rsplit(". ", 1)[0]
        reason = (cut if len(cut) < 160 else cut.rsplit(" ", 1)[0]) + " …"
    return reason


def _has_token(hf):
    try:
        return bool(hf.get_token())
    except Exception:  # noqa: BLE001 — an unreadable token file is no token
        return bool(os.environ.get("HF_TOKEN"))


def _hub_error(hf, e, repo, revision, filename, instead):
    """One line for an exception raised while reaching the Hub (classified by name: huggingface_hub's classes
    moved between versions, and the HTTP client below it is requests or httpx); FileNotFoundError for a
    file the repo does not have."""
    names = _names(e)
    if "GatedRepoError" in names:
        if _has_token(hf):
            return HubError(f"--model {repo} is gated, and your token does not give access to it: accept its "
                            "terms on the Hub with that account")
        return HubError(f"--model {repo} is gated: accept its terms on the Hub, then set HF_TOKEN (or `hf auth login`)")
    if "RevisionNotFoundError" in names:
        return HubError(f"--model {repo}@{revision}: the Hub has no revision {revision!r}")
    if "RepositoryNotFoundError" in names:
        return HubError(f"--model {repo}: not a local path, and no such model on {endpoint()} (or it is private: "
                        "set HF_TOKEN)")
    if names & {"RemoteEntryNotFoundError", "EntryNotFoundError"} and "LocalEntryNotFoundError" not in names:
        return FileNotFoundError(filename)
    if "HfHubHTTPError" in names or "HTTPError" in names and getattr(e, "response", None) is not None:
        status = getattr(getattr(e, "response", None), "status_code", None)
        later = "; try again later" if status in (429, 500, 502, 503, 504) else ""
        return HubError(f"--model {repo}: {endpoint()} answered {status} for {filename}{later}; {instead}")
    if names & set(_NETWORK) or isinstance(e, OSError):
        return HubError(f"--model {repo}: cannot reach {endpoint()} ({_reason(e)}); {instead}")
    return HubError(f"--model {repo}: reading {filename} from {endpoint()} failed ({type(e).__name__}: {_reason(e)})")


def _request(hf, repo, revision, filename, instead, byte_range=None):
    """Metadata of a file (no byte_range), or its bytes in byte_range: one request, a timeout, no retries."""
    url = hf.hf_hub_url(repo, filename, revision=revision, endpoint=endpoint())
    timeout = timeout_s()
    try:
        if byte_range is None:
            return hf.get_hf_file_metadata(url, timeout=timeout)
        from huggingface_hub import utils

        r = utils.get_session().get(url, headers={**utils.build_hf_headers(),
                                                  "Range": f"bytes={byte_range[0]}-{byte_range[1]}"}, timeout=timeout)
        utils.hf_raise_for_status(r)
        if r.status_code != 206 and len(r.content) > byte_range[1] - byte_range[0] + 1:
            raise HubError(f"--model {repo}: {endpoint()} ignored the byte range asked for {filename}; "
                           "it would have sent the whole file")
        return r.content
    except HubError:
        raise
    except Exception as e:  # noqa: BLE001 — every failure of the request becomes one line
        raise _hub_error(hf, e, repo, revision, filename, instead) from None


def _download(repo, revision, filename, instead):
    """Path of a small file of the repo (config.json, the safetensors index), downloaded into the cache."""
    hf = _huggingface_hub(repo, filename + " is", instead)
    _request(hf, repo, revision, filename, instead)  # answers quickly, or says why not; nothing is retried
    try:
        return hf.hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir(), etag_timeout=timeout_s())
    except Exception as e:  # noqa: BLE001
        raise _hub_error(hf, e, repo, revision, filename, instead) from None


_CONFIG_INSTEAD = "pass a path to its config.json, or set HF_HUB_OFFLINE=1 to use only the local cache"
_HEADERS_INSTEAD = "drop --weights-from-checkpoint, or pass a model directory that has its safetensors"


def fetch_config(repo, revision="main"):
    """Download repo's config.json into the Hugging Face cache and return its path."""
    try:
        path = _download(repo, revision, "config.json", _CONFIG_INSTEAD)
    except FileNotFoundError:
        raise HubError(f"--model {repo}@{revision}: the Hub repo has no config.json (not a transformers model)") \
            from None
    try:
        load_json(path)
    except DocumentError as e:
        raise HubError(f"--model {repo}: the Hub's config.json is not readable ({e})") from None
    return path


def resolve_model(name):
    """A catalog name or a local path unchanged; a Hub id → the path of its config.json (cache, then Hub)."""
    from formulas.catalog import UnknownModelError, resolve_config_path

    try:
        resolve_config_path(name)
        return name
    except UnknownModelError:
        parsed = split_id(name)
        if parsed is None or os.path.exists(name):  # a folder without config.json is not a Hub id
            raise
    repo, revision = parsed
    snap = cached_snapshot(repo, revision)
    if snap and os.path.isfile(os.path.join(snap, "config.json")):
        return os.path.join(snap, "config.json")
    if offline():
        raise HubError(f"--model {name}: not in the catalog, and not in the Hugging Face cache {cache_dir()} "
                       "(offline: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); pass a path to its config.json")
    return fetch_config(repo, revision)


# ------------------------------------------------------------------ safetensors headers

def parse_header(blob, where):
    """{tensor name: (dtype, shape)} from the bytes of a safetensors header (length prefix included)."""
    if len(blob) < 8:
        raise HubError(f"{where}: not a safetensors file (shorter than its length prefix)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > MAX_HEADER or len(blob) < 8 + n:
        raise HubError(f"{where}: not a safetensors file (header of {n:,} bytes)")
    try:
        header = parse_json(blob[8:8 + n], where)
    except DocumentError as e:
        raise HubError(f"{where}: not a safetensors file (its header is not JSON: {str(e).split(': ', 1)[-1]})") from None
    if not isinstance(header, dict):
        raise HubError(f"{where}: not a safetensors file (its header is not a JSON object)")
    out = {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = (v.get("dtype"), v.get("shape")) if isinstance(v, dict) else (None, None)
        if not isinstance(dtype, str) or not isinstance(shape, list) or \
                not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise HubError(f"{where}: not a safetensors file (tensor {name!r} needs a dtype string and a shape "
                           "of non-negative integers)")
        out[name] = (dtype, tuple(shape))
    return out


def _local_header(path):
    try:
        with open_regular(path) as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            return parse_header(head + f.read(min(n, MAX_HEADER + 1)), path)
    except DocumentError as e:
        raise HubError(str(e)) from None
    except OSError as e:
        raise HubError(f"{path}: cannot read it ({e.strerror or e})") from None


def _remote_header(hf, repo, revision, filename):
    """The header of one shard on the Hub: a range request of its first bytes, a second when the header is longer."""
    where = f"{endpoint()}/{repo}@{revision}/{filename}"
    blob = _request(hf, repo, revision, filename, _HEADERS_INSTEAD, (0, HEADER_PREFETCH - 1))
    if len(blob) >= 8:
        (n,) = struct.unpack("<Q", blob[:8])
        if len(blob) < 8 + n <= 8 + MAX_HEADER:
            blob += _request(hf, repo, revision, filename, _HEADERS_INSTEAD, (len(blob), 8 + n - 1))
    return parse_header(blob, where)


def _shards_of_index(blob, where):
    """The shard files a model.safetensors.index.json names: plain file names inside the checkpoint's folder."""
    try:
        shards = sorted(set(parse_json(blob, where)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):  # a DocumentError is a ValueError
        raise HubError(f"{where}: a safetensors index without a weight_map of file names") from None
    for s in shards:
        if not isinstance(s, str) or not s or os.path.isabs(s) or ".." in re.split(r"[\\/]", s):
            raise HubError(f"{where}: weight_map names {s!r}, not a file inside the checkpoint")
    return shards


def _local_shards(folder):
    """The shard files of the checkpoint in folder, when all of them are there; else None."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.lexists(index):
        try:
            shards = _shards_of_index(read_bytes(index), index)
        except DocumentError as e:
            raise HubError(str(e)) from None
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        return None
    return shards if all(os.path.isfile(os.path.join(folder, s)) for s in shards) else None


def _plural(n, word):
    return f"{n} {word}{'s' * (n != 1)}"


def checkpoint_tensors(model):
    """([(name, dtype, shape)] of every tensor a checkpoint stores, where they were read), from its safetensors headers.

    `model`: a model directory or a config.json inside one (a cached snapshot included), or a Hub id.
    Local files are read where the folder has all of them; a cached snapshot without its weights
    reads them from the Hub at the snapshot's commit."""
    from formulas.catalog import hub_snapshot

    folder = model if os.path.isdir(model) else os.path.dirname(os.path.abspath(model)) \
        if os.path.isfile(model) else None
    parsed = split_id(model) if folder is None else None
    if parsed:
        folder = cached_snapshot(*parsed)  # the cache first, the Hub for what it lacks
    if folder is not None:
        shards = _local_shards(folder)
        if shards is not None:
            where = f"{folder} ({_plural(len(shards), 'file')})"
            return _flatten(_local_header(os.path.join(folder, s)) for s in shards), where
        parsed = hub_snapshot(folder)  # a cached snapshot without its weights: the Hub at its commit
        if parsed is None:
            raise HubError(f"{folder}: no safetensors weights here (model.safetensors, or its index and every "
                           "shard); drop --weights-from-checkpoint")
    elif parsed is None:
        raise HubError(f"--model {model}: --weights-from-checkpoint needs a model directory or a Hub id")
    repo, revision = parsed
    if offline():
        raise HubError(f"--model {repo}: its safetensors are not in the Hugging Face cache and the Hub is off "
                       "(HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE); drop --weights-from-checkpoint or pass a model "
                       "directory that has them")
    hf = _huggingface_hub(repo, "its safetensors are", _HEADERS_INSTEAD)
    try:
        index = _download(repo, revision, "model.safetensors.index.json", _HEADERS_INSTEAD)
        try:
            shards = _shards_of_index(read_bytes(index), f"{repo}/model.safetensors.index.json")
        except DocumentError as e:
            raise HubError(str(e)) from None
    except FileNotFoundError:
        shards = ["model.safetensors"]
    try:
        tensors = _flatten(_remote_header(hf, repo, revision, s) for s in shards)
    except FileNotFoundError as e:
        raise HubError(f"--model {repo}@{revision}: the Hub has no {e.args[0]} (not a safetensors checkpoint); "
                       "drop --weights-from-checkpoint") from None
    return tensors, f"{endpoint()}/{repo}@{revision} (range requests of {_plural(len(shards), 'header')})"


def _flatten(headers):
    return [(name, dtype, shape) for header in headers for name, (dtype, shape) in sorted(header.items())]
