"""``pull`` and ``push`` over the OCI distribution API (stdlib http.client only).

- Auth: anonymous; HTTP Basic; bearer tokens from a ``WWW-Authenticate: Bearer realm=..,
  service=.., scope=..`` challenge (with the credentials, if any, as Basic to the realm).
  Credentials: ``--creds USER:PASS``, else ROOT/auth.json in docker's format
  ``{"auths": {"HOST[:PORT]": {"auth": base64("user:pass")}}}``.
- TLS: https, verified.  A registry is *insecure* with ``--tls-verify=false`` or when it
  is listed in ROOT/config.json ``{"insecure-registries": ["localhost:5000"]}``: then the
  certificate is not checked and, if the registry does not speak TLS, plain http is used.
- Pull: manifest (by tag or digest; a manifest list / OCI index picks linux/<host arch>
  or ``--platform``), config and layer blobs are verified against their digests; layers
  whose diff_id the store has are not downloaded.  Blobs go to ROOT/oci/downloads/ and a
  broken download resumes with a Range request (within the run and in the next run);
  a digest mismatch deletes the download.  Layers are unpacked only when every blob is
  there and verified; a failure removes the layers this pull added and stores no image.
- Push: blobs the registry has (HEAD) are skipped; a layer known to be in another
  repository of the same registry is cross-mounted; otherwise uploaded monolithically
  (POST + PUT) or, above ``chunk_size``, in PATCH chunks.  Then the manifest (OCI).
  ``Client.stats`` counts what happened.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import sys
import time
import urllib.parse
from dataclasses import dataclass

from ..store.imageconfig import goarch
from ..store.store import Image, Store, normalize_ref
from . import local
from .local import (DOCKER_LIST, DOCKER_MANIFEST, INDEX_TYPES, MANIFEST_TYPES, OCI_CONFIG, OCI_INDEX,
                    OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OCI_MANIFEST, DigestMismatch, OCIError,
                    check_digest, digest_of)

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
ACCEPT = ", ".join([OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST])
USER_AGENT = "unionfuse/0.1"
MAX_MANIFEST = 4 << 20
MAX_REDIRECTS = 10


class RegistryError(OCIError):
    pass


class AuthError(RegistryError):
    pass


# -- names -------------------------------------------------------------------------------------


@dataclass
class Reference:
    registry: str  # "docker.io", "localhost:5000"
    repo: str  # "library/busybox", "foo/bar"
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def local_name(self) -> str:
        """The name the store gives it: busybox, foo/bar, localhost:5000/foo."""
        if self.registry == DOCKER_HUB:
            return self.repo.removeprefix("library/") if self.repo.count("/") == 1 and \
                self.repo.startswith("library/") else self.repo
        return f"{self.registry}/{self.repo}"

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repo}"
        if self.tag:
            s += ":" + self.tag
        if self.digest:
            s += "@" + self.digest
        return s


def parse_reference(s: str) -> Reference:
    """NAME[:TAG|@DIGEST] with docker's defaults (docker.io, library/, latest)."""
    digest = None
    if "@" in s:
        s, digest = s.split("@", 1)
        check_digest(digest)
    norm = normalize_ref(s)  # validates; adds :latest
    name, tag = norm.rsplit(":", 1)
    if digest and not re.search(r":[\w][\w.-]*$", s.rsplit("/", 1)[-1]):
        tag = None
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry, repo = parts[0], "/".join(parts[1:])
    else:
        registry, repo = DOCKER_HUB, name
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repo:
        repo = "library/" + repo
    return Reference(registry, repo, tag, digest)


# -- settings ----------------------------------------------------------------------------------


def _root_json(store: Store, name: str) -> dict:
    try:
        with open(os.path.join(store.root, name)) as f:
            v = json.load(f)
        return v if isinstance(v, dict) else {}
    except (OSError, ValueError):
        return {}


def insecure_registries(store: Store) -> list[str]:
    return list(_root_json(store, "config.json").get("insecure-registries") or [])


