"""`unionfuse build`: instructions, flags, cache, multi-stage, errors, output.  Real builds
on the busybox base in temp stores (see test_build_helpers.py)."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import stat
import tarfile
import threading
from http.server import HTTPServer, SimpleHTTPRequestHandler
from pathlib import Path

import pytest

from test_build_helpers import (REPO, assert_clean, build, busybox_tar, clean, fresh_store, has_ref, image,
                                layer_path, ok, read, store, uf, write)

__all__ = ["busybox_tar", "store", "fresh_store", "clean"]


def hist(img):
    return list(img.config["history"])


# -- config instructions, ENV/ARG substitution ---------------------------------------------


def test_config_instructions(clean, tmp_path):
    root = clean
    ctx = write(tmp_path / "ctx", {"Dockerfile": r"""
# syntax=docker/dockerfile:1
ARG BASE=busybox
FROM ${BASE} AS final
MAINTAINER someone <a@example.org>
ARG VER=1.0
ENV APP=demo \
    HOME_DIR=/home/${APP:-none}
ENV LEGACY value with spaces
ENV Q="quoted value" E=\$NOTEXPANDED D=${VER:+set} U=${UNSET:-dflt} V=${UNSET:+no}
LABEL version=$VER "multi word"="a b" app=${APP}
USER 1000:100
EXPOSE 80 443/udp 7000-7001
VOLUME ["/data", "/logs"]
VOLUME /cache
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=2s --retries=3 CMD wget -q -O- http://localhost/ || exit 1
ONBUILD RUN echo triggered
SHELL ["/bin/sh", "-ec"]
CMD echo $APP
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["echo hi"]
"""})
    r = ok(build(root, ctx, "-t", "cfg:1"))
    assert "Step 1/" in r.stdout and "Successfully tagged cfg:1" in r.stdout
    img = image(root, "cfg:1")
    c = img.run_config
    env = dict(e.split("=", 1) for e in c["Env"])
    assert env["APP"] == "demo"
    assert env["HOME_DIR"] == "/home/none"      # same-instruction ENV sees the old value
    assert env["LEGACY"] == "value with spaces"
    assert env["Q"] == "quoted value" and env["E"] == "$NOTEXPANDED"
    assert env["D"] == "set" and env["U"] == "dflt" and env["V"] == ""
    assert "VER" not in env and "BASE" not in env   # ARGs never reach the image config
    assert c["Labels"] == {"version": "1.0", "multi word": "a b", "app": "demo"}
    assert c["User"] == "1000:100"
    assert set(c["ExposedPorts"]) == {"80/tcp", "443/udp", "7000/tcp", "7001/tcp"}
    assert set(c["Volumes"]) == {"/data", "/logs", "/cache"}
    assert c["StopSignal"] == "SIGTERM"
    hc = c["Healthcheck"]
    assert hc["Test"][0] == "CMD-SHELL" and "wget" in hc["Test"][1]
    assert hc["Interval"] == 5 * 10**9 and hc["Timeout"] == 2 * 10**9 and hc["Retries"] == 3
    assert c["OnBuild"] == ["RUN echo triggered"]
    assert c["Shell"] == ["/bin/sh", "-ec"]
    assert c["Entrypoint"] == ["/bin/sh", "-c"] and c["Cmd"] == ["echo hi"]
    assert img.config["author"] == "someone <a@example.org>"
    h = hist(img)
    assert all(x.get("empty_layer") for x in h[1:])
    assert len(img.diff_ids) == len(image(root, "busybox").diff_ids)
    by = [x["created_by"] for x in h[1:]]
    assert by[0] == "/bin/sh -c #(nop) MAINTAINER someone <a@example.org>"
    assert '/bin/sh -c #(nop) CMD ["/bin/sh", "-ec", "echo $APP"]' in by  # shell form uses SHELL
    assert by[-1] == '/bin/sh -c #(nop) CMD ["echo hi"]'


def test_entrypoint_resets_inherited_cmd_and_run_of_result(clean, tmp_path):
    root = clean
    ok(build(root, write(tmp_path / "a", {"Dockerfile": 'FROM busybox\nCMD ["echo", "base-cmd"]\n'}), "-t", "ep-base"))
    ok(build(root, write(tmp_path / "b", {"Dockerfile": 'FROM ep-base\nENTRYPOINT ["echo", "ep"]\n'}), "-t", "ep-child"))
    c = image(root, "ep-child").run_config
    assert c["Entrypoint"] == ["echo", "ep"] and not c.get("Cmd")
    # CMD set in the same stage before ENTRYPOINT is kept
    ok(build(root, write(tmp_path / "c", {"Dockerfile": 'FROM busybox\nCMD ["x"]\nENTRYPOINT echo ep2\n'}), "-t", "ep-2"))
    c = image(root, "ep-2").run_config
    assert c["Cmd"] == ["x"] and c["Entrypoint"] == ["/bin/sh", "-c", "echo ep2"]
    r = uf(root, "run", "--rm", "ep-child", "arg1")
    assert r.returncode == 0 and r.stdout.strip() == "ep arg1"


# -- RUN -------------------------------------------------------------------------------------


RUN_DOCKERFILE = """FROM busybox
ARG GREETING=hello
ARG FROMCLI
ENV IMG=image-env
WORKDIR /work/sub
RUN echo "$GREETING $FROMCLI $IMG $(pwd)" > out.txt
RUN ["/bin/sh", "-c", "echo exec-form > /work/exec.txt"]
USER user
RUN id -u > /tmp/uid.txt && echo "$HOME" > /tmp/home.txt
USER root
SHELL ["/bin/sh", "-xc"]
RUN echo shell-changed > /shell.txt
RUN <<DOC
echo from-heredoc > /heredoc.txt
echo line2 >> /heredoc.txt
DOC
RUN cat <<EOT > /heredoc2.txt
via stdin
EOT
RUN touch /a && rm /a; echo done
"""


def test_run_forms_env_user_workdir_shell(clean, tmp_path):
    root = clean
    ctx = write(tmp_path / "ctx", {"Dockerfile": RUN_DOCKERFILE})
    r = ok(build(root, ctx, "-t", "runs", "--build-arg", "FROMCLI=cli", "--build-arg", "NOTUSED=1"))
    assert "Running in" in r.stdout and "Removing intermediate container" in r.stdout
    assert "NOTUSED" in r.stderr and "not consumed" in r.stderr
    assert read(root, "runs", "/work/sub/out.txt") == "hello cli image-env /work/sub\n"
    assert read(root, "runs", "/work/exec.txt") == "exec-form\n"
    assert read(root, "runs", "/tmp/uid.txt") == "1000\n"
    assert read(root, "runs", "/tmp/home.txt") == "/home/user\n"
    assert read(root, "runs", "/shell.txt") == "shell-changed\n"
    assert "+ echo shell-changed" in r.stdout + r.stderr   # sh -x traces to the build output
    assert read(root, "runs", "/heredoc.txt") == "from-heredoc\nline2\n"
    assert read(root, "runs", "/heredoc2.txt") == "via stdin\n"
    img = image(root, "runs")
    env = dict(e.split("=", 1) for e in img.run_config["Env"])
    assert "GREETING" not in env and "FROMCLI" not in env
    runs = [h for h in hist(img) if not h.get("empty_layer")][1:]
    assert runs[1]["created_by"].startswith("|2 FROMCLI=cli GREETING=hello /bin/sh -c echo")
    assert len(img.diff_ids) == len(image(root, "busybox").diff_ids) + 8  # WORKDIR + 7 RUN


def test_run_failure_names_step_and_exit_code(clean, tmp_path):
    root = clean
    ctx = write(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nRUN echo before\n\nRUN echo out; exit 3\nRUN echo never\n"})
    r = build(root, ctx, "-t", "willfail")
    assert r.returncode == 3
    assert r.stderr.strip().splitlines()[-1] == "unionfuse: Dockerfile:4: RUN returned exit code 3"
    assert "out" in r.stdout and "never" not in r.stdout
    assert not has_ref(root, "willfail")


def test_run_network_none_by_default_host_on_request(clean, tmp_path):
    root = clean
    df = "FROM busybox\nRUN ls /sys/class/net > /net.txt\nRUN --network=host ls /sys/class/net > /net2.txt\n"
    ctx = write(tmp_path / "ctx", {"Dockerfile": df})
    # the Dockerfile alone can't take the host's network ...
    r = build(root, ctx, "-t", "net")
    assert r.returncode != 0 and "Dockerfile:3: RUN --network=host needs" in r.stderr
    assert not has_ref(root, "net")
    # ... the person running the build can give it
    ok(build(root, ctx, "--network", "host", "-t", "net"))
    host = sorted(os.listdir("/sys/class/net"))
    assert read(root, "net", "/net2.txt").split() == host
    ok(build(root, write(tmp_path / "c1", {"Dockerfile": "FROM busybox\nRUN --network=none ls /sys/class/net > /n\n"}),
             "--network", "host", "-t", "net-none"))
    assert read(root, "net-none", "/n").split() == ["lo"]
    ok(build(root, write(tmp_path / "c2", {"Dockerfile": "FROM busybox\nRUN ls /sys/class/net > /net.txt\n"}),
             "--network", "host", "--no-cache", "-t", "net-host"))
    assert read(root, "net-host", "/net.txt").split() == host


def test_arg_scoping(clean, tmp_path):
    root = clean
    df = """ARG G1=global1
