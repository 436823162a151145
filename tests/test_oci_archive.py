"""save / load against real peers: skopeo, podman, umoci; compression; whiteouts; bad input."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile

import pytest

from test_oci_common import (busybox_tar, docker_archive, image_layers, layer_tar,  # noqa: F401
                             loaded, need, oci, oci_archive, ok, podman, sha, store_state, tree_without_times,
                             uf)
from unionfuse.store.store import Store


def _diff_ids(root, name):
    return Store(str(root)).resolve(name).diff_ids


def test_load_keeps_config_bytes_and_ids(loaded, image_layers):
    root, config_digest = loaded
    img = Store(str(root)).resolve("test/img:1")
    assert img.id == config_digest  # the image id is the digest of the config bytes received
    assert img.diff_ids == [sha(x) for x in image_layers]
    data = (root / "images" / (config_digest[7:] + ".json")).read_bytes()
    assert sha(data) == config_digest and b"\n  " in data  # stored as received, not re-serialised


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive"])
def test_save_load_round_trip_same_ids_no_new_layers(loaded, tmp_path, fmt):
    root, config_digest = loaded
    out = tmp_path / f"out-{fmt}.tar"
    ok(root, "save", "test/img:1", "-o", out, "--format", fmt)
    before = store_state(root)
    assert "Loaded image: test/img:1" in ok(root, "load", "-i", out)
    assert store_state(root)[:2] == before[:2]  # same store: layers reused, nothing duplicated
    fresh = tmp_path / "fresh"
    ok(fresh, "load", "-i", out)
    assert Store(str(fresh)).resolve("test/img:1").id == config_digest
    assert _diff_ids(fresh, "test/img:1") == _diff_ids(root, "test/img:1")
    # and again: save from the fresh store is byte-identical in its layers
    out2 = tmp_path / "out2.tar"
    ok(fresh, "save", "test/img:1", "-o", out2, "--format", fmt)
    with tarfile.open(out) as a, tarfile.open(out2) as b:
        assert sorted(m.name for m in a) == sorted(m.name for m in b)


def test_skopeo_inspects_both_formats(loaded, tmp_path, image_layers):
    need("skopeo")
    root, config_digest = loaded
    da, oa = tmp_path / "d.tar", tmp_path / "o.tar"
    ok(root, "save", "test/img:1", "-o", da)
    ok(root, "save", "test/img:1", "-o", oa, "--format", "oci-archive")
    want = [sha(x) for x in image_layers]
    for src in (f"docker-archive:{da}", f"docker-archive:{da}:test/img:1", f"oci-archive:{oa}:1"):
        r = subprocess.run(["skopeo", "inspect", src], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["Layers"] == want and info["Architecture"] == "amd64"
    r = subprocess.run(["skopeo", "inspect", "--raw", "--config", f"oci-archive:{oa}:1"], capture_output=True)
    assert r.returncode == 0 and sha(r.stdout) == config_digest  # config bytes travel unchanged


def test_imported_image_saves_with_its_original_diff_id(tmp_path, busybox_tar):
    """`import` keeps a record of the exact tar: save gives the same layer back."""
    import hashlib

    root = tmp_path / "root"
    (tmp_path / "bb.tar").write_bytes(busybox_tar)
    uf(root, "import", tmp_path / "bb.tar", "bb")
    rc, _, err = oci(root, "save", "bb", "-o", tmp_path / "s.tar")
    assert rc == 0 and "re-packed" not in err
    with tarfile.open(tmp_path / "s.tar") as tf:
        assert hashlib.sha256(busybox_tar).hexdigest() + ".tar" in tf.getnames()
    out = ok(tmp_path / "r2", "load", "-i", tmp_path / "s.tar")
    assert "Loaded image: bb:latest" in out


def test_podman_loads_and_runs_our_save(loaded, tmp_path, podman):
    root, _ = loaded
    for fmt in ("docker-archive", "oci-archive"):
        out = tmp_path / f"p-{fmt}.tar"
        ok(root, "save", "test/img:1", "-o", out, "--format", fmt)
        r = podman("load", "-i", out)
        assert "img" in r.stdout + r.stderr
    name = "localhost/test/img:1"
    r = podman("run", "--rm", "--network=none", name, "sh", "-c",
               "cat /etc/marker /etc/top /srv/c/new; ls /srv; ls /srv/a; ls /srv/c")
    assert r.stdout.split() == ["made", "by", "hand", "top", "layer", "new", "a", "c", "y", "new"]


def _listing(run):
    script = ("find /bin /sbin /usr /etc/passwd /etc/group /home /root /srv /tmp -xdev 2>/dev/null | sort; "
              "md5sum /bin/busybox /etc/passwd /etc/group /etc/marker /srv/a/y 2>&1")
    return run(script)


def test_our_load_of_podman_save_runs_same_tree(loaded, tmp_path, podman):
    root, _ = loaded
    src = tmp_path / "src.tar"
    ok(root, "save", "test/img:1", "-o", src)
    podman("load", "-i", src)
    podman("tag", "localhost/test/img:1", "localhost/pod/made:2")
    theirs = _listing(lambda s: podman("run", "--rm", "--network=none", "localhost/pod/made:2",
                                       "sh", "-c", s).stdout)
    for fmt in ("docker-archive", "oci-archive"):
        ps = tmp_path / f"podman-{fmt}.tar"
        podman("save", "--format", fmt, "-o", ps, "localhost/pod/made:2")
        fresh = tmp_path / f"fresh-{fmt}"
        out = ok(fresh, "load", "-i", ps)
        assert "pod/made:2" in out, out
        name = "localhost/pod/made:2"
        ours = _listing(lambda s: uf(fresh, "run", "--rm", name, "sh", "-c", s).stdout)
        assert ours == theirs
        assert "/srv/a/x" not in ours and "/srv/c/keep" not in ours and "/srv/c/new" in ours


def test_umoci_unpack_matches_our_rootfs(loaded, tmp_path, mounts):
    need("umoci")
    root, _ = loaded
    oa = tmp_path / "o.tar"
    ok(root, "save", "test/img:1", "-o", oa, "--format", "oci-archive")
    layout = tmp_path / "layout"
    layout.mkdir()
    with tarfile.open(oa) as tf:
        tf.extractall(layout)
    bundle = tmp_path / "bundle"
    r = subprocess.run(["umoci", "unpack", "--image", f"{layout}:1", str(bundle)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    s = Store(str(root))
    d = mounts.union(s.layer_dirs(s.resolve("test/img:1")))
    ours, theirs = tree_without_times(d.mountpoint), tree_without_times(bundle / "rootfs")
    assert ours == theirs
    assert "srv/c/new" in ours and "srv/c/keep" not in ours and "srv/b" not in ours and "etc/hostname" not in ours


@pytest.mark.parametrize("how", ["gzip", "zstd"])
def test_load_compressed_layers_from_skopeo(loaded, tmp_path, how, mounts):
    need("skopeo", "zstd")
    root, config_digest = loaded
    da = tmp_path / "d.tar"
    ok(root, "save", "test/img:1", "-o", da)
    layout = tmp_path / "layout"
    r = subprocess.run(["skopeo", "copy", "--dest-compress", "--dest-compress-format", how,
                        f"docker-archive:{da}", f"oci:{layout}:v1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    manifest = None
    for p in (layout / "blobs/sha256").iterdir():
        with open(p, "rb") as f:
            head = f.read(4)
        if how == "zstd" and head == b"\x28\xb5\x2f\xfd" or how == "gzip" and head[:2] == b"\x1f\x8b":
            manifest = True
    assert manifest, f"skopeo wrote no {how} layer"
    oa = tmp_path / "o.tar"
    with tarfile.open(oa, "w") as tf:
        for name in os.listdir(layout):
            tf.add(layout / name, arcname=name)
    fresh = tmp_path / "fresh"
    out = ok(fresh, "load", "-i", oa)
    assert "Loaded image ID" in out  # ref.name "v1" is only a tag: no name to give it
    s = Store(str(fresh))
    img = s.image_by_id(out.split("Loaded image ID: ")[1].split()[0])  # skopeo rewrote the config as OCI
    assert img.diff_ids == _diff_ids(root, "test/img:1")
    a = mounts.union(s.layer_dirs(img))
    b = mounts.union(Store(str(root)).layer_dirs(Store(str(root)).resolve("test/img:1")))
    assert tree_without_times(a.mountpoint) == tree_without_times(b.mountpoint)


def test_load_hand_made_zstd_and_gzip_oci(tmp_path, image_layers):
    for how in ("zstd", "gzip", None):
        arch = tmp_path / f"{how}.tar"
        cfg = oci_archive(arch, image_layers, tag="2", name=f"hand/{how or 'plain'}:2", compress_as=how)
        root = tmp_path / f"r-{how}"
        assert f"Loaded image: hand/{how or 'plain'}:2" in ok(root, "load", "-i", arch)
        assert Store(str(root)).resolve(f"hand/{how or 'plain'}:2").id == sha(cfg)


def test_whiteouts_and_opaque_dirs_applied(loaded, mounts):
    root, _ = loaded
    s = Store(str(root))
    d = mounts.union(s.layer_dirs(s.resolve("test/img:1")))
    m = d.mountpoint
    assert sorted(os.listdir(f"{m}/srv")) == ["a", "c"]
    assert os.listdir(f"{m}/srv/a") == ["y"]
    assert os.listdir(f"{m}/srv/c") == ["new"]
    assert not os.path.exists(f"{m}/etc/hostname") and open(f"{m}/etc/marker").read() == "made by hand\n"


# -- bad input --------------------------------------------------------------------------------


def _one_error(err: str) -> bool:
    lines = [x for x in err.splitlines() if x.startswith("unionfuse:")]
    return len(lines) == 1 and "Traceback" not in err


def _empty(root):
    layers, images, refs = store_state(root)
    return not layers and not images and not refs


def test_layer_escaping_root_refused_nothing_stored(tmp_path, image_layers):
    bad = layer_tar([("../../etc/evil", "x")])
    arch = tmp_path / "bad.tar"
    docker_archive(arch, [image_layers[1], bad], tags=["bad:1"])
    root = tmp_path / "root"
    rc, _, err = oci(root, "load", "-i", arch)
    assert rc != 0 and "../../etc/evil" in err and _one_error(err), err
    assert _empty(root) and not (tmp_path.parent / "etc" / "evil").exists()
    good = tmp_path / "good.tar"
    docker_archive(good, [image_layers[1]], tags=["good:1"])
    assert "Loaded image: good:1" in ok(root, "load", "-i", good)


def test_archive_member_escaping_root_refused(tmp_path, image_layers):
    arch = tmp_path / "bad.tar"
    docker_archive(arch, [image_layers[1]], tags=["bad:1"], layer_names={0: "../outside/layer.tar"})
    root = tmp_path / "root"
    rc, _, err = oci(root, "load", "-i", arch)
    assert rc != 0 and "leaves the archive root" in err, err
    assert _empty(root)


def test_layer_digest_mismatch_nothing_stored(tmp_path, image_layers):
    root = tmp_path / "root"
    # docker-archive: the config's diff_id names other content
    cfg = json.loads(docker_archive(tmp_path / "x.tar", image_layers[1:]))
    cfg["rootfs"]["diff_ids"][1] = sha(b"something else")
    arch = tmp_path / "bad.tar"
    docker_archive(arch, image_layers[1:], tags=["bad:1"], config=json.dumps(cfg).encode())
    rc, _, err = oci(root, "load", "-i", arch)
    assert rc != 0 and "image config says" in err, err
    assert _empty(root)  # the first (good) layer was removed again
    # OCI: a blob whose bytes don't match its digest
    arch2 = tmp_path / "bad2.tar"
    oci_archive(arch2, image_layers[1:], name="bad:2", corrupt_layer=1)
    rc, _, err = oci(root, "load", "-i", arch2)
    assert rc != 0 and "has digest" in err, err
    assert _empty(root)
    good = tmp_path / "good.tar"
    oci_archive(good, image_layers[1:], name="good:2")
    assert "Loaded image: good:2" in ok(root, "load", "-i", good)


def test_manifest_naming_missing_blob(tmp_path, image_layers):
    root = tmp_path / "root"
    arch = tmp_path / "bad.tar"
    oci_archive(arch, image_layers[1:], name="bad:1", drop_blob=1)
    rc, _, err = oci(root, "load", "-i", arch)
    assert rc != 0 and "missing from the archive" in err, err
    assert _empty(root)


def test_not_an_archive(tmp_path):
    p = tmp_path / "junk.tar"
    p.write_bytes(b"no tar here" * 100)
    rc, _, err = oci(tmp_path / "r", "load", "-i", p)
    assert rc != 0 and _one_error(err)
    rc, _, err = oci(tmp_path / "r", "save", "nosuch:1", "-o", tmp_path / "o.tar")
    assert rc != 0 and "no such image" in err and not (tmp_path / "o.tar").exists()