def stored_creds(store: Store, registry: str) -> tuple[str, str] | None:
    auths = _root_json(store, "auth.json").get("auths") or {}
    for key in (registry, "https://" + registry, "http://" + registry):
        ent = auths.get(key)
        if ent and ent.get("auth"):
            try:
                user, _, pw = base64.b64decode(ent["auth"]).decode().partition(":")
                return user, pw
            except ValueError:
                raise AuthError(f"auth.json: bad auth entry for {registry}") from None
    return None


# -- progress ------------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Progress:
    """Per-blob progress on stderr: a redrawn bar on a terminal, one line per blob
    otherwise; nothing when quiet."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0

    def line(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=self.stream, flush=True)

    def update(self, what: str, done: int, total: int | None) -> None:
        if self.quiet or not self.tty:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and (total is None or done < total):
            return
        self._last = now
        if total:
            n = int(30 * done / max(total, 1))
            bar = "[" + "=" * n + " " * (30 - n) + "]"
            self.stream.write(f"\r{what} {bar} {_size(done)} / {_size(total)}\x1b[K")
        else:
            self.stream.write(f"\r{what} {_size(done)}\x1b[K")
        self.stream.flush()

    def done(self, what: str, msg: str) -> None:
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.line(f"{what} {msg}")


# -- HTTP --------------------------------------------------------------------------------------


class _Response:
    """A finished or streaming response."""

    def __init__(self, resp: http.client.HTTPResponse, conn):
        self.resp, self.conn = resp, conn
        self.status = resp.status
        self.headers = resp.headers

    def header(self, name: str, default=None):
        return self.resp.getheader(name, default)

    def read(self, n: int = -1) -> bytes:
        return self.resp.read(n) if n >= 0 else self.resp.read()

    def body(self, limit: int = MAX_MANIFEST) -> bytes:
        data = self.resp.read(limit + 1)
        if len(data) > limit:
            raise RegistryError("response too large")
        return data

    def close(self) -> None:
        self.resp.close()


def _error_text(resp: _Response) -> str:
    try:
        data = resp.body(64 << 10)
    except Exception:
        return ""
    try:
        errs = json.loads(data).get("errors") or []
        return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errs)
    except (ValueError, AttributeError):
        return data[:200].decode(errors="replace").strip()


TRANSIENT = (ConnectionError, socket.timeout, http.client.HTTPException, ssl.SSLError, OSError)


class Client:
    """One registry host.  Keeps a connection, the scheme found, and auth tokens."""

    def __init__(self, registry: str, *, tls_verify: bool = True, insecure: bool = False,
                 creds: tuple[str, str] | None = None, timeout: float = 60.0, retries: int = 3,
                 chunk_size: int = 16 << 20, progress: Progress | None = None):
        self.registry = registry
        self.host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
        self.insecure = insecure or not tls_verify
        self.creds = creds
        self.timeout = timeout
        self.retries = retries
        self.chunk_size = chunk_size
        self.progress = progress or Progress(quiet=True)
        self.scheme: str | None = None
        self._conns: dict[tuple[str, str], http.client.HTTPConnection] = {}
        self._tokens: dict[str, str] = {}
        self._basic = False
        self._challenge: tuple[str, dict] | None = None
        self.stats = {"blobs_uploaded": 0, "bytes_uploaded": 0, "blobs_skipped": 0, "blobs_mounted": 0,
                      "blobs_downloaded": 0, "bytes_downloaded": 0, "bytes_resumed": 0,
                      "layers_reused": 0, "manifests_put": 0, "chunks": 0, "requests": 0}

    # connections

    def _conn(self, scheme: str, host: str) -> http.client.HTTPConnection:
        key = (scheme, host)
        c = self._conns.get(key)
        if c is None:
            if scheme == "https":
                ctx = ssl.create_default_context()
                if self.insecure:
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                c = http.client.HTTPSConnection(host, timeout=self.timeout, context=ctx)
            else:
                c = http.client.HTTPConnection(host, timeout=self.timeout)
            self._conns[key] = c
        return c

    def _drop_conn(self, scheme: str, host: str) -> None:
        c = self._conns.pop((scheme, host), None)
        if c is not None:
            c.close()

    def close(self) -> None:
        for c in self._conns.values():
            c.close()
        self._conns.clear()

    def _raw(self, method: str, url: str, headers: dict, body=None) -> _Response:
        u = urllib.parse.urlsplit(url)
        path = u.path + ("?" + u.query if u.query else "")
        c = self._conn(u.scheme, u.netloc)
        h = {"User-Agent": USER_AGENT, **headers}
        self.stats["requests"] += 1
        try:
            c.request(method, path or "/", body=body, headers=h)
            resp = c.getresponse()
        except BaseException:
            self._drop_conn(u.scheme, u.netloc)
            raise
        return _Response(resp, c)

    def base(self) -> str:
        if self.scheme is None:
            self._ping()
        return f"{self.scheme}://{self.host}"

    def _ping(self) -> None:
        """Find the scheme (https; http for an insecure registry that has no TLS) and the
        auth challenge of GET /v2/."""
        schemes = ["https", "http"] if self.insecure else ["https"]
        last = None
        for scheme in schemes:
            for attempt in range(self.retries):
                try:
                    r = self._raw("GET", f"{scheme}://{self.host}/v2/", {})
                    r.read()
                except ssl.SSLError as e:
                    last = e
                    self._drop_conn(scheme, self.host)
                    break  # not TLS: try the next scheme
                except TRANSIENT as e:
                    last = e
                    self._drop_conn(scheme, self.host)
                    if isinstance(e, ConnectionRefusedError):
                        break
                    time.sleep(0.2 * (attempt + 1))
                    continue
                if r.status >= 500:
                    last = RegistryError(f"HTTP {r.status}")
                    time.sleep(0.2 * (attempt + 1))
                    continue
                self.scheme = scheme
                if r.status == 401:
                    self._challenge = _parse_challenge(r.header("WWW-Authenticate", ""))
                elif r.status not in (200, 404):
                    # 404: not a v2 registry root, but some serve the API anyway
                    pass
                return
        hint = "" if self.insecure else " (for a plain-http registry use --tls-verify=false or insecure-registries)"
        raise RegistryError(f"can't reach registry {self.registry}: {_why(last)}{hint}")

    def request(self, method: str, path: str, *, scope: str, headers: dict | None = None, body=None,
                ok=(200,), idempotent: bool | None = None, what: str = "") -> _Response:
        """An API request with auth and (for GET/HEAD) retries on transient failures."""
        url = path if "://" in path else self.base() + path
        idempotent = method in ("GET", "HEAD") if idempotent is None else idempotent
        attempts = self.retries if idempotent else 1
        auth_tries = 0
        redirects = 0
        attempt = 0
        start = body.tell() if hasattr(body, "tell") else None
        while True:
            h = dict(headers or {})
            auth = self._auth_header(scope, url)
            if auth:
                h["Authorization"] = auth
            try:
                r = self._raw(method, url, h, body)
            except TRANSIENT as e:
                attempt += 1
                if attempt >= attempts:
                    raise RegistryError(f"{what or method + ' ' + _short(url)}: {_why(e)}") from None
                time.sleep(0.2 * attempt)
                continue
            if r.status == 401 and auth_tries < 1:
                auth_tries += 1
                ch = _parse_challenge(r.header("WWW-Authenticate", ""))
                r.read()
                self._authenticate(ch, scope)
                if start is not None:
                    body.seek(start)
                continue
            if r.status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD"):
                loc = r.header("Location")
                r.read()
                if not loc:
                    raise RegistryError(f"{what}: redirect without a Location")
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise RegistryError(f"{what or method + ' ' + _short(url)}: too many redirects")
                url = urllib.parse.urljoin(url, loc)
                continue
            if r.status >= 500 and attempt + 1 < attempts:
                attempt += 1
                r.read()
                time.sleep(0.2 * attempt)
                continue
            if r.status not in ok:
                text = _error_text(r) if method != "HEAD" else ""
                if r.status == 401:
                    raise AuthError(f"{what or method}: {self.registry} refused the credentials (401)"
                                    + (f": {text}" if text else "")
                                    + ("" if self.creds else "; give --creds USER:PASS"))
                if r.status == 403:
                    raise AuthError(f"{what or method}: access denied by {self.registry} (403)"
                                    + (f": {text}" if text else ""))
                raise RegistryError(f"{what or method + ' ' + _short(url)}: HTTP {r.status}"
                                    + (f" ({text})" if text else ""))
            return r

    # auth

    def _auth_header(self, scope: str, url: str) -> str | None:
        if urllib.parse.urlsplit(url).netloc != self.host:
            return None  # never send credentials to a redirect target
        if scope in self._tokens:
            return "Bearer " + self._tokens[scope]
        if self._challenge and self._challenge[0] == "bearer" and not self._basic:
            self._authenticate(self._challenge, scope)
            if scope in self._tokens:
                return "Bearer " + self._tokens[scope]
        if self._basic and self.creds:
            return "Basic " + base64.b64encode(f"{self.creds[0]}:{self.creds[1]}".encode()).decode()
        return None

    def _authenticate(self, ch: tuple[str, dict] | None, scope: str) -> None:
        if ch is None:
            raise AuthError(f"{self.registry} answered 401 without an auth challenge")
        kind, params = ch
        self._challenge = ch
        if kind == "basic":
            if not self.creds:
                raise AuthError(f"{self.registry} requires a login (HTTP Basic, 401); give --creds USER:PASS "
                                "or an auth.json entry")
            if self._basic:
                raise AuthError(f"{self.registry} refused the credentials for {self.creds[0]} (401)")
            self._basic = True
            return
        if kind != "bearer":
            raise AuthError(f"{self.registry}: unsupported auth scheme {kind!r}")
        realm = params.get("realm")
        if not realm:
            raise AuthError(f"{self.registry}: bearer challenge without a realm")
        q = {"service": params["service"]} if params.get("service") else {}
        query = urllib.parse.urlencode(q)
        for s in scope.split(" "):
            query += ("&" if query else "") + urllib.parse.urlencode({"scope": s})
        url = realm + ("&" if "?" in realm else "?") + query
        h = {}
        if self.creds:
            h["Authorization"] = "Basic " + base64.b64encode(f"{self.creds[0]}:{self.creds[1]}".encode()).decode()
        u = urllib.parse.urlsplit(url)
        try:
            r = self._raw("GET", url, h)
            data = r.body(1 << 20)
        except TRANSIENT as e:
            raise AuthError(f"token service {u.netloc}: {_why(e)}") from None
        if r.status != 200:
            raise AuthError(f"token service {u.netloc} refused ({r.status})"
                            + ("" if self.creds else "; give --creds USER:PASS"))
        try:
            doc = json.loads(data)
            tok = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            tok = None
        if not tok:
            raise AuthError(f"token service {u.netloc} sent no token")
        self._tokens[scope] = tok

    # reads

    def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index; verified against *ref* when
        it is a digest and against the Docker-Content-Digest header."""
        r = self.request("GET", f"/v2/{repo}/manifests/{ref}", scope=f"repository:{repo}:pull",
                         headers={"Accept": ACCEPT}, what=f"manifest {repo}:{ref}")
        data = r.body()
        d = digest_of(data)
        if ref.startswith("sha256:") and d != ref:
            raise DigestMismatch(f"manifest {repo}@{ref}: the registry sent content with digest {d}")
        hd = r.header("Docker-Content-Digest")
        if hd and hd.startswith("sha256:") and hd != d:
            raise DigestMismatch(f"manifest {repo}:{ref}: content digest {d} != Docker-Content-Digest {hd}")
        mt = (r.header("Content-Type") or "").split(";")[0].strip()
        try:
            doc = json.loads(data)
        except ValueError:
            raise RegistryError(f"manifest {repo}:{ref} is not JSON") from None
        mt = doc.get("mediaType") or mt
        return data, mt, d

    def blob_exists(self, repo: str, digest: str, scope: str | None = None) -> bool:
        r = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", scope=scope or f"repository:{repo}:pull",
                         ok=(200, 404), what=f"HEAD blob {digest[:19]}")
        r.read()
        return r.status == 200

    def get_blob_bytes(self, repo: str, desc: dict, limit: int = MAX_MANIFEST) -> bytes:
        r = self.request("GET", f"/v2/{repo}/blobs/{desc['digest']}", scope=f"repository:{repo}:pull",
                         what=f"blob {desc['digest'][:19]}")
        data = r.body(limit)
        if digest_of(data) != desc["digest"]:
            raise DigestMismatch(f"blob {desc['digest']}: the registry sent content with digest "
                                 f"{digest_of(data)}; nothing stored")
        return data

    def fetch_blob(self, repo: str, desc: dict, dest_dir: str) -> str:
        """Download a blob into *dest_dir*/<hex>, resuming a .partial left by an earlier
        attempt.  Verified; a mismatch deletes it and raises."""
        digest = desc["digest"]
        hexd = check_digest(digest)
        final = os.path.join(dest_dir, hexd)
        if os.path.exists(final) and local.file_digest(final) == digest:
            return final
        part = final + ".partial"
        size = desc.get("size")
        label = f"Copying blob {hexd[:12]}"
        attempt = 0
        while True:
            have = os.path.getsize(part) if os.path.exists(part) else 0
            if size is not None and have > size:
                os.unlink(part)
                have = 0
            if size is not None and have == size and have > 0:
                break
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                r = self.request("GET", f"/v2/{repo}/blobs/{digest}", scope=f"repository:{repo}:pull",
                                 headers=headers, ok=(200, 206, 416), what=f"blob {digest[:19]}")
                if r.status == 416:
                    r.read()
                    if size is None:
                        break
                    os.unlink(part)
                    raise RegistryError(f"blob {digest[:19]}: the registry refused to resume")
                mode = "ab" if r.status == 206 else "wb"
                if r.status == 206:
                    self.stats["bytes_resumed"] += have
                else:
                    have = 0
                total = size if size is not None else None
                with open(part, mode) as f:
                    while True:
                        b = r.read(local.CHUNK)
                        if not b:
                            break
                        f.write(b)
                        have += len(b)
                        self.stats["bytes_downloaded"] += len(b)
                        self.progress.update(label, have, total)
                        if size is not None and have > size:
                            break
                if size is None or have >= size:
                    break
                raise ConnectionError(f"connection closed after {have} of {size} bytes")
            except (RegistryError,) + TRANSIENT as e:
                if isinstance(e, (AuthError, DigestMismatch)):
                    raise
                if isinstance(e, RegistryError) and "HTTP 4" in str(e):
                    raise
                self._drop_conn(self.scheme or "https", self.host)
                attempt += 1
                if attempt >= self.retries:
                    kept = os.path.getsize(part) if os.path.exists(part) else 0
                    raise RegistryError(f"blob {digest[:19]}: download failed ({_why(e)}); {_size(kept)} "
                                        "kept, the next pull resumes") from None
                time.sleep(0.2 * attempt)
        got = local.file_digest(part)
        if got != digest or (size is not None and os.path.getsize(part) != size):
            os.unlink(part)
            raise DigestMismatch(f"blob {digest}: downloaded content has digest {got}; discarded, nothing stored")
        os.rename(part, final)
        self.stats["blobs_downloaded"] += 1
        self.progress.done(label, f"done ({_size(os.path.getsize(final))})")
        return final

    # writes

    def mount_blob(self, repo: str, digest: str, sources: list[str]) -> bool:
        """Cross-repository mount of *digest* from one of *sources* (same registry)."""
        scope = f"repository:{repo}:pull,push"
        for src in sources:
            q = urllib.parse.urlencode({"mount": digest, "from": src})
            r = self.request("POST", f"/v2/{repo}/blobs/uploads/?{q}", scope=f"{scope} repository:{src}:pull",
                             ok=(201, 202), what=f"mount {digest[:19]} from {src}")
            r.read()
            if r.status == 201:
                self.stats["blobs_mounted"] += 1
                self.progress.done(f"Copying blob {check_digest(digest)[:12]}", f"mounted from {src}")
                return True
            loc = r.header("Location")  # the registry opened an upload instead: cancel it
            if loc:
                with _ignore():
                    self.request("DELETE", urllib.parse.urljoin(self.base() + "/", loc), scope=scope,
                                 ok=(200, 204, 404), what="cancel upload").read()
        return False

    def upload_blob(self, repo: str, path: str, digest: str, size: int) -> str:
        """Make blob *digest* (the file *path*) exist in *repo*: 'skipped' (it was there)
        or 'uploaded'."""
        scope = f"repository:{repo}:pull,push"
        label = f"Copying blob {check_digest(digest)[:12]}"
        if self.blob_exists(repo, digest, scope):
            self.stats["blobs_skipped"] += 1
            self.progress.done(label, "skipped: already exists")
            return "skipped"
        location = None
        if location is None:
            r = self.request("POST", f"/v2/{repo}/blobs/uploads/", scope=scope, ok=(202,),
                             what=f"start upload of {digest[:19]}")
            r.read()
            location = r.header("Location")
        if not location:
            raise RegistryError(f"upload of {digest[:19]}: the registry sent no Location")
        location = urllib.parse.urljoin(self.base() + "/", location)
        with open(path, "rb") as f:
            if size > self.chunk_size:
                sent = 0
                while sent < size:
                    n = min(self.chunk_size, size - sent)
                    chunk = f.read(n)
                    r = self.request("PATCH", location, scope=scope, body=chunk, ok=(202,),
                                     headers={"Content-Type": "application/octet-stream",
                                              "Content-Length": str(n),
                                              "Content-Range": f"{sent}-{sent + n - 1}"},
                                     what=f"upload chunk of {digest[:19]}")
                    r.read()
                    location = urllib.parse.urljoin(location, r.header("Location") or location)
                    sent += n
                    self.stats["chunks"] += 1
                    self.stats["bytes_uploaded"] += n
                    self.progress.update(label, sent, size)
                r = self.request("PUT", _with_digest(location, digest), scope=scope, body=b"", ok=(201,),
                                 headers={"Content-Length": "0"}, what=f"finish upload of {digest[:19]}")
            else:
                r = self.request("PUT", _with_digest(location, digest), scope=scope, body=f, ok=(201,),
                                 headers={"Content-Type": "application/octet-stream",
                                          "Content-Length": str(size)},
                                 what=f"upload {digest[:19]}")
                self.stats["bytes_uploaded"] += size
        r.read()
        self.stats["blobs_uploaded"] += 1
        self.progress.done(label, f"uploaded ({_size(size)})")
        return "uploaded"

    def put_manifest(self, repo: str, tag: str, data: bytes, media_type: str) -> str:
        digest = digest_of(data)
        scope = f"repository:{repo}:pull,push"
        r = self.request("HEAD", f"/v2/{repo}/manifests/{tag}", scope=scope, ok=(200, 404),
                         headers={"Accept": media_type}, what=f"HEAD manifest {repo}:{tag}")
        r.read()
        if r.status == 200 and r.header("Docker-Content-Digest") == digest:
            return digest
        r = self.request("PUT", f"/v2/{repo}/manifests/{tag}", scope=scope, body=data, ok=(200, 201),
                         headers={"Content-Type": media_type, "Content-Length": str(len(data))},
                         what=f"manifest {repo}:{tag}")
        r.read()
        self.stats["manifests_put"] += 1
        return digest


