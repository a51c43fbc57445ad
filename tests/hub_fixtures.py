"""A Hugging Face cache built on disk and a Hub on 127.0.0.1, for tests that must never reach the internet.

`HubServer` speaks the part of the Hub protocol huggingface_hub uses to download a file and to read
a safetensors header: HEAD and GET of /{org}/{name}/resolve/{revision}/{path} with X-Repo-Commit,
ETag and Content-Length, byte ranges (206 with Content-Range), and the Hub's X-Error-Code answers
(RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo). Safetensors files are virtual: a real
header followed by as many zero bytes as its tensors declare, served only in ranges. A GET of a
whole safetensors file is answered 500 and recorded: a test that sees one has caught a weight download.
"""

import hashlib
import http.server
import json
import os
import re
import struct
import threading

from formulas.checkpoint import tensor_bytes

ST_DTYPES = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16", "torch.int64": "I64",
             "torch.bool": "BOOL", "torch.int8": "I8", "torch.uint8": "U8", "torch.float8_e4m3fn": "F8_E4M3"}


class VirtualSafetensors:
    """A safetensors file of which only the header is real; the data is zeros of the declared length."""

    def __init__(self, tensors):
        header, offset = {}, 0
        for name, dtype, shape in tensors:
            size = tensor_bytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
        self.head = struct.pack("<Q", len(blob)) + blob
        self.size = len(self.head) + offset

    def read(self, start, end):
        """Bytes [start, end] (inclusive) of the file."""
        end = min(end, self.size - 1)
        out = self.head[start:end + 1]
        return out + b"\0" * (end + 1 - start - len(out))


def meta_checkpoint(config, dtype="bfloat16"):
    """[(name, safetensors dtype, shape)] a transformers model of `config` stores: its state dict on the
    meta device at `dtype`, a tied weight once and MoE experts one by one (as save_pretrained writes
    them), persistent buffers included."""
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    seen, out = set(), []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.extend(_as_saved(name, ST_DTYPES[str(t.dtype)], tuple(t.shape)))
    return out


