"""pull against a small fake registry on 127.0.0.1 that misbehaves on purpose: bearer token
challenge, 401, 404, 500, a connection dropped midway, corrupt blobs.  Each failure is one
clear error, stores nothing, and the next attempt succeeds (resuming what it can)."""

from __future__ import annotations

import base64
import gzip
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from test_oci_common import busybox_tar, image_config, image_layers, oci, ok, sha, store_state  # noqa: F401
from unionfuse.oci import registry as reg
from unionfuse.oci.local import OCI_LAYER_GZIP, OCI_MANIFEST
from unionfuse.store.store import Store


class Fake:
    def __init__(self, layers: list[bytes]):
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, bytes] = {}
        self.faults: dict[str, list] = {}  # kind -> [digest or path part, times left]
        self.bearer = False
        self.need_creds: tuple[str, str] | None = None
        self.requests: list[str] = []
        config = image_config(layers)
        ld = []
        for x in layers:
            z = gzip.compress(x, mtime=0)
            self.blobs[sha(z)] = z
            ld.append({"mediaType": OCI_LAYER_GZIP, "digest": sha(z), "size": len(z)})
        self.blobs[sha(config)] = config
        self.config_digest = sha(config)
        self.layer_digests = [d["digest"] for d in ld]
        m = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config), "size": len(config)},
            "layers": ld}).encode()
        self.manifests["v1"] = self.manifests[sha(m)] = m
        fake = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def send(self, code, body=b"", headers=()):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def fault(self, kind, key):
                f = fake.faults.get(kind)
                if f and f[1] > 0 and f[0] in key:
                    f[1] -= 1
                    return True
                return False

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                fake.requests.append(f"{self.command} {self.path} {self.headers.get('Range', '')}")
                if self.path.startswith("/token"):
                    auth = self.headers.get("Authorization", "")
                    if fake.need_creds:
                        want = "Basic " + base64.b64encode(":".join(fake.need_creds).encode()).decode()
                        if auth != want:
                            return self.send(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"bad creds"}]}')
                    scope = re.search(r"scope=([^&]*)", self.path)
                    return self.send(200, json.dumps({"token": "tok-" + (scope.group(1) if scope else "")}).encode())
                if fake.bearer and not self.headers.get("Authorization", "").startswith("Bearer tok-repository"):
                    host = self.headers["Host"]
                    return self.send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', [(
                        "WWW-Authenticate",
                        f'Bearer realm="http://{host}/token",service="fake",scope="repository:x/y:pull"')])
                if self.path == "/v2/":
                    return self.send(200, b"{}")
                if self.fault("status500", self.path):
                    return self.send(500, b'{"errors":[{"code":"UNKNOWN","message":"boom"}]}')
                m = re.fullmatch(r"/v2/x/y/(manifests|blobs)/([^/?]+)", self.path)
                if not m:
                    return self.send(404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}')
                kind, ref = m.groups()
                if kind == "manifests":
                    data = fake.manifests.get(ref)
                    if data is None:
                        return self.send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}')
                    return self.send(200, data, [("Content-Type", OCI_MANIFEST), ("Docker-Content-Digest", sha(data))])
                data = fake.blobs.get(ref)
                if data is None or self.fault("missing", ref):
                    return self.send(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}')
                if self.fault("corrupt", ref):
                    data = data[:-5] + b"XXXXX"
                start = 0
                rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if rng:
                    start = int(rng.group(1))
                body = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if self.command == "HEAD":
                    return
                if self.fault("drop", ref):
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    import socket

                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake(image_layers):
    f = Fake(image_layers[1:])
    yield f
    f.stop()


def _pull(root, fake, **kw):
    c = reg.Client(fake.host, tls_verify=False, progress=reg.Progress(quiet=True), **kw)
    try:
        return reg.pull(Store(str(root)), f"{fake.host}/x/y:v1", client=c)
    finally:
        c.close()


def _nothing_stored(root):
    layers, images, refs = store_state(root)
    return not layers and not images and not refs


def test_bearer_token_challenge(fake, tmp_path):
    fake.bearer = True
    img, c = _pull(tmp_path / "r", fake)
    assert img.id == fake.config_digest
    assert any(r.startswith("GET /token?service=fake&scope=repository%3Ax%2Fy%3Apull") for r in fake.requests)


def test_bearer_with_credentials_401_then_ok(fake, tmp_path):
    fake.bearer = True
    fake.need_creds = ("bob", "pw")
    root = tmp_path / "r"
    rc, _, err = oci(root, "pull", f"{fake.host}/x/y:v1", "--tls-verify=false")
    assert rc != 0 and "token service" in err and "--creds" in err, err
    assert _nothing_stored(root)
    assert ok(root, "pull", f"{fake.host}/x/y:v1", "--tls-verify=false", "--creds", "bob:pw").strip() == \
        fake.config_digest