def _with_digest(location: str, digest: str) -> str:
    return location + ("&" if "?" in location else "?") + urllib.parse.urlencode({"digest": digest})


def _short(url: str) -> str:
    u = urllib.parse.urlsplit(url)
    return u.path


def _why(e) -> str:
    if e is None:
        return "no answer"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _parse_challenge(h: str) -> tuple[str, dict] | None:
    h = h.strip()
    if not h:
        return None
    kind, _, rest = h.partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return kind.lower(), params


# -- pull ----------------------------------------------------------------------------------------


def select_manifest(index: dict, platform: str | None) -> dict:
    os_, arch, variant = "linux", goarch(), None
    if platform:
        parts = platform.split("/")
        os_, arch = parts[0], parts[1] if len(parts) > 1 else goarch()
        variant = parts[2] if len(parts) > 2 else None
    cands = []
    for d in index.get("manifests", []):
        p = d.get("platform") or {}
        if p.get("os") == os_ and p.get("architecture") == arch and (variant is None or p.get("variant") == variant):
            cands.append(d)
    if not cands:
        have = sorted({"/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x)
                       for p in (d.get("platform") or {} for d in index.get("manifests", []))})
        raise RegistryError(f"no image for {os_}/{arch}{'/' + variant if variant else ''} in the index "
                            f"(it has: {', '.join(have) or 'none'})")
    return cands[0]