ARG G2=global2
FROM busybox
ARG G1
ARG LOCAL=${G1}-local
RUN echo "G1=$G1 G2=$G2 LOCAL=$LOCAL FROMENV=$FROMENV" > /args.txt
ARG FROMENV
RUN echo "FROMENV=$FROMENV" > /args2.txt
ENV G1=env-wins
ARG G1=ignored-default
RUN echo "G1=$G1" > /args3.txt
"""
    ctx = write(tmp_path / "ctx", {"Dockerfile": df})
    ok(build(root, ctx, "-t", "args", "--build-arg", "FROMENV", env={"FROMENV": "from-environment"}))
    assert read(root, "args", "/args.txt") == "G1=global1 G2= LOCAL=global1-local FROMENV=\n"
    assert read(root, "args", "/args2.txt") == "FROMENV=from-environment\n"
    assert read(root, "args", "/args3.txt") == "G1=env-wins\n"


# -- COPY ------------------------------------------------------------------------------------


COPY_DOCKERFILE = """FROM busybox
WORKDIR /w
COPY f1.txt .
COPY f1.txt renamed.txt
COPY f1.txt /newdir/
COPY dir /dircontents
COPY dir/ /dircontents2/
COPY *.md /docs/
COPY dir/*/n?.txt /glob/
COPY f1.txt f2.txt /multi/
COPY --chown=user:users f1.txt /owned-names
COPY --chown=1234 f1.txt /owned-num
COPY --chown=user dir /owned-dir
COPY --chmod=0640 f2.txt /mode640
COPY exe.sh /exe.sh
COPY <<DOC /here.txt
heredoc content
DOC
COPY f2.txt /etc
"""


def test_copy_semantics(clean, tmp_path):
    root = clean
    ctx = write(tmp_path / "ctx", {
        "Dockerfile": COPY_DOCKERFILE,
        "f1.txt": "one\n", "f2.txt": "two\n", "a.md": "A\n", "b.md": "B\n", "exe.sh": "#!/bin/sh\n",
        "dir/top.txt": "top\n", "dir/sub/n1.txt": "n1\n", "dir/sub/other.txt": "o\n",
    })
    os.chmod(ctx / "exe.sh", 0o751)
    os.chown(ctx / "f1.txt", 4321, 4321)
    ok(build(root, ctx, "-t", "copies"))

    def R(p):
        return read(root, "copies", p)

    def L(p):
        return os.lstat(layer_path(root, "copies", p))

    assert R("/w/f1.txt") == "one\n" and R("/w/renamed.txt") == "one\n" and R("/newdir/f1.txt") == "one\n"
    assert R("/dircontents/top.txt") == "top\n" and R("/dircontents/sub/n1.txt") == "n1\n"
    assert layer_path(root, "copies", "/dircontents/dir") is None      # contents, not the dir
    assert R("/dircontents2/sub/other.txt") == "o\n"
    assert R("/docs/a.md") == "A\n" and R("/docs/b.md") == "B\n"
    assert R("/glob/n1.txt") == "n1\n" and layer_path(root, "copies", "/glob/other.txt") is None
    assert R("/multi/f1.txt") == "one\n" and R("/multi/f2.txt") == "two\n"
    st = L("/w/f1.txt")
    assert (st.st_uid, st.st_gid) == (0, 0)                            # default owner 0:0
    st = L("/owned-names")
    assert (st.st_uid, st.st_gid) == (1000, 100)
    st = L("/owned-num")
    assert (st.st_uid, st.st_gid) == (1234, 1234)
    st = L("/owned-dir/sub/n1.txt")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert stat.S_IMODE(L("/mode640").st_mode) == 0o640
    assert stat.S_IMODE(L("/exe.sh").st_mode) == 0o751
    assert R("/here.txt") == "heredoc content\n"
    assert R("/etc/f2.txt") == "two\n"                              # existing dir, no slash
    by = [h["created_by"] for h in hist(image(root, "copies"))]
    assert any(re.fullmatch(r"/bin/sh -c #\(nop\) COPY file:[0-9a-f]{64} in /w/\. ", b) for b in by)
    assert any(re.fullmatch(r"/bin/sh -c #\(nop\) COPY dir:[0-9a-f]{64} in /dircontents ", b) for b in by)
    assert any(b.startswith("/bin/sh -c #(nop) COPY multi:") for b in by)


def test_copy_errors(clean, tmp_path):
    root = clean
    cases = [
        ("COPY f1.txt f2.txt /notadir", "must be a directory and end with a /"),
        ("COPY missing.txt /x", "file not found in build context"),
        ("COPY *.nomatch /x/", "no source files were specified"),
        ("COPY --chown=nosuchuser f1.txt /x", "unable to find user nosuchuser"),
        ("COPY --chmod=abc f1.txt /x", "invalid mode"),
        ("COPY --from=nostage /x /y", "no such build stage or image"),
    ]
    for i, (line, msg) in enumerate(cases):
        ctx = write(tmp_path / f"c{i}", {"Dockerfile": f"FROM busybox\n\n{line}\n", "f1.txt": "1", "f2.txt": "2"})
        r = build(root, ctx, "-t", f"copyerr{i}")
        assert r.returncode != 0, line
        last = r.stderr.strip().splitlines()
        assert len(last) == 1 and last[0].startswith("unionfuse: Dockerfile:3: "), (line, r.stderr)
        assert msg in last[0], (line, r.stderr)
        assert not has_ref(root, f"copyerr{i}")


def test_dockerignore(clean, tmp_path):
    root = clean
    ctx = write(tmp_path / "ctx", {
        "Dockerfile": "FROM busybox\nCOPY . /ctx/\n",
        ".dockerignore": "# comment\n*.log\n!keep.log\nsecret/\n**/*.tmp\nbuild\n!build/keep.txt\n/abs.txt\n",
        "a.txt": "a", "x.log": "x", "keep.log": "k", "secret/key": "s", "deep/er/f.tmp": "t",
        "deep/er/g.txt": "g", "build/out.o": "o", "build/keep.txt": "kept", "abs.txt": "abs",
    })
    ok(build(root, ctx, "-t", "ignored"))

    def P(p):
        return layer_path(root, "ignored", p)

    assert P("/ctx/a.txt") and P("/ctx/keep.log") and P("/ctx/deep/er/g.txt") and P("/ctx/build/keep.txt")
    assert P("/ctx/Dockerfile") and P("/ctx/.dockerignore")
    for gone in ("/ctx/x.log", "/ctx/secret", "/ctx/deep/er/f.tmp", "/ctx/build/out.o", "/ctx/abs.txt"):
        assert P(gone) is None, gone
    write(ctx, {"Dockerfile": "FROM busybox\nCOPY secret/key /k\n"})
    r = build(root, ctx, "-t", "ignored2")
    assert r.returncode != 0 and "Dockerfile:2: " in r.stderr and "excluded by .dockerignore" in r.stderr


