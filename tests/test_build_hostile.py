"""`unionfuse build` against hostile input: contexts whose paths or symlinks lead out,
images whose symlinks point at host paths, archives that try to escape ADD's destination.
Every case checks that nothing was read from or written to the host outside the context
and the store, and that the failing ones fail with one `Dockerfile:LINE:` line."""

from __future__ import annotations

import io
import os
import tarfile
import uuid

from test_build_helpers import build, busybox_tar, clean, has_ref, layer_path, ok, read, store, write

__all__ = ["busybox_tar", "store", "clean"]


def fails(r, line: int, *msgs: str) -> str:
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"unionfuse: Dockerfile:{line}: "), r.stderr
    for m in msgs:
        assert m in lines[0], r.stderr
    return lines[0]


# -- the context ---------------------------------------------------------------------------


def test_context_symlinks_and_paths_that_lead_out(clean, tmp_path):
    root = clean
    outside = tmp_path / "outside.txt"
    outside.write_text("host secret\n")
    ctx = write(tmp_path / "ctx", {"ok.txt": "ok\n", "inner/real.txt": "real\n"})
    os.symlink("/etc", ctx / "etc-link")
    os.symlink("/etc/passwd", ctx / "passwd-link")
    os.symlink("../outside.txt", ctx / "rel-out")
    os.symlink("inner/real.txt", ctx / "rel-in")
    os.symlink("../inner/../../outside.txt", ctx / "inner" / "sneaky")
    cases = [
        ("COPY etc-link/passwd /x", "leads outside the build context"),
        ("COPY etc-link /x/", "leads outside the build context"),
        ("COPY passwd-link /x", "leads outside the build context"),
        ("COPY rel-out /x", "leads outside the build context"),
        ("COPY inner/sneaky /x", "leads outside the build context"),
        ("COPY ../outside.txt /x", "outside the build context"),
        ("COPY inner/../../outside.txt /x", "outside the build context"),
        ("COPY /etc/passwd /x", "absolute path"),
        ("ADD etc-link/shadow /x", "leads outside the build context"),
    ]
    for i, (line, msg) in enumerate(cases):
        write(ctx, {"Dockerfile": f"FROM busybox\nCOPY ok.txt /ok\n{line}\n"})
        fails(build(root, ctx, "-t", f"hostile{i}"), 3, msg)
        assert not has_ref(root, f"hostile{i}")
    # a symlink inside the context that stays inside is followed (as docker does) ...
    write(ctx, {"Dockerfile": "FROM busybox\nCOPY rel-in /followed\nCOPY . /all/\n"})
    ok(build(root, ctx, "-t", "hostile-ok"))
    assert read(root, "hostile-ok", "/followed") == "real\n"
    # ... and links met while copying a directory are copied as links, never read
    for name, target in (("etc-link", "/etc"), ("passwd-link", "/etc/passwd"), ("rel-out", "../outside.txt")):
        p = layer_path(root, "hostile-ok", f"/all/{name}")
        assert os.path.islink(p) and os.readlink(p) == target
    assert os.readlink(layer_path(root, "hostile-ok", "/all/inner/sneaky")) == "../inner/../../outside.txt"


# -- symlinks in the image -----------------------------------------------------------------


def test_image_symlinks_resolve_inside_the_image(clean, tmp_path):
    root = clean
    marker = f"ufbuild-{uuid.uuid4().hex[:12]}"
    ctx = write(tmp_path / "ctx", {
        f"{marker}.txt": "into the image's etc\n",
        "Dockerfile": f"""FROM busybox
RUN ln -s /etc /app && ln -s ../../../../../../etc /rel && ln -s /nonexistent-{marker}/d /dangling \\
 && ln -s /etc/{marker}-file /filelink
COPY {marker}.txt /app/
COPY {marker}.txt /app/sub/deeper/
COPY {marker}.txt /rel/via-rel
COPY {marker}.txt /dangling/
COPY {marker}.txt /filelink
WORKDIR /app/wd-{marker}
ADD t.tar /app/
""",
    })
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo(f"from-tar-{marker}")
        data = b"tar\n"
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    (ctx / "t.tar").write_bytes(buf.getvalue())
    ok(build(root, ctx, "-t", "symimg"))
    assert read(root, "symimg", f"/etc/{marker}.txt") == "into the image's etc\n"
    assert read(root, "symimg", f"/etc/sub/deeper/{marker}.txt") == "into the image's etc\n"
    assert read(root, "symimg", "/etc/via-rel") == "into the image's etc\n"
    assert read(root, "symimg", f"/nonexistent-{marker}/d/{marker}.txt") == "into the image's etc\n"
    assert read(root, "symimg", f"/etc/{marker}-file") == "into the image's etc\n"
    assert os.path.isdir(layer_path(root, "symimg", f"/etc/wd-{marker}"))
    assert read(root, "symimg", f"/etc/from-tar-{marker}") == "tar\n"
    # the host was never touched
    for p in (f"/etc/{marker}.txt", "/etc/sub", "/etc/via-rel", f"/nonexistent-{marker}", f"/etc/{marker}-file",
              f"/etc/wd-{marker}", f"/etc/from-tar-{marker}"):
        assert not os.path.lexists(p), p