def pull(store: Store, name: str, *, tls_verify: bool = True, creds: tuple[str, str] | None = None,
         platform: str | None = None, progress: Progress | None = None, client: Client | None = None,
         tag_image: bool = True) -> tuple[Image, Client]:
    ref = parse_reference(name)
    progress = progress or Progress()
    c = client or make_client(store, ref.registry, tls_verify=tls_verify, creds=creds, progress=progress)
    repo = ref.repo
    data, mt, mdigest = c.get_manifest(repo, ref.digest or ref.tag or "latest")
    doc = json.loads(data)
    if mt in INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
        desc = select_manifest(doc, platform)
        data, mt, mdigest = c.get_manifest(repo, desc["digest"])
        doc = json.loads(data)
    if mt not in MANIFEST_TYPES and "layers" not in doc:
        raise RegistryError(f"{ref}: unsupported manifest type {mt!r} (schema 1 images are not supported)")
    cdesc = doc.get("config") or {}
    check_digest(cdesc.get("digest", ""))
    config = c.get_blob_bytes(repo, cdesc)
    cfg = json.loads(config)
    diff_ids = (cfg.get("rootfs") or {}).get("diff_ids") or []
    layers = doc.get("layers") or []
    if len(diff_ids) != len(layers):
        raise RegistryError(f"{ref}: the config lists {len(diff_ids)} layers, the manifest {len(layers)}")
    for ld in layers:
        check_digest(ld.get("digest", ""))
        if ld.get("mediaType") in local.FOREIGN_LAYERS:
            raise RegistryError(f"{ref}: foreign layer {ld['digest'][:19]} can't be pulled")
    downloads = local.oci_dir(store, "downloads")
    # A pull of the same blob by another process (two pulls of one image) shares the
    # download file: each blob is locked (flock on downloads/<hex>.lock) from its download
    # to its import; the second pull waits, then finds the layer in the store.  Taken in
    # digest order, so pulls of images sharing layers in any order can't deadlock.
    locks = contextlib.ExitStack()
    with locks:
        for digest in sorted({ld["digest"] for ld, d in zip(layers, diff_ids) if not store.has_layer(d)}):
            locks.enter_context(_blob_lock(downloads, digest))
        return _pull_locked(store, c, ref, repo, mdigest, config, layers, diff_ids, downloads, progress, tag_image)