def _as_saved(name, dtype, shape):
    """transformers 5 holds MoE experts fused ([E, 2I, H] gate_up_proj, [E, H, I] down_proj); save_pretrained
    and the Hub store one tensor per expert and projection."""
    if name.endswith(".experts.gate_up_proj"):
        e, two_i, h = shape
        base = name[: -len("gate_up_proj")]
        return [(f"{base}{k}.{p}.weight", dtype, (two_i // 2, h)) for k in range(e) for p in ("gate_proj", "up_proj")]
    if name.endswith(".experts.down_proj"):
        e, h, i = shape
        return [(f"{name[: -len('down_proj')]}{k}.down_proj.weight", dtype, (h, i)) for k in range(e)]
    return [(name, dtype, shape)]


def split_shards(tensors, n):
    """{shard file name: tensors} over n shards, and the index JSON that maps them."""
    files = {}
    for i, t in enumerate(tensors):
        files.setdefault(f"model-{i * n // len(tensors) + 1:05d}-of-{n:05d}.safetensors", []).append(t)
    index = {"metadata": {}, "weight_map": {name: fn for fn, ts in files.items() for name, _, _ in ts}}
    return files, json.dumps(index).encode()


def commit_of(repo):
    return hashlib.sha1(repo.encode()).hexdigest()


def build_cache(hf_home, repo, files, revision="main"):
    """Write files ({name: bytes}) as a snapshot of repo in the Hugging Face cache layout under hf_home."""
    root = os.path.join(hf_home, "hub", "models--" + repo.replace("/", "--"))
    commit = commit_of(repo)
    snap = os.path.join(root, "snapshots", commit)
    os.makedirs(snap, exist_ok=True)
    for name, body in files.items():
        with open(os.path.join(snap, name), "wb") as f:
            f.write(body)
    os.makedirs(os.path.dirname(os.path.join(root, "refs", revision)), exist_ok=True)  # refs/pr/1 nests
    with open(os.path.join(root, "refs", revision), "w") as f:
        f.write(commit)
    return snap


class HubServer:
    """A local Hub: repos = {'org/name': {file name: bytes | VirtualSafetensors}}; gated = repo ids needing a token."""

    def __init__(self, repos, gated=(), token="hf_test_token", stall=False, status=None, ignore_range=False):
        """stall: accept connections and never answer; status: answer every request with it (e.g. 503);
        ignore_range: answer a range request with the whole file, as a server without range support does."""
        self.repos, self.gated, self.token, self.stall = repos, set(gated), token, stall
        self.status, self.ignore_range = status, ignore_range
        self.requests = []  # (method, path, Range header, bytes sent)
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                server._answer(self, head=True)

            def do_GET(self):
                server._answer(self, head=False)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def weight_downloads(self):
        """Requests that asked for a whole safetensors file."""
        return [r for r in self.requests if r[1].endswith(".safetensors") and r[0] == "GET" and not r[2]]

    def bytes_sent(self, suffix=".safetensors"):
        return sum(r[3] for r in self.requests if r[1].endswith(suffix))

    def _send(self, h, code, headers=(), body=b"", head=False):
        h.send_response(code)
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)
        with self.lock:
            self.requests.append((h.command, h.path, h.headers.get("Range"), 0 if head else len(body)))

    def _answer(self, h, head):
        if self.stall:  # a Hub that accepts the connection and never answers
            threading.Event().wait(60)
            return
        if self.status:
            return self._send(h, self.status, [("Retry-After", "1")], b"test Hub: unavailable", head=head)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", h.path.split("?")[0])
        if not m:
            return self._send(h, 404, [("X-Error-Code", "RepoNotFound")], head=head)
        repo, rev, fn = m.groups()
        if repo not in self.repos:
            return self._send(h, 401, [("X-Error-Code", "RepoNotFound"), ("X-Error-Message", "Repository not found")],
                              head=head)
        if repo in self.gated and h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._send(h, 401, [("X-Error-Code", "GatedRepo"), ("X-Error-Message", "Access restricted")],
                              head=head)
        commit = commit_of(repo)
        if rev not in ("main", commit):
            return self._send(h, 404, [("X-Error-Code", "RevisionNotFound")], head=head)
        f = self.repos[repo].get(fn)
        if f is None:
            return self._send(h, 404, [("X-Error-Code", "EntryNotFound"), ("X-Repo-Commit", commit)], head=head)
        size = f.size if isinstance(f, VirtualSafetensors) else len(f)
        common = [("X-Repo-Commit", commit), ("ETag", f'"{hashlib.sha1((repo + fn).encode()).hexdigest()}"'),
                  ("Accept-Ranges", "bytes")]
        rng = h.headers.get("Range")
        if head:
            h.send_response(200)
            for k, v in common:
                h.send_header(k, v)
            h.send_header("Content-Length", str(size))
            h.end_headers()
            with self.lock:
                self.requests.append(("HEAD", h.path, rng, 0))
            return None
        if rng and not self.ignore_range:
            a, _, b = rng.split("=", 1)[1].partition("-")
            start, end = int(a), (int(b) if b else size - 1)
            body = f.read(start, end) if isinstance(f, VirtualSafetensors) else f[start:end + 1]
            return self._send(h, 206, common + [("Content-Range", f"bytes {start}-{start + len(body) - 1}/{size}")],
                              body)
        if isinstance(f, VirtualSafetensors):
            if self.ignore_range:  # what such a server would send: the file, here cut at 1 MiB
                return self._send(h, 200, common, f.read(0, 2**20 - 1))
            return self._send(h, 500, [("X-Error-Message", "test Hub: a whole safetensors file was asked for")])
        return self._send(h, 200, common, f)


class NotHttpServer:
    """A TCP server on 127.0.0.1 that answers like an SSH server: not HTTP at all."""

    def __init__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.sock.close()


def write_sparse_safetensors(path, tensors):
    """A safetensors file with a real header and a hole for the data (no disk used for the weights)."""
    v = VirtualSafetensors(tensors)
    with open(path, "wb") as f:
        f.write(v.head)
        f.truncate(v.size)
    return v