# -- ADD -------------------------------------------------------------------------------------


def _tar_bytes(members: dict, mode="w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o644
            ti.uid = ti.gid = 42
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


def serve_dir(path: Path):
    httpd = HTTPServer(("127.0.0.1", 0), lambda *a, **k: _Quiet(*a, directory=str(path), **k))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    return httpd


def test_add_archives_and_url(clean, tmp_path):
    root = clean
    plain = _tar_bytes({"p/one.txt": b"plain\n"})
    files = {
        "plain.tar": plain,
        "g.tar.gz": gzip.compress(_tar_bytes({"g.txt": b"gzip\n"})),
        "b.tbz": bz2.compress(_tar_bytes({"b.txt": b"bzip2\n"})),
        "x.tar.xz": lzma.compress(_tar_bytes({"x.txt": b"xz\n"})),
        "notatar.gz": gzip.compress(b"just gzip, not a tar"),
        "plain.txt": "not an archive\n",
    }
    srv_dir = write(tmp_path / "srv", {"dl.txt": "downloaded\n", "remote.tar": plain})
    httpd = serve_dir(srv_dir)
    try:
        port = httpd.server_address[1]
        files["Dockerfile"] = f"""FROM busybox
ADD plain.tar /unpacked/
ADD g.tar.gz b.tbz x.tar.xz /unpacked/
ADD notatar.gz plain.txt /asis/
ADD http://127.0.0.1:{port}/dl.txt /web/
ADD http://127.0.0.1:{port}/remote.tar /web/named.tar
ADD --chown=user:users plain.tar /owned/
"""
        ctx = write(tmp_path / "ctx", files)
        ok(build(root, ctx, "-t", "adds"))
        files["Dockerfile"] = f"FROM busybox\n\nADD http://127.0.0.1:{port}/missing.txt /web/\n"
        r = build(root, write(tmp_path / "ctx2", files), "-t", "adds-bad")
        assert r.returncode != 0 and r.stderr.startswith("unionfuse: Dockerfile:3: ADD http://")
    finally:
        httpd.shutdown()
        httpd.server_close()

    def R(p):
        return read(root, "adds", p)

    assert R("/unpacked/p/one.txt") == "plain\n"
    st = os.lstat(layer_path(root, "adds", "/unpacked/p/one.txt"))
    assert (st.st_uid, st.st_gid) == (42, 42)               # archive owners kept
    assert R("/unpacked/g.txt") == "gzip\n" and R("/unpacked/b.txt") == "bzip2\n" and R("/unpacked/x.txt") == "xz\n"
    assert gzip.decompress(Path(layer_path(root, "adds", "/asis/notatar.gz")).read_bytes()) == b"just gzip, not a tar"
    assert R("/asis/plain.txt") == "not an archive\n"
    assert R("/web/dl.txt") == "downloaded\n"
    assert stat.S_IMODE(os.lstat(layer_path(root, "adds", "/web/dl.txt")).st_mode) == 0o600
    assert Path(layer_path(root, "adds", "/web/named.tar")).read_bytes() == plain   # URLs aren't unpacked
    st = os.lstat(layer_path(root, "adds", "/owned/p/one.txt"))
    assert (st.st_uid, st.st_gid) == (1000, 100)
    assert not has_ref(root, "adds-bad")


# -- cache -----------------------------------------------------------------------------------


def test_cache_hits_and_misses(fresh_store, tmp_path):
    root = fresh_store
    ctx = write(tmp_path / "ctx", {
        "Dockerfile": "FROM busybox\nENV A=1\nRUN echo step3 > /s3\nCOPY src.txt /src.txt\nRUN cat /src.txt > /copy\nCMD [\"sh\"]\n",
        "src.txt": "v1\n", "unrelated.txt": "u1\n",
    })
    r1 = ok(build(root, ctx, "-t", "c:1"))
    assert r1.stdout.count("Using cache") == 0
    id1 = image(root, "c:1").id

    r2 = ok(build(root, ctx, "-t", "c:2"))
    assert r2.stdout.count("Using cache") == 5 and "Running in" not in r2.stdout
    assert r2.stdout.count("CACHED") == 5
    assert image(root, "c:2").id == id1

    (ctx / "unrelated.txt").write_text("u2\n")
    os.utime(ctx / "src.txt", (1, 1))                         # mtime alone: still cached
    r3 = ok(build(root, ctx, "-t", "c:3"))
    assert r3.stdout.count("Using cache") == 5 and image(root, "c:3").id == id1

    (ctx / "src.txt").write_text("v2\n")
    r4 = ok(build(root, ctx, "-t", "c:4"))
    steps = r4.stdout.split("Step ")[1:]
    assert ["Using cache" in s for s in steps] == [False, True, True, False, False, False]
    assert read(root, "c:4", "/copy") == "v2\n"

    os.chmod(ctx / "src.txt", 0o600)                         # mode is part of the key
    r5 = ok(build(root, ctx, "-t", "c:5"))
    assert r5.stdout.count("Using cache") == 2

    r6 = ok(build(root, ctx, "-t", "c:6", "--no-cache"))
    assert "Using cache" not in r6.stdout and r6.stdout.count("Running in") == 2

    r7 = ok(build(root, ctx, "--build-arg", "X=1", "-t", "c:7"))   # unused arg: cache unaffected
    assert r7.stdout.count("Using cache") == 5
    assert_clean(root)


# -- multi-stage -----------------------------------------------------------------------------


MULTI = """ARG MSG=multi
FROM busybox AS builder
ARG MSG
RUN mkdir -p /out/d && echo "built $MSG" > /out/artifact && echo x > /out/d/x

FROM busybox AS unused
RUN exit 9

FROM builder AS second
RUN echo second > /out/second

FROM scratch
COPY --from=builder /out/artifact /artifact
COPY --from=0 /out/d /d
COPY --from=second /out/second /
COPY --from=busybox /bin/busybox /bin/busybox
COPY --from=builder /out/* /all/
"""


def test_multistage_target_copy_from(clean, tmp_path):
    root = clean
    ctx = write(tmp_path / "ctx", {"Dockerfile": MULTI})
    r = ok(build(root, ctx, "-t", "ms"))
    assert "exit 9" not in r.stdout                        # stages nobody needs are skipped
    assert read(root, "ms", "/artifact") == "built multi\n"
    assert read(root, "ms", "/d/x") == "x\n" and read(root, "ms", "/second") == "second\n"
    assert read(root, "ms", "/all/artifact") == "built multi\n"
    img = image(root, "ms")
    assert len(img.diff_ids) == 5 and layer_path(root, "ms", "/etc/passwd") is None
    r = uf(root, "run", "--rm", "--entrypoint", "/bin/busybox", "ms", "cat", "/artifact")
    assert r.returncode == 0 and r.stdout == "built multi\n"

    ok(build(root, ctx, "--target", "second", "-t", "ms-second", "--build-arg", "MSG=changed"))
    assert read(root, "ms-second", "/out/second") == "second\n"
    assert read(root, "ms-second", "/out/artifact") == "built changed\n"
    r = build(root, ctx, "--target", "nosuch", "-t", "ms-bad")
    assert r.returncode != 0 and "target stage 'nosuch' could not be found" in r.stderr
    assert not has_ref(root, "ms-bad")


def test_scratch_and_workdir_layers(clean, tmp_path):
    root = clean
    ctx = write(tmp_path / "ctx", {"Dockerfile": "FROM scratch\nWORKDIR /app\nWORKDIR sub\nCOPY f /f\nWORKDIR /app\n", "f": "F"})
    ok(build(root, ctx, "-t", "scr"))
    img = image(root, "scr")
    assert img.run_config["WorkingDir"] == "/app"
    assert [bool(x.get("empty_layer")) for x in hist(img)] == [False, False, False, True]  # last: dir exists
    assert os.path.isdir(layer_path(root, "scr", "/app/sub"))
    ctx2 = write(tmp_path / "ctx2", {"Dockerfile": "FROM scratch\nCOPY f /f\nRUN true\n", "f": "F"})
    r = build(root, ctx2, "-t", "scr-run")
    assert r.returncode != 0 and "Dockerfile:3: RUN" in r.stderr.strip().splitlines()[-1]
    assert not has_ref(root, "scr-run")


def test_onbuild_triggers_run_in_child(clean, tmp_path):
    root = clean
    parent = "FROM busybox\nONBUILD COPY trig.txt /trig.txt\nONBUILD RUN echo ran > /ran\n"
    ok(build(root, write(tmp_path / "p", {"Dockerfile": parent}), "-t", "onb"))
    child = {"Dockerfile": "FROM onb\nRUN cat /trig.txt\n", "trig.txt": "T\n"}
    r = ok(build(root, write(tmp_path / "c", child), "-t", "onb-child"))
    assert "Executing 2 build triggers" in r.stdout
    assert read(root, "onb-child", "/trig.txt") == "T\n" and read(root, "onb-child", "/ran") == "ran\n"
    assert not image(root, "onb-child").run_config.get("OnBuild")


# -- bad Dockerfiles -------------------------------------------------------------------------


BAD = [
    ("FROM busybox\nFROBNICATE x\n", 2, "unknown instruction: FROBNICATE"),
    ("FROM busybox\nRUN echo ok\nCMD [\"sh\", bad]\n", 3, "invalid JSON"),
    ("FROM busybox\nSHELL /bin/bash -c\n", 2, "SHELL requires the arguments to be in JSON form"),
    ("# comment\nRUN echo hi\nFROM busybox\n", 2, "no FROM instruction before RUN"),
    ("ARG X=1\n", 1, "no FROM instruction"),
    ("FROM nosuchimage:1.0\n", 1, "no such image or build stage"),
    ("FROM busybox\n\nCOPY nope.txt /\n", 3, "file not found in build context"),
    ("FROM busybox\nCOPY --from=later /x /y\nFROM busybox AS later\n", 2, "stage 'later' is defined after this one"),
    ("FROM later\nFROM busybox AS later\n", 1, "stage 'later' is defined after this one"),
    ("", 1, "no instructions"),
    ("FROM busybox\nRUN <<DOC\necho never closed\n", 2, "unterminated heredoc"),
    ("FROM busybox\nCOPY --bogus=1 a b\n", 2, "unknown flag --bogus"),
    ("FROM busybox\nENV\n", 2, "ENV"),
    ("FROM busybox AS a\nFROM busybox AS a\n", 2, "duplicate name"),
    ("FROM busybox\nEXPOSE notaport\n", 2, "invalid port"),
    ("FROM busybox\nWORKDIR ${X:?must be set}\n", 2, "X: must be set"),
    ("FROM busybox\nSTOPSIGNAL SIGNOPE\n", 2, "invalid signal"),
]


@pytest.mark.parametrize("n,text,line,msg", [(i, *b) for i, b in enumerate(BAD)], ids=[b[2][:30] for b in BAD])
def test_bad_dockerfiles(clean, tmp_path, n, text, line, msg):
    root = clean
    ctx = write(tmp_path / "ctx", {"Dockerfile": text})
    r = build(root, ctx, "-t", f"bad:{n}")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"unionfuse: Dockerfile:{line}: "), r.stderr
    assert msg in lines[0], r.stderr
    assert not has_ref(root, f"bad:{n}")


