"""pull / push against the distribution registry (docker-registry) on 127.0.0.1, and skopeo."""

from __future__ import annotations

import json
import subprocess

import pytest

from test_oci_common import (Registry, busybox_tar, docker_archive, image_config, image_layers,  # noqa: F401
                             layer_tar, loaded, need, oci, ok, registry, store_state, uf)
from unionfuse.oci import registry as reg
from unionfuse.oci.local import OCI_INDEX
from unionfuse.store.store import Store

Q = reg.Progress(quiet=True)


def _uploads_in_log(r: Registry, since: int) -> list[str]:
    return [x for x in r.log_text()[since:].splitlines()
            if ('"PUT /v2/' in x or '"PATCH /v2/' in x or '"POST /v2/' in x) and "/blobs/" in x]


def test_push_pull_round_trip_and_repush_uploads_nothing(loaded, tmp_path, registry):
    need("skopeo")
    root, config_digest = loaded
    name = f"{registry.host}/t/img:1"
    uf(root, "tag", "test/img:1", name)
    digest, c = reg.push(Store(str(root)), name, tls_verify=False, progress=Q)
    assert c.stats["blobs_uploaded"] == 4  # three layers and the config
    r = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{name}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["Digest"] == digest and len(info["Layers"]) == 3
    # re-push: every blob is there, the manifest too: nothing is uploaded
    mark = len(registry.log_text())
    _, c = reg.push(Store(str(root)), name, tls_verify=False, progress=Q)
    assert c.stats["blobs_uploaded"] == 0 and c.stats["manifests_put"] == 0 and c.stats["blobs_skipped"] == 4
    assert _uploads_in_log(registry, mark) == []
    # pull into a fresh store: same image id and diff_ids
    fresh = tmp_path / "fresh"
    out = ok(fresh, "pull", name, "--tls-verify=false")
    assert out.strip() == config_digest
    s = Store(str(fresh))
    assert s.resolve(name).diff_ids == Store(str(root)).resolve("test/img:1").diff_ids
    # pulled layers kept their tars: save from there equals save from the source
    assert "Loaded image" in ok(tmp_path / "third", "load", "-i", _save(fresh, name, tmp_path))
    # pulling into a store that has the layers downloads nothing
    uf(fresh, "tag", name, "keep:1")
    uf(fresh, "rmi", name)  # only the tag goes
    img, c = reg.pull(s, name, tls_verify=False, progress=Q)
    assert c.stats["blobs_downloaded"] == 0 and c.stats["layers_reused"] == 3 and img.id == config_digest
    assert len(store_state(fresh)[0]) == 3
    # and a pushed-then-pulled image pushes back as the very same manifest
    d2, c = reg.push(s, name, tls_verify=False, progress=Q)
    assert d2 == digest and c.stats["blobs_uploaded"] == 0


def _save(root, name, tmp_path):
    out = tmp_path / "saved.tar"
    ok(root, "save", name, "-o", out)
    return out


def test_chunked_upload_and_cross_repo_mount(loaded, registry):
    root, _ = loaded
    s = Store(str(root))
    a, b = f"{registry.host}/chunk/a:1", f"{registry.host}/chunk/b:1"
    uf(root, "tag", "test/img:1", a)
    uf(root, "tag", "test/img:1", b)
    _, c = reg.push(s, a, tls_verify=False, progress=Q, chunk_size=256 << 10)
    assert c.stats["chunks"] > 3 and c.stats["blobs_uploaded"] == 4
    _, c = reg.push(s, b, tls_verify=False, progress=Q)
    assert c.stats["blobs_mounted"] == 3 and c.stats["blobs_uploaded"] == 1  # only the config: never pulled
    r = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{b}"], capture_output=True)
    assert r.returncode == 0, r.stderr


def test_pull_of_skopeo_pushed_image_runs(tmp_path, image_layers, registry):
    need("skopeo")
    arch = tmp_path / "in.tar"
    docker_archive(arch, image_layers, tags=["sk/img:3"])
    name = f"{registry.host}/sk/img:3"
    r = subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"docker-archive:{arch}", f"docker://{name}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    root = tmp_path / "root"
    ok(root, "pull", name, "--tls-verify=false")
    out = uf(root, "run", "--rm", name, "sh", "-c", "cat /etc/marker; ls /srv/c").stdout
    assert out.split() == ["made", "by", "hand", "new"]
    # by digest too
    digest = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{name}"],
                                       capture_output=True, text=True).stdout)["Digest"]
    root2 = tmp_path / "root2"
    out = ok(root2, "pull", f"{registry.host}/sk/img@{digest}", "--tls-verify=false")
    assert out.strip() == Store(str(root)).resolve(name).id
    wrong = "sha256:" + "0" * 64
    rc, _, err = oci(root2, "pull", f"{registry.host}/sk/img@{wrong}", "--tls-verify=false")
    assert rc != 0 and "404" in err, err