def test_run_sees_only_the_image(clean, tmp_path):
    root = clean
    host_only = tmp_path / f"host-only-{uuid.uuid4().hex[:8]}"
    host_only.write_text("x")
    ctx = write(tmp_path / "ctx", {"Dockerfile": f"FROM busybox\nRUN test ! -e {host_only} && test ! -e /work "
                                                  "&& test ! -e /root/.pyenv && echo isolated > /iso\n"})
    ok(build(root, ctx, "-t", "iso"))
    assert read(root, "iso", "/iso") == "isolated\n"


# -- archives ------------------------------------------------------------------------------


def _tar(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for kind, name, arg in entries:
            ti = tarfile.TarInfo(name)
            if kind == "file":
                ti.size = len(arg)
                tf.addfile(ti, io.BytesIO(arg))
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, arg
                tf.addfile(ti)
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, arg
                tf.addfile(ti)
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
    return buf.getvalue()


def test_hostile_add_archives(clean, tmp_path):
    root = clean
    m = uuid.uuid4().hex[:12]
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    cases = {
        "dotdot.tar": ([("file", "ok.txt", b"ok"), ("file", f"../../../../../../../../tmp/evil-{m}", b"x")],
                       "leaves the destination"),
        "dotdot-mid.tar": ([("file", f"a/../../evil-{m}", b"x")], "leaves the destination"),
        "through-link.tar": ([("sym", "l", str(host_dir)), ("file", f"l/evil-{m}", b"x")], "not a directory"),
        "through-rel-link.tar": ([("sym", "up", "../../../../../../.."), ("file", f"up/tmp/evil-{m}", b"x")],
                                 "not a directory"),
        "hard-out.tar": ([("hard", "h", "../../../../etc/passwd")], "leaves the destination"),
        "hard-abs.tar": ([("hard", "h", "/etc/passwd")], "not in the archive"),
    }
    files = {name: _tar(entries) for name, (entries, _) in cases.items()}
    for i, (name, (_, msg)) in enumerate(cases.items()):
        files["Dockerfile"] = f"FROM busybox\nADD {name} /dest/\n"
        ctx = write(tmp_path / f"c{i}", files)
        fails(build(root, ctx, "-t", f"evil{i}"), 2, msg)
        assert not has_ref(root, f"evil{i}")
    assert not os.path.lexists(f"/tmp/evil-{m}") and os.listdir(host_dir) == []
    assert not os.path.lexists(f"/evil-{m}")
    # absolute names and links pointing out are kept inside the destination, as tar does
    files = {"abs.tar": _tar([("file", f"/tmp/abs-{m}", b"abs\n"), ("sym", "lnk", "/etc/passwd"),
                              ("file", "real", b"r\n"), ("hard", "hl", "real")]),
             "Dockerfile": "FROM busybox\nADD abs.tar /dest/\n"}
    ok(build(root, write(tmp_path / "abs", files), "-t", "absok"))
    assert read(root, "absok", f"/dest/tmp/abs-{m}") == "abs\n"
    assert not os.path.lexists(f"/tmp/abs-{m}")
    p = layer_path(root, "absok", "/dest/lnk")
    assert os.path.islink(p) and os.readlink(p) == "/etc/passwd"
    assert read(root, "absok", "/dest/hl") == "r\n"