def test_dockerfile_flag_and_name_in_errors(clean, tmp_path):
    root = clean
    ctx = write(tmp_path / "ctx", {"other.Dockerfile": "FROM busybox\nBOGUS\n", "good.df": "FROM busybox\nLABEL f=1\n"})
    r = build(root, ctx, "-f", str(ctx / "other.Dockerfile"), "-t", "ff")
    assert r.returncode != 0 and r.stderr.startswith("unionfuse: other.Dockerfile:2: unknown instruction")
    ok(build(root, ctx, "-f", str(ctx / "good.df"), "-t", "ff2", "-t", "ff3:v1"))
    assert image(root, "ff2").id == image(root, "ff3:v1").id
    assert image(root, "ff2").run_config["Labels"] == {"f": "1"}
    r = build(root, ctx, "-t", "Bad Tag")
    assert r.returncode != 0 and "invalid tag" in r.stderr


# -- output ----------------------------------------------------------------------------------


def test_quiet_and_progress_modes(clean, tmp_path):
    root = clean
    ctx = write(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nRUN echo progress-out\nLABEL q=1\n"})
    r = ok(build(root, ctx, "-q", "-t", "quiet"))
    assert re.fullmatch(r"sha256:[0-9a-f]{64}\n", r.stdout) and "progress-out" not in r.stdout
    assert r.stdout.strip() == image(root, "quiet").id
    r = ok(build(root, ctx, "--progress", "tty", "--no-cache"))
    assert "\x1b[" in r.stdout and "[+] Building" in r.stdout and "Successfully built" in r.stdout
    r = ok(build(root, ctx, "--progress", "plain"))
    assert re.search(r"^Step 2/3 : RUN echo progress-out$", r.stdout, re.M)
    assert re.search(r"^ ---> [0-9a-f]{12}  \[CACHED\]$", r.stdout, re.M)
    assert re.search(r"^Successfully built [0-9a-f]{12}$", r.stdout, re.M)
    r = build(root, write(tmp_path / "f", {"Dockerfile": "FROM busybox\nRUN echo failing-out; exit 4\n"}), "-q")
    assert r.returncode == 4 and r.stdout == "" and "failing-out" in r.stderr


# -- examples --------------------------------------------------------------------------------


def test_busybox_example(clean):
    root = clean
    ok(build(root, REPO / "examples" / "busybox", "-t", "hello"))
    r = uf(root, "run", "--rm", "hello")
    assert r.returncode == 0, r.stderr
    assert "Welcome to a unionfuse-built image." in r.stdout and "Hello from user in /app" in r.stdout


@pytest.mark.slow
def test_debian_nginx_example(tmp_path, debian_tar):
    tar = str(debian_tar)
    root = tmp_path / "store"
    assert uf(root, "import", tar, "debian:bookworm").returncode == 0
    ok(build(root, REPO / "examples" / "nginx", "--network", "host", "-t", "web", timeout=900))
    img = image(root, "web")
    assert img.run_config["Cmd"] == ["nginx", "-g", "daemon off;"]
    assert len(img.diff_ids) == 3
    assert "unionfuse-built image" in read(root, "web", "/var/www/html/index.html")
    r = uf(root, "run", "--rm", "web", "nginx", "-t")
    assert r.returncode == 0, r.stderr
    assert_clean(root)


def test_images_hide_intermediates_and_prune_keeps_live_cache(fresh_store, tmp_path):
    root = fresh_store
    ctx = write(tmp_path / "ctx", {"Dockerfile": "FROM busybox\nRUN echo one > /one\nRUN echo two > /two\n"})
    ok(build(root, ctx, "-t", "two"))
    shown = ok(uf(root, "images")).stdout
    assert "<none>" not in shown and "two" in shown
    assert "<none>" in ok(uf(root, "images", "-a")).stdout  # the RUN steps' images
    ok(uf(root, "prune"))
    again = ok(build(root, ctx, "-t", "two"))
    assert "Running in" not in again.stdout  # the cache of a live image survives prune
    ok(uf(root, "rmi", "two"))
    ok(uf(root, "prune"))
    assert "<none>" not in ok(uf(root, "images", "-a")).stdout
    rebuilt = ok(build(root, ctx, "-t", "two"))
    assert rebuilt.stdout.count("Running in") == 2  # its stale cache entries went too
