"""Models by their Hugging Face id: config.json from the local cache or the Hub, weights from safetensors headers.

`--model org/name[@revision]` resolves, in order: the shipped catalog, a local path, the local
Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else XDG_CACHE_HOME/huggingface/hub, else
~/.cache/huggingface/hub; the `models--org--name/snapshots/<commit>/` layout), then the Hub through
huggingface_hub (HF_ENDPOINT, HF_TOKEN or the saved token), unless HF_HUB_OFFLINE is set. Only
config.json is fetched, into the same cache, so the next prediction of that model needs no network.

`checkpoint_tensors` reads a checkpoint's safetensors headers — the local files of a cached snapshot
or model directory, or from the Hub the first bytes of each shard by HTTP range requests, never the
weights — and returns (name, dtype, shape) per stored tensor; formulas.checkpoint turns them into
bytes per category.

The cache is looked up here without importing huggingface_hub; it is imported only to reach the Hub
(an optional dependency: `pip install 'vramlab[hub]'`). Every request has a timeout
(VRAMLAB_HUB_TIMEOUT, 10 s), and every failure is a HubError with one line saying what could not be
reached and what to pass instead.
"""

import json
import os
import re
import struct

TIMEOUT_S = float(os.environ.get("VRAMLAB_HUB_TIMEOUT", "10"))
MAX_HEADER = 100 * 2**20  # a header larger than this is not a safetensors header
_ID = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]*)/([A-Za-z0-9][A-Za-z0-9_.-]*)(?:@([A-Za-z0-9_./-]+))?")
_FALSE = ("", "0", "false", "no", "off")


class HubError(ValueError):
    """A model the catalog, the paths, the cache and the Hub could not provide; the message says what to pass."""


def split_id(text):
    """'org/name@rev' → ('org/name', 'rev'), revision 'main' by default; None when text is not a Hub id."""
    m = _ID.fullmatch(text.strip())
    return (f"{m.group(1)}/{m.group(2)}", m.group(3) or "main") if m else None


def cache_dir():
    """The Hugging Face hub cache, found as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def offline():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in _FALSE


def endpoint():
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _repo_dir(repo):
    return os.path.join(cache_dir(), "models--" + repo.replace("/", "--"))


def cached_snapshot(repo, revision="main"):
    """The cached snapshot folder of repo at revision (a branch or tag through refs/, or a commit), or None."""
    root = _repo_dir(repo)
    commit = revision
    try:
        with open(os.path.join(root, "refs", revision), encoding="utf-8") as f:
            commit = f.read().strip()
    except OSError:
        pass
    snap = os.path.join(root, "snapshots", commit)
    return snap if os.path.isdir(snap) else None


_reached = set()  # endpoints that answered this process


def _probe(repo, revision, filename):
    """One HEAD request with a short timeout before huggingface_hub takes over: it retries an unreachable
    Hub with backoff for minutes, which is a hang to someone without network. Any HTTP answer will do."""
    import urllib.error
    import urllib.request

    if endpoint() in _reached:
        return
    url = f"{endpoint()}/{repo}/resolve/{urllib.request.quote(revision, safe='')}/{filename}"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD", headers={"User-Agent": "vramlab"}),
                               timeout=TIMEOUT_S).close()
    except urllib.error.HTTPError:
        pass  # it answered
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        instead = "pass a path to its config.json, or set HF_HUB_OFFLINE=1 to use only the local cache" \
            if filename == "config.json" else \
            "drop --weights-from-checkpoint, or pass a model directory that has its safetensors"
        raise HubError(f"--model {repo}: cannot reach {endpoint()} ({reason}); {instead}") from None
    _reached.add(endpoint())


def _huggingface_hub(repo, what):
    try:
        import huggingface_hub
    except ImportError:
        raise HubError(f"--model {repo}: {what} is not in the Hugging Face cache {cache_dir()}, and reaching the Hub "
                       "needs huggingface_hub (pip install 'vramlab[hub]'); or pass a path to its config.json") from None
    import logging

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry warnings would break the one line
    return huggingface_hub


def _hub_error(e, repo, revision, filename):
    """One line for an exception huggingface_hub raised (classified by name: its classes moved between versions)."""
    names = {c.__name__ for c in type(e).__mro__}
    if "GatedRepoError" in names:
        why = "is gated: accept its terms on the Hub, then set HF_TOKEN (or `hf auth login`)"
        if os.environ.get("HF_TOKEN"):
            why = "is gated, and HF_TOKEN does not give access to it: accept its terms on the Hub with that account"
        return HubError(f"--model {repo} {why}")
    if "RevisionNotFoundError" in names:
        return HubError(f"--model {repo}@{revision}: the Hub has no revision {revision!r}")
    if "RepositoryNotFoundError" in names:
        return HubError(f"--model {repo}: not a local path, and no such model on {endpoint()} (or it is private: "
                        "set HF_TOKEN)")
    if names & {"RemoteEntryNotFoundError", "EntryNotFoundError"} and "LocalEntryNotFoundError" not in names:
        return FileNotFoundError(filename)
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if len(reason) > 160:
        reason = reason[:160].rsplit(". ", 1)[0].rstrip(".") + " …"
    if "LocalEntryNotFoundError" in names or "HfHubHTTPError" not in names:
        return HubError(f"--model {repo}: cannot reach {endpoint()} ({reason}); pass a path to its "
                        "config.json, or set HF_HUB_OFFLINE=1 to use only the local cache")
    return HubError(f"--model {repo}: {endpoint()} refused {filename} ({reason})")


def _download(repo, revision, filename):
    """Path of filename from the Hub, downloaded into the cache by huggingface_hub."""
    hf = _huggingface_hub(repo, filename)
    _probe(repo, revision, filename)
    try:
        return hf.hf_hub_download(repo, filename, revision=revision, etag_timeout=TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 — every failure of the download becomes one line
        raise _hub_error(e, repo, revision, filename) from None


def fetch_config(repo, revision="main"):
    """Download repo's config.json into the Hugging Face cache and return its path."""
    try:
        path = _download(repo, revision, "config.json")
    except FileNotFoundError:
        raise HubError(f"--model {repo}@{revision}: the Hub repo has no config.json (not a transformers model)") \
            from None
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except ValueError:
        raise HubError(f"--model {repo}: the Hub's config.json is not JSON ({path})") from None
    return path