def test_404_manifest_and_missing_blob(fake, tmp_path):
    root = tmp_path / "r"
    rc, _, err = oci(root, "pull", f"{fake.host}/x/y:nope", "--tls-verify=false")
    assert rc != 0 and "404" in err and "manifest unknown" in err, err
    fake.faults["missing"] = [fake.layer_digests[1], 1]
    rc, _, err = oci(root, "pull", f"{fake.host}/x/y:v1", "--tls-verify=false")
    assert rc != 0 and "404" in err and "blob unknown" in err, err
    assert _nothing_stored(root)
    ok(root, "pull", f"{fake.host}/x/y:v1", "--tls-verify=false")


def test_500_is_retried_then_reported(fake, tmp_path):
    root = tmp_path / "r"
    fake.faults["status500"] = ["/blobs/", 2]  # two 500s: the retries absorb them
    ok(root, "pull", f"{fake.host}/x/y:v1", "--tls-verify=false", "-q")
    root2 = tmp_path / "r2"
    fake.faults["status500"] = ["/blobs/", 100]
    rc, _, err = oci(root2, "pull", f"{fake.host}/x/y:v1", "--tls-verify=false")
    assert rc != 0 and "HTTP 500" in err and "boom" in err, err
    assert _nothing_stored(root2)
    fake.faults.clear()
    ok(root2, "pull", f"{fake.host}/x/y:v1", "--tls-verify=false")


def test_dropped_connection_resumes(fake, tmp_path):
    big = fake.layer_digests[0]
    # within one run: the retry resumes with a Range request
    fake.faults["drop"] = [big, 1]
    img, c = _pull(tmp_path / "r", fake)
    assert c.stats["bytes_resumed"] > 0 and img.id == fake.config_digest
    assert any(big in r and "bytes=" in r for r in fake.requests)
    # across runs: no retries left -> error, the partial download is kept, the next pull resumes
    root = tmp_path / "r2"
    fake.faults["drop"] = [big, 1]
    with pytest.raises(reg.RegistryError, match="next pull resumes"):
        _pull(root, fake, retries=1)
    assert _nothing_stored(root)
    assert list((root / "oci" / "downloads").glob("*.partial"))
    img, c = _pull(root, fake)
    assert c.stats["bytes_resumed"] > 0 and img.id == fake.config_digest
    assert not list((root / "oci" / "downloads").iterdir())


def test_corrupt_blob_is_discarded(fake, tmp_path):
    root = tmp_path / "r"
    fake.faults["corrupt"] = [fake.layer_digests[1], 1]
    rc, _, err = oci(root, "pull", f"{fake.host}/x/y:v1", "--tls-verify=false")
    assert rc != 0 and "digest" in err and "nothing stored" in err, err
    assert _nothing_stored(root)
    assert not list((root / "oci" / "downloads").glob(fake.layer_digests[1][7:] + "*"))
    ok(root, "pull", f"{fake.host}/x/y:v1", "--tls-verify=false")
    fake.faults["corrupt"] = [fake.config_digest, 1]
    rc, _, err = oci(tmp_path / "r3", "pull", f"{fake.host}/x/y:v1", "--tls-verify=false")
    assert rc != 0 and "digest" in err and _nothing_stored(tmp_path / "r3"), err


def test_unreachable_registry(tmp_path):
    from test_oci_common import free_port

    rc, _, err = oci(tmp_path / "r", "pull", f"127.0.0.1:{free_port()}/x/y:v1", "--tls-verify=false")
    assert rc != 0 and "can't reach registry" in err, err


def _archive(tmp_path, manifest, files=None):
    import io
    import tarfile

    p = tmp_path / "bad.tar"
    with tarfile.open(p, "w") as tf:
        for name, data in {"manifest.json": json.dumps(manifest).encode(), **(files or {})}.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return p


@pytest.mark.parametrize("manifest", [[1], [{"Config": 5}], {"not": "a list"}, [{}]])
def test_malformed_archive_json_is_one_line(tmp_path, manifest):
    rc, _, err = oci(tmp_path / "r", "load", "-i", _archive(tmp_path, manifest))
    assert rc != 0 and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1 and err.startswith("unionfuse: ")
    assert _nothing_stored(tmp_path / "r")


def test_config_with_wrong_field_types_is_refused(tmp_path, image_layers):
    # a docker-archive whose config says Cmd: "ls" (a string, not a list)
    tar = image_layers[1]
    cfg = {"architecture": "amd64", "os": "linux", "config": {"Cmd": "ls"},
           "rootfs": {"type": "layers", "diff_ids": [sha(tar)]}}
    data = json.dumps(cfg).encode()
    name = sha(data)[7:] + ".json"
    p = _archive(tmp_path, [{"Config": name, "RepoTags": ["x:1"], "Layers": ["l.tar"]}],
                 {name: data, "l.tar": tar})
    rc, _, err = oci(tmp_path / "r", "load", "-i", p)
    assert rc != 0 and "config.Cmd must be a list of strings" in err
    assert _nothing_stored(tmp_path / "r")


def test_redirect_loop_is_an_error(tmp_path):
    class Loop(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", self.path)
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Loop)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        rc, _, err = oci(tmp_path / "r", "pull", f"127.0.0.1:{srv.server_port}/x/y:1", "--tls-verify=false")
        assert rc != 0 and "too many redirects" in err
    finally:
        srv.shutdown()