def test_multi_arch_index_picks_platform(tmp_path, image_layers, registry):
    amd = tmp_path / "amd.tar"
    arm = tmp_path / "arm.tar"
    docker_archive(amd, image_layers[1:], tags=["m/amd:1"], config=image_config(image_layers[1:], label="amd"))
    extra = layer_tar([("arm", "arm64 only\n")])
    docker_archive(arm, [image_layers[1], extra], tags=["m/arm:1"],
                   config=image_config([image_layers[1], extra], arch="arm64", label="arm"))
    src = tmp_path / "src"
    ok(src, "load", "-i", amd)
    ok(src, "load", "-i", arm)
    s = Store(str(src))
    descs = []
    for local, arch in (("m/amd:1", "amd64"), ("m/arm:1", "arm64")):
        target = f"{registry.host}/multi/{arch}:1"
        uf(src, "tag", local, target)
        digest, c = reg.push(s, target, tls_verify=False, progress=Q)
        mdata, mt, _ = c.get_manifest(f"multi/{arch}", digest)
        descs.append({"mediaType": mt, "digest": digest, "size": len(mdata),
                      "platform": {"os": "linux", "architecture": arch}})
    # the index lives in one repo: its manifests must be there too (mount the blobs, put manifests)
    for arch, d in (("arm64", descs[1]), ("amd64", descs[0])):
        mdata, mt, _ = c.get_manifest(f"multi/{arch}", d["digest"])
        for blob in [json.loads(mdata)["config"]] + json.loads(mdata)["layers"]:
            if not c.blob_exists("multi/all", blob["digest"]):
                assert c.mount_blob("multi/all", blob["digest"], [f"multi/{arch}"])
        c.put_manifest("multi/all", d["digest"], mdata, mt)
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descs[::-1]}).encode()
    c.put_manifest("multi/all", "v1", index, OCI_INDEX)
    r = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/multi/all:v1"],
                       capture_output=True, text=True)
    assert json.loads(r.stdout)["mediaType"] == OCI_INDEX
    dst = tmp_path / "dst"
    name = f"{registry.host}/multi/all:v1"
    ok(dst, "pull", name, "--tls-verify=false")
    assert Store(str(dst)).resolve(name).config["config"]["Labels"] == {"t": "amd"}
    dst2 = tmp_path / "dst2"
    ok(dst2, "pull", name, "--tls-verify=false", "--platform", "linux/arm64")
    assert Store(str(dst2)).resolve(name).config["architecture"] == "arm64"
    rc, _, err = oci(dst2, "pull", name, "--tls-verify=false", "--platform", "linux/s390x")
    assert rc != 0 and "linux/amd64" in err and "linux/arm64" in err, err


def test_plain_http_needs_tls_verify_false_or_insecure_setting(loaded, tmp_path, registry):
    root, _ = loaded
    name = f"{registry.host}/t/img:1"
    uf(root, "tag", "test/img:1", name)
    ok(root, "push", name, "--tls-verify=false", "-q")
    fresh = tmp_path / "fresh"
    rc, _, err = oci(fresh, "pull", name)
    assert rc != 0 and "--tls-verify=false" in err, err
    assert store_state(fresh)[:2] == (set(), set())
    (fresh / "config.json").write_text(json.dumps({"insecure-registries": [registry.host]}))
    ok(fresh, "pull", name)


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory):
    need("htpasswd")
    line = subprocess.run(["htpasswd", "-Bbn", "alice", "s3cret"], capture_output=True, text=True,
                          check=True).stdout
    r = Registry(tmp_path_factory.mktemp("authreg"), htpasswd=line)
    yield r
    r.stop()


def test_basic_auth(loaded, tmp_path, auth_registry):
    root, config_digest = loaded
    name = f"{auth_registry.host}/sec/img:1"
    uf(root, "tag", "test/img:1", name)
    rc, _, err = oci(root, "push", name, "--tls-verify=false")
    assert rc != 0 and "401" in err and "--creds" in err, err
    rc, _, err = oci(root, "push", name, "--tls-verify=false", "--creds", "alice:wrong")
    assert rc != 0 and "refused" in err, err
    ok(root, "push", name, "--tls-verify=false", "--creds", "alice:s3cret")
    fresh = tmp_path / "fresh"
    rc, _, err = oci(fresh, "pull", name, "--tls-verify=false")
    assert rc != 0 and "401" in err and store_state(fresh)[:2] == (set(), set())
    import base64

    (fresh / "auth.json").write_text(json.dumps(
        {"auths": {auth_registry.host: {"auth": base64.b64encode(b"alice:s3cret").decode()}}}))
    assert ok(fresh, "pull", name, "--tls-verify=false").strip() == config_digest