def resolve_model(name):
    """A catalog name or a local path unchanged; a Hub id → the path of its config.json (cache, then Hub)."""
    from formulas.catalog import UnknownModelError, resolve_config_path

    try:
        resolve_config_path(name)
        return name
    except UnknownModelError:
        parsed = split_id(name)
        if parsed is None:
            raise
    repo, revision = parsed
    snap = cached_snapshot(repo, revision)
    if snap and os.path.isfile(os.path.join(snap, "config.json")):
        return os.path.join(snap, "config.json")
    if offline():
        raise HubError(f"--model {name}: not in the catalog, and not in the Hugging Face cache {cache_dir()} "
                       "(HF_HUB_OFFLINE is set); pass a path to its config.json")
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
        header = json.loads(blob[8:8 + n])
    except ValueError:
        raise HubError(f"{where}: safetensors header is not JSON") from None
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def _local_header(path):
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        return parse_header(head + f.read(min(n, MAX_HEADER + 1)), path)


def _remote_header(hf, repo, revision, filename):
    """The header of one shard on the Hub: a range request of its first bytes (two when the header is long)."""
    api = hf.HfApi()
    kwargs = {"revision": revision}
    if "timeout" in api.parse_safetensors_file_metadata.__code__.co_varnames:
        kwargs["timeout"] = TIMEOUT_S
    try:
        meta = api.parse_safetensors_file_metadata(repo, filename, **kwargs)
    except Exception as e:  # noqa: BLE001 — every failure of the request becomes one line
        if "SafetensorsParsingError" in {c.__name__ for c in type(e).__mro__}:
            raise HubError(f"{repo}/{filename}: not a safetensors header ({str(e).splitlines()[0][:160]})") from None
        raise _hub_error(e, repo, revision, filename) from None
    return {name: (info.dtype, tuple(info.shape)) for name, info in meta.tensors.items()}


def _shards_of_index(blob, where):
    try:
        return sorted(set(json.loads(blob)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise HubError(f"{where}: a safetensors index without a weight_map") from None


def _local_shards(folder):
    """The shard files of the checkpoint in folder, when all of them are there; else None."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, "rb") as f:
            shards = _shards_of_index(f.read(), index)
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        return None
    return shards if all(os.path.isfile(os.path.join(folder, s)) for s in shards) else None


def checkpoint_tensors(model):
    """([(name, dtype, shape)] of every tensor a checkpoint stores, where they were read), from its safetensors headers.

    `model`: a model directory or a config.json inside one (a cached snapshot included), or a Hub id.
    Local files are read where the folder has all of them; a cached snapshot without its weights
    reads them from the Hub at the snapshot's commit."""
    folder = model if os.path.isdir(model) else os.path.dirname(os.path.abspath(model)) \
        if os.path.isfile(model) else None
    if folder is None and split_id(model):
        folder = cached_snapshot(*split_id(model))  # the cache first, the Hub for what it lacks
    if folder is not None:
        shards = _local_shards(folder)
        if shards is not None:
            where = f"{folder} ({len(shards)} file{'s' * (len(shards) > 1)})"
            return _flatten(_local_header(os.path.join(folder, s)) for s in shards), where
        repo = _repo_of_snapshot(folder)
        if repo is None:
            raise HubError(f"{folder}: no safetensors weights here (model.safetensors, or its index and every "
                           "shard); drop --weights-from-checkpoint")
        revision = os.path.basename(os.path.normpath(folder))
    else:
        parsed = split_id(model)
        if parsed is None:
            raise HubError(f"--model {model}: --weights-from-checkpoint needs a model directory or a Hub id")
        repo, revision = parsed
    if offline():
        raise HubError(f"--model {repo}: its safetensors are not in the Hugging Face cache and HF_HUB_OFFLINE is "
                       "set; drop --weights-from-checkpoint or pass a model directory that has them")
    hf = _huggingface_hub(repo, "its safetensors")
    try:
        with open(_download(repo, revision, "model.safetensors.index.json"), "rb") as f:
            shards = _shards_of_index(f.read(), f"{repo}/model.safetensors.index.json")
    except FileNotFoundError:
        shards = ["model.safetensors"]
    try:
        tensors = _flatten(_remote_header(hf, repo, revision, s) for s in shards)
        return tensors, f"{endpoint()}/{repo}@{revision} (range requests of {len(shards)} header{'s' * (len(shards) > 1)})"
    except FileNotFoundError as e:
        raise HubError(f"--model {repo}@{revision}: the Hub has no {e.args[0]} (not a safetensors checkpoint); "
                       "drop --weights-from-checkpoint") from None


def _repo_of_snapshot(folder):
    """'org/name' when folder is a snapshot of the Hugging Face cache layout, else None."""
    parts = os.path.normpath(folder).split(os.sep)
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/", 1)
    return None


def _flatten(headers):
    return [(name, dtype, shape) for header in headers for name, (dtype, shape) in sorted(header.items())]