@contextlib.contextmanager
def _blob_lock(downloads: str, digest: str):
    """flock on downloads/<hex>.lock, removed by its holder when done (a waiter that
    then wins the old, unlinked file sees it is not the one at the path, and retries)."""
    path = os.path.join(downloads, check_digest(digest) + ".lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _pull_locked(store, c, ref, repo, mdigest, config, layers, diff_ids, downloads, progress, tag_image):
    fetched: dict[str, str] = {}
    repo_key = f"{ref.registry}/{repo}"
    # 1. every missing blob, verified (resumable)
    for ld, diff_id in zip(layers, diff_ids):
        if store.has_layer(diff_id):
            continue
        if ld["digest"] not in fetched:
            fetched[ld["digest"]] = c.fetch_blob(repo, ld, downloads)
    # 2. unpack; undo on failure
    added: list[str] = []
    try:
        for ld, diff_id in zip(layers, diff_ids):
            label = f"layer {ld['digest'][:19]}"
            if store.has_layer(diff_id):
                local.import_layer(store, None, diff_id, label, added)
                c.stats["layers_reused"] += 1
                progress.done(f"Copying blob {ld['digest'][7:19]}", "skipped: already in the store")
            else:
                with open(fetched[ld["digest"]], "rb") as f:
                    local.import_layer(store, f, diff_id, label, added)
            local.record_blob(store, diff_id, ld["digest"], ld.get("mediaType", OCI_LAYER_GZIP),
                              ld.get("size", 0), repo_key)
        image = local.put_image_bytes(store, config)
    except BaseException:
        local.discard_layers(store, added)
        raise
    for p in fetched.values():
        with _ignore():
            os.unlink(p)
    if tag_image and ref.tag:
        store.tag(image, f"{ref.local_name}:{ref.tag}")
    progress.line(f"Digest: {mdigest}")
    return image, c


class _ignore:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return True


def make_client(store: Store, registry: str, *, tls_verify: bool = True, creds=None, progress=None,
                **kw) -> Client:
    insecure = registry in insecure_registries(store)
    if creds is None:
        creds = stored_creds(store, registry)
    return Client(registry, tls_verify=tls_verify, insecure=insecure, creds=creds,
                  progress=progress or Progress(), **kw)


# -- push ----------------------------------------------------------------------------------------


def _oci_layer_type(media_type: str) -> str:
    if media_type.endswith("zstd"):
        return OCI_LAYER_ZSTD
    if media_type.endswith("gzip"):
        return OCI_LAYER_GZIP
    return OCI_LAYER


def push(store: Store, name: str, *, tls_verify: bool = True, creds=None, progress: Progress | None = None,
         client: Client | None = None, chunk_size: int | None = None) -> tuple[str, Client]:
    """Push local image *name* to the registry its name points at.  Returns the manifest
    digest."""
    ref = parse_reference(name)
    if ref.digest:
        raise RegistryError("push takes NAME[:TAG], not a digest")
    image = store.resolve(name)
    progress = progress or Progress()
    c = client or make_client(store, ref.registry, tls_verify=tls_verify, creds=creds, progress=progress)
    if chunk_size:
        c.chunk_size = chunk_size
    repo = ref.repo
    repo_key = f"{ref.registry}/{repo}"
    prefix = ref.registry + "/"
    config = local.config_bytes(store, image)
    stage = store.staging()
    try:
        descs = []
        mapping = {}
        for diff_id in image.diff_ids:
            desc = None
            scope = f"repository:{repo}:pull,push"
            for kb in local.known_blobs(store, diff_id):
                label = f"Copying blob {kb['digest'][7:19]}"
                if c.blob_exists(repo, kb["digest"], scope):
                    c.stats["blobs_skipped"] += 1
                    progress.done(label, "skipped: already exists")
                    desc = kb
                    break
                others = [r[len(prefix):] for r in kb.get("repos", [])
                          if r.startswith(prefix) and r[len(prefix):] != repo]
                if others and c.mount_blob(repo, kb["digest"], others):
                    desc = kb
                    break
            if desc is None:
                tar_path, got, _ = local.export_layer_file(store, diff_id, stage)
                if got != diff_id:
                    mapping[diff_id] = got
                gz = tar_path + ".gz"
                digest, size = local.gzip_file(tar_path, gz)
                os.unlink(tar_path)
                c.upload_blob(repo, gz, digest, size)
                os.unlink(gz)
                desc = {"digest": digest, "mediaType": OCI_LAYER_GZIP, "size": size}
                if got == diff_id:
                    local.record_blob(store, diff_id, digest, OCI_LAYER_GZIP, size, None)
            descs.append(desc)
            if not mapping or diff_id not in mapping:
                local.record_blob(store, diff_id, desc["digest"], desc["mediaType"], desc["size"], repo_key)
        if mapping:
            config = local.rewrite_diff_ids(config, mapping)
            progress.line(f"warning: the original tar of {len(mapping)} layer(s) was not kept (made by import?); "
                          f"pushed re-packed layers, so the pushed image's id is {digest_of(config)[:19]}")
        cdigest = digest_of(config)
        cpath = os.path.join(stage, "config.json")
        with open(cpath, "wb") as f:
            f.write(config)
        c.upload_blob(repo, cpath, cdigest, len(config))
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": len(config)},
            "layers": [{"mediaType": _oci_layer_type(d["mediaType"]), "digest": d["digest"], "size": d["size"]}
                       for d in descs],
        }
        mdata = json.dumps(manifest, indent=None, separators=(",", ":")).encode()
        digest = c.put_manifest(repo, ref.tag or "latest", mdata, OCI_MANIFEST)
        progress.line(f"Digest: {digest}")
        return digest, c
    finally:
        shutil.rmtree(stage, ignore_errors=True)
