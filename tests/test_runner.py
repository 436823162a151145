"""The image store and container runner through the real CLI (issue 3's Tests list):
the seed's interactive flow on a scripted terminal, diff/commit/history, two containers,
-v, non-root USER, exit codes, whiteouts and opaque dirs, rm/rmi refusals, -d/logs/exec/
stop/start/kill/ps, run options, both storage drivers, both OCI runtimes, and killed
daemons/shims.  Every test leaves no mount, daemon or runtime container behind (checked
for exited containers, and cleaned up by PID / lazy unmount in teardown regardless)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from runner_util import UF, Pty, alive, busybox_store, daemons_for, is_mounted, runtime_id, runtime_ids

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root")

DRIVERS = ["fuse", "overlay"]
ID64 = re.compile(r"^[0-9a-f]{64}$")


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uf(tmp_path_factory) -> UF:
    base = tmp_path_factory.mktemp("runner")
    u = busybox_store(base)
    # an image with a second layer of known files for the diff cases
    u.ok("run", "--name", "mkbase", "busybox", "sh", "-c",
         "mkdir -p /d /od /rn/sub && echo k > /d/keep && echo c > /d/change && echo x > /d/del"
         " && echo a > /od/a && echo b > /od/b && echo x > /rn/x && echo y > /rn/sub/y")
    u.ok("commit", "mkbase", "diffbase")
    u.ok("rm", "mkbase")
    yield u
    for cid in u.cids():
        u.cleanup(cid)


@pytest.fixture(autouse=True)
def clean(uf, request):
    """After each test: every exited container must have left nothing behind; then
    everything the test made (containers, terminals) is undone, even on failure."""
    ptys: list[Pty] = []
    request.node.ptys = ptys
    yield
    for p in ptys:
        p.close()
    problems = []
    for cid in uf.cids():
        try:
            state = uf.rec(cid)["state"]
        except (OSError, ValueError):
            state = "?"
        if state == "exited":
            problems += uf.leftovers(cid)
    for cid in uf.cids():
        uf.cleanup(cid)
    if problems:
        pytest.fail("left behind after exit: " + "; ".join(problems))


def start_pty(request, argv, rows=24, cols=80) -> Pty:
    p = Pty(argv, rows, cols)
    request.node.ptys.append(p)
    return p


def one_error_line(r) -> None:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode != 0, r
    assert len(lines) == 1 and lines[0].startswith("unionfuse: "), r.stderr


def assert_gone(uf: UF, cid: str) -> None:
    assert uf.leftovers(cid) == []


def assert_gone_soon(uf: UF, cid: str, timeout: float = 5) -> None:
    """A detached container's shim records the exit, then unmounts: allow it a moment."""
    end = time.monotonic() + timeout
    while uf.leftovers(cid) and time.monotonic() < end:
        time.sleep(0.05)
    assert uf.leftovers(cid) == []


def run_d(uf: UF, *args: str) -> str:
    """`run -d ...`, then wait until the OCI runtime really has the container (run -d
    may return a moment before that: see test_run_detached_returns_when_started)."""
    cid = uf.ok("run", "-d", *args).strip()
    assert ID64.match(cid), cid
    rt = uf.rec(cid)["options"]["runtime"]
    wait_for(lambda: runtime_id(cid) in runtime_ids(rt), what=f"{rt} container of {cid[:12]}")
    return cid


def wait_for(pred, timeout=15, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# -- the seed flow ---------------------------------------------------------------------------


def test_seed_flow_interactive_tty(uf, request):
    """run -it on a real terminal: typing, arithmetic, tty, window size (at start and on
    resize), job control, ^C, exit code; then diff, commit, history, run the new image."""
    t = start_pty(request, uf.argv("run", "-it", "--name", "example", "busybox", "/bin/sh"), rows=33, cols=111)
    assert "42" in t.cmd("echo $((6*7))").split("\n")
    assert re.search(r"^/dev/pts/\d+$", t.cmd("tty"), re.M), "tty is not a pts"
    assert re.search(r"^33 111$", t.cmd("stty size"), re.M)
    t.set_size(40, 120)  # SIGWINCH reaches the container's terminal
    time.sleep(0.3)
    assert re.search(r"^40 120$", t.cmd("stty size"), re.M), "window resize not propagated"
    t.cmd("sleep 100 &")
    out = t.cmd("jobs")
    assert re.search(r"\[1\]\+?\s+Running\s+sleep 100", out), out
    t.cmd("kill %1")
    out = t.cmd("jobs")
    assert "Running" not in out
    # ^C stops a foreground job (the terminal's foreground process group gets SIGINT)
    t.send("sleep 100\n")
    time.sleep(0.5)
    t.send(b"\x03")
    out = t.cmd("echo rc=$?", timeout=5)
    assert "rc=130" in out, out
    t.cmd("echo hello-seed > /etc/seed.txt")
    t.send("exit 3\n")
    assert t.wait() == 3
    cid = uf.cid("example")
    assert_gone(uf, cid)

    assert sorted(uf.diff("example")) == ["A /etc/seed.txt", "C /etc"]
    img = uf.ok("commit", "example", "my-busybox", "-m", "msg").strip()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", img)
    hist = uf.ok("history", "my-busybox").splitlines()
    assert re.split(r"\s{2,}", hist[0].strip()) == ["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"]
    rows = hist[1:]
    assert len(rows) == 2, hist
    assert rows[0].startswith(img[7:19]) and rows[0].rstrip().endswith("msg") and "/bin/sh" in rows[0]
    assert rows[1].startswith("<missing>") and "Imported from" in rows[1]
    n = len(uf.cids())
    assert uf.ok("run", "--rm", "my-busybox", "cat", "/etc/seed.txt") == "hello-seed\n"
    assert len(uf.cids()) == n, "--rm left the container"
    assert uf.diff("example") != []  # the container is still there after commit
    uf.ok("rmi", "-f", "my-busybox")


@pytest.mark.parametrize("driver", DRIVERS)
def test_seed_flow_both_drivers(uf, driver):
    name, image = f"seed-{driver}", f"seed-img-{driver}"
    r = uf("run", "-i", "--storage-driver", driver, "--name", name, "busybox", "/bin/sh",
           input="echo hello > /etc/seed.txt\nmkdir -p /root/dir\necho $((6*7))\nexit 3\n")
    assert r.returncode == 3, r
    assert r.stdout == "42\n"
    cid = uf.cid(name)
    assert uf.rec(cid)["options"]["driver"] == driver
    assert_gone(uf, cid)
    assert sorted(uf.diff(name)) == ["A /etc/seed.txt", "A /root/dir", "C /etc", "C /root"]
    img = uf.ok("commit", name, image, "-m", "seeded").strip()
    rows = uf.ok("history", image).splitlines()[1:]
    assert len(rows) == 2 and rows[0].startswith(img[7:19]) and "seeded" in rows[0]
    out = uf.ok("run", "--rm", "--storage-driver", driver, image, "sh", "-c", "cat /etc/seed.txt; ls -d /root/dir")
    assert out == "hello\n/root/dir\n"
    uf.ok("rm", name)
    uf.ok("rmi", image)


@pytest.mark.parametrize("driver", DRIVERS)
def test_two_containers_are_isolated(uf, driver):
    a = run_d(uf, "--storage-driver", driver, "--name", f"iso-a-{driver}", "busybox", "sleep", "100").strip()
    b = run_d(uf, "--storage-driver", driver, "--name", f"iso-b-{driver}", "busybox", "sleep", "100").strip()
    assert ID64.match(a) and ID64.match(b) and a != b
    uf.ok("exec", f"iso-a-{driver}", "sh", "-c", "echo A > /shared; rm /etc/hostname")
    r = uf("exec", f"iso-b-{driver}", "sh", "-c", "cat /shared; cat /etc/hostname")
    assert "/shared" in r.stderr and r.stdout == "busybox\n", r
    uf.ok("exec", f"iso-b-{driver}", "sh", "-c", "echo B > /shared")
    assert uf.ok("exec", f"iso-a-{driver}", "cat", "/shared") == "A\n"
    assert sorted(uf.diff(f"iso-a-{driver}")) == ["A /shared", "C /etc", "D /etc/hostname"]
    assert sorted(uf.diff(f"iso-b-{driver}")) == ["A /shared"]
    # the image is untouched
    assert uf("run", "--rm", "--storage-driver", driver, "busybox", "cat", "/shared").returncode != 0
    uf.ok("rm", "-f", f"iso-a-{driver}", f"iso-b-{driver}")
    assert a not in uf.cids() and b not in uf.cids()


# -- diff cases ------------------------------------------------------------------------------

DIFF_SCRIPT = ("echo n > /d/new && echo C2 >> /d/change && rm /d/del && rm -rf /od && mkdir /od"
               " && echo c > /od/c && mv /rn /rn2")
DIFF_EXPECTED = ["A /d/new", "A /od/c", "A /rn2", "A /rn2/sub", "A /rn2/sub/y", "A /rn2/x",
                 "C /d", "C /d/change", "C /od", "D /d/del", "D /od/a", "D /od/b", "D /rn"]


@pytest.mark.parametrize("driver", DRIVERS)
def test_diff_cases_and_commit(uf, driver):
    """Added (A + parent C), changed (C), deleted lower file (D, a whiteout), a deleted
    then recreated dir (opaque: its lower entries D), a renamed lower dir; the committed
    image shows the same tree."""
    name = f"dc-{driver}"
    uf.ok("run", "--storage-driver", driver, "--name", name, "diffbase", "sh", "-c", DIFF_SCRIPT)
    assert sorted(uf.diff(name)) == sorted(DIFF_EXPECTED)
    img = f"dc-img-{driver}"
    uf.ok("commit", name, img)
    out = uf.ok("run", "--rm", "--storage-driver", driver, img, "sh", "-c",
                "ls /d /od /rn2 /rn2/sub; cat /d/change; test -e /rn || echo no-rn")
    assert out.split() == ["/d:", "change", "keep", "new", "/od:", "c", "/rn2:", "sub", "x",
                           "/rn2/sub:", "y", "c", "C2", "no-rn"]
    # committed layers mount on the other driver too
    other = "overlay" if driver == "fuse" else "fuse"
    out2 = uf.ok("run", "--rm", "--storage-driver", other, img, "sh", "-c",
                 "ls /d /od /rn2 /rn2/sub; cat /d/change; test -e /rn || echo no-rn")
    assert out2 == out
    # a diff of a running container, and of a changed dir's metadata only
    uf.ok("rm", name)
    uf.ok("rmi", img)


def test_diff_order_like_docker(uf):
    """docker container diff lists changes in walk order (a dir, its contents, then the
    next name: /d, /d/x, /d-x), parents first; the kinds are not grouped."""
    uf.ok("run", "--name", "order", "diffbase", "sh", "-c", DIFF_SCRIPT + " && echo > /d-x")
    lines = uf.diff("order")
    assert sorted(lines) == sorted(DIFF_EXPECTED + ["A /d-x"])
    assert lines == sorted(lines, key=lambda x: x[2:].split("/")), lines
    assert lines.index("A /d-x") == lines.index("A /d/new") + 1


# -- volumes ---------------------------------------------------------------------------------


def test_volumes_rw_ro(uf, tmp_path):
    host = tmp_path / "vol"
    host.mkdir()
    (host / "in").write_text("from-host\n")
    out = uf.ok("run", "--rm", "-v", f"{host}:/data", "busybox", "sh", "-c", "cat /data/in; echo w > /data/out")
    assert out == "from-host\n"
    assert (host / "out").read_text() == "w\n"
    r = uf("run", "--rm", "-v", f"{host}:/data:ro", "busybox", "sh", "-c", "cat /data/in; echo w > /data/out2")
    assert r.returncode != 0 and r.stdout == "from-host\n"
    assert "Read-only file system" in r.stderr
    assert not (host / "out2").exists()
    # the bind mount never lands in the container's layer
    uf.ok("run", "--name", "volcheck", "-v", f"{host}:/data", "busybox", "true")
    assert uf.diff("volcheck") in ([], ["A /data"]), uf.diff("volcheck")


@pytest.mark.parametrize("spec", ["relative/path:/data", "/nonexistent-unionfuse-host-path:/data", "{tmp}:data",
                                  "{tmp}:/data:bogus", "{tmp}"])
def test_bad_volume(uf, tmp_path, spec):
    before = uf.cids()
    ps_before = uf.ok("ps", "-a", "-q")
    r = uf("run", "--name", "badvol", "-v", spec.format(tmp=tmp_path), "busybox", "true")
    one_error_line(r)
    assert r.returncode in (2, 125)
    assert uf.cids() == before
    assert uf.ok("ps", "-a", "-q") == ps_before


# -- users -----------------------------------------------------------------------------------


def test_non_root_user(uf):
    assert uf.ok("run", "--rm", "-u", "nobody", "busybox", "id").startswith("uid=65534(nobody) gid=65534(nogroup)")
    assert uf.ok("run", "--rm", "-u", "1000:1000", "busybox", "id").startswith("uid=1000(user) gid=1000(user)")
    assert uf.ok("run", "--rm", "-u", "user", "busybox", "id").startswith("uid=1000(user) gid=1000(user)")
    r = uf("run", "--rm", "-u", "nobody", "busybox", "sh", "-c", "echo x > /etc/x")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    uf.ok("run", "--name", "userfile", "-u", "1000:1000", "busybox", "sh", "-c",
          "echo x > /tmp/ufile && mkdir /home/user/d && id -u > /home/user/d/f")
    assert sorted(uf.diff("userfile")) == ["A /home/user/d", "A /home/user/d/f", "A /tmp/ufile",
                                           "C /home", "C /home/user", "C /tmp"]
    info = json.loads(uf.ok("inspect", "userfile"))[0]
    upper = info["GraphDriver"]["Data"]["UpperDir"]
    for rel in ("tmp/ufile", "home/user/d", "home/user/d/f"):
        st = os.lstat(os.path.join(upper, rel))
        assert (st.st_uid, st.st_gid) == (1000, 1000), rel
    assert Path(upper, "home/user/d/f").read_text() == "1000\n"
    # the ownership survives commit
    uf.ok("commit", "userfile", "userimg")
    assert uf.ok("run", "--rm", "userimg", "stat", "-c", "%u:%g", "/tmp/ufile", "/home/user/d") == "1000:1000\n1000:1000\n"
    uf.ok("rm", "userfile")
    uf.ok("rmi", "userimg")


def test_unknown_user(uf):
    before = uf.cids()
    r = uf("run", "--rm", "-u", "nosuchuser", "busybox", "id")
    one_error_line(r)
    assert uf.cids() == before


# -- exit codes and bad input ----------------------------------------------------------------


def test_exit_codes(uf):
    assert uf("run", "--rm", "busybox", "sh", "-c", "exit 7").returncode == 7
    assert uf("run", "--rm", "busybox", "true").returncode == 0
    # a process killed by a signal: 128+N (pid 1 itself can't be killed from inside)
    assert uf("run", "--rm", "busybox", "sh", "-c", "sleep 100 & kill -9 $!; wait $!").returncode == 137
    r = uf("run", "--rm", "busybox", "/no/such/command")
    assert r.returncode != 0


def test_unknown_command_exit_127(uf):
    """docker run IMAGE no-such-command exits 127 (126 for a non-executable file)."""
    r = uf("run", "--rm", "busybox", "no-such-command")
    assert r.returncode == 127, r


def test_unknown_image(uf):
    before, images = uf.cids(), uf.ok("images", "-q")
    r = uf("run", "--name", "ghost", "no-such-image", "true")
    one_error_line(r)
    assert "no-such-image" in r.stderr
    assert uf.cids() == before and uf.ok("images", "-q") == images


def test_no_command(uf):
    before = uf.cids()
    r = uf("run", "busybox")
    one_error_line(r)
    assert uf.cids() == before


# -- rm / rmi refusals -----------------------------------------------------------------------


def test_rm_running_refused_without_force(uf):
    cid = run_d(uf, "--name", "busy", "busybox", "sleep", "100").strip()
    r = uf("rm", "busy")
    one_error_line(r)
    assert uf.rec(cid)["state"] == "running" and uf.ok("exec", "busy", "echo", "alive") == "alive\n"
    assert is_mounted(uf.rootfs(cid))
    assert uf.ok("rm", "-f", "busy") == "busy\n"
    assert cid not in uf.cids()
    assert_gone(uf, cid)


def test_rmi_in_use_refused(uf):
    uf.ok("tag", "busybox", "inuse")
    uf.ok("run", "--name", "user-of-img", "diffbase", "true")
    r = uf("rmi", "diffbase")
    one_error_line(r)
    assert "diffbase" in uf.ok("images")
    assert uf.ok("run", "--rm", "diffbase", "cat", "/d/keep") == "k\n"
    # a second tag goes by untagging, even while in use
    uf.ok("rmi", "inuse")
    assert "inuse" not in uf.ok("images")


def test_rmi_force_keeps_container_usable(uf):
    uf.ok("run", "--name", "mk", "busybox", "sh", "-c", "echo v > /v")
    uf.ok("commit", "mk", "doomed")
    uf.ok("rm", "mk")
    uf.ok("run", "--name", "uses-doomed", "doomed", "cat", "/v")
    assert uf("rmi", "doomed").returncode != 0
    uf.ok("rmi", "-f", "doomed")
    assert "doomed" not in uf.ok("images")
    # the layers stay while the container uses them
    assert uf.ok("start", "-a", "uses-doomed") == "v\n"
    assert uf.diff("uses-doomed") == []
    uf.ok("rm", "uses-doomed")


def test_name_clash(uf):
    uf.ok("run", "--name", "clash", "busybox", "sh", "-c", "echo first > /first")
    cid = uf.cid("clash")
    before = uf.cids()
    r = uf("run", "--name", "clash", "busybox", "sh", "-c", "echo second > /second")
    one_error_line(r)
    assert "clash" in r.stderr
    assert uf.cids() == before
    assert uf.cid("clash") == cid
    assert uf.diff("clash") == ["A /first"]
    assert uf.ok("start", "-a", "clash") == ""
    r = uf("run", "--name", "bad name!", "busybox", "true")
    one_error_line(r)
    assert uf.cids() == before


# -- detached containers ---------------------------------------------------------------------


def test_detached_logs_exec_stop_start(uf):
    script = ("if [ -e /marker ]; then cat /marker /exec-file; exit 4; fi; "
              "echo first > /marker; echo started; echo to-stderr >&2; exec sleep 100")
    cid = run_d(uf, "--name", "det", "busybox", "sh", "-c", script).strip()
    assert ID64.match(cid)
    wait_for(lambda: "to-stderr" in uf.ok("logs", "det"), what="log output")
    log = uf.ok("logs", "det")
    assert sorted(log.splitlines()) == ["started", "to-stderr"], log  # two streams: either order
    rows = uf.ps_rows()
    assert [r for r in rows if r[-1] == "det"], rows
    row = [r for r in rows if r[-1] == "det"][0]
    assert row[0] == cid[:12] and row[1] == "busybox" and row[4].startswith("Up ")
    assert row[2].startswith('"sh -c')
    hdr = uf.ok("ps").splitlines()[0]
    assert re.split(r"\s{2,}", hdr.strip()) == ["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES"]
    assert cid[:12] in uf.ok("ps", "-q").split()
    assert cid in uf.ok("ps", "-q", "--no-trunc").split()
    # exec
    assert uf.ok("exec", "det", "sh", "-c", "echo inexec > /exec-file; hostname") == cid[:12] + "\n"
    assert uf("exec", "det", "sh", "-c", "exit 5").returncode == 5
    assert uf.ok("exec", "-e", "X=1", "-w", "/tmp", "-u", "nobody", "det", "sh", "-c", "echo $X; pwd; id -u") == "1\n/tmp\n65534\n"
    r = uf("inspect", "det")
    assert json.loads(r.stdout)[0]["State"]["Running"] is True
    # stop: sleep as pid 1 ignores TERM, so KILL after the timeout
    t0 = time.monotonic()
    assert uf.ok("stop", "-t", "1", "det") == "det\n"
    assert time.monotonic() - t0 < 10
    assert not [r for r in uf.ps_rows() if r[-1] == "det"]
    row = [r for r in uf.ps_rows("-a") if r[-1] == "det"][0]
    assert row[4].startswith("Exited (137)"), row
    assert_gone(uf, cid)
    assert uf("exec", "det", "true").returncode != 0
    # start -a: the same layer, the first run's files are there
    r = uf("start", "-a", "det")
    assert r.returncode == 4 and r.stdout == "first\ninexec\n", r
    assert_gone(uf, cid)
    assert sorted(uf.diff("det")) == ["A /exec-file", "A /marker"]
    uf.ok("rm", "det")


def test_kill_and_start_detached(uf):
    cid = run_d(uf, "--name", "k", "busybox", "sleep", "100").strip()
    assert uf.ok("kill", "k") == "k\n"
    wait_for(lambda: uf.rec(cid)["state"] == "exited", what="exit after kill")
    assert_gone_soon(uf, cid)
    row = [r for r in uf.ps_rows("-a") if r[-1] == "k"][0]
    assert row[4].startswith("Exited (137)")
    assert_gone(uf, cid)
    r = uf("kill", "k")
    one_error_line(r)
    # start (detached) again, on the same layer
    assert uf.ok("start", "k") == "k\n"
    # (start may return a moment early: see test_start_returns_when_running)
    wait_for(lambda: uf.rec(cid)["state"] == "running" and runtime_id(cid) in runtime_ids("runc"), what="restart")
    assert uf.ok("exec", "k", "echo", "again") == "again\n"
    assert uf.ok("kill", "-s", "TERM", "k") == "k\n"  # pid 1 ignores TERM
    time.sleep(0.3)
    assert uf.rec(cid)["state"] == "running", (uf.rec(cid), Path(uf.cdir(cid), "log").read_text())
    uf.ok("kill", "-s", "SIGKILL", "k")
    wait_for(lambda: uf.rec(cid)["state"] == "exited", what="exit after SIGKILL")
    assert_gone_soon(uf, cid)
    uf.ok("rm", "k")


def test_detached_exit_code_and_logs_after_exit(uf):
    cid = uf.ok("run", "-d", "--name", "quick", "busybox", "sh", "-c", "echo out; exit 9").strip()
    wait_for(lambda: uf.rec(cid)["state"] == "exited", what="exit")
    assert_gone_soon(uf, cid)
    assert uf.ok("logs", "quick") == "out\n"
    row = [r for r in uf.ps_rows("-a") if r[-1] == "quick"][0]
    assert row[4].startswith("Exited (9)")
    assert json.loads(uf.ok("inspect", "quick"))[0]["State"]["ExitCode"] == 9
    assert_gone(uf, cid)


# -- run options -----------------------------------------------------------------------------


def test_env_workdir_hostname(uf):
    out = uf.ok("run", "--rm", "-e", "FOO=bar", "-e", "PATH=/bin", "-w", "/var/tmp", "--hostname", "myhost",
                "busybox", "sh", "-c", "echo $FOO; echo $PATH; pwd; hostname; cat /etc/hostname")
    lines = out.splitlines()
    assert lines[:4] == ["bar", "/bin", "/var/tmp", "myhost"]
    out = uf.ok("run", "--rm", "-w", "/new/dir", "busybox", "pwd")
    assert out == "/new/dir\n"
    env = uf.ok("run", "--rm", "busybox", "env").splitlines()
    assert any(e.startswith("PATH=") for e in env) and "HOME=/root" in env


def test_entrypoint_and_cmd(uf):
    uf.ok("import", uf.tar, "epimg", "--change", 'ENTRYPOINT ["/bin/echo","ep"]', "--change", 'CMD ["c1"]')
    assert uf.ok("run", "--rm", "epimg") == "ep c1\n"
    assert uf.ok("run", "--rm", "epimg", "x", "y") == "ep x y\n"
    assert uf.ok("run", "--rm", "--entrypoint", "/bin/echo", "epimg") == "\n"
    assert uf.ok("run", "--rm", "--entrypoint", "/bin/echo", "epimg", "z") == "z\n"
    assert uf.ok("run", "--rm", "--entrypoint", "", "epimg", "echo", "hi") == "hi\n"
    uf.ok("import", uf.tar, "shellimg", "--change", "CMD echo shell-form $HOME")
    assert uf.ok("run", "--rm", "shellimg") == "shell-form /root\n"
    uf.ok("rmi", "epimg", "shellimg")


def test_network_none_vs_host(uf):
    none = uf.ok("run", "--rm", "busybox", "cat", "/proc/net/dev").splitlines()
    assert len(none) == 3 and none[2].strip().startswith("lo:"), none
    assert uf.ok("run", "--rm", "--network", "none", "busybox", "cat", "/proc/net/dev").count("\n") == 3
    with open("/proc/net/dev") as f:
        host_ifaces = sorted(line.split(":")[0].strip() for line in f.read().splitlines()[2:])
    host = uf.ok("run", "--rm", "--network", "host", "busybox", "cat", "/proc/net/dev").splitlines()
    assert sorted(line.split(":")[0].strip() for line in host[2:]) == host_ifaces
    r = uf("run", "--rm", "--network", "bridge", "busybox", "true")
    assert r.returncode != 0


# -- runtimes --------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_tty_starts_with_the_terminal_size(uf, request, runtime):
    """-it: the container's terminal has the caller's size from the start, with either
    runtime (runc copies it; crun takes config.json's consoleSize)."""
    t = start_pty(request, uf.argv("run", "-it", "--runtime", runtime, "--rm", "busybox", "/bin/sh"),
                  rows=27, cols=93)
    assert re.search(r"^27 93$", t.cmd("stty size"), re.M)
    t.send("exit 4\n")
    assert t.wait() == 4


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_runtimes(uf, runtime):
    name = f"rt-{runtime}"
    r = uf("run", "--runtime", runtime, "--name", name, "-u", "nobody", "busybox", "sh", "-c",
           "id -u; echo hi > /tmp/f; cat /tmp/f; exit 5")
    assert r.returncode == 5 and r.stdout == "65534\nhi\n", r
    cid = uf.cid(name)
    assert uf.rec(cid)["options"]["runtime"] == runtime
    assert_gone(uf, cid)
    assert sorted(uf.diff(name)) == ["A /tmp/f", "C /tmp"]
    # detached + exec + rm -f with this runtime
    cid2 = run_d(uf, "--runtime", runtime, "--name", name + "-d", "busybox", "sleep", "100")
    assert runtime_id(cid2) in runtime_ids(runtime)
    assert uf.ok("exec", name + "-d", "cat", "/proc/1/cmdline").startswith("sleep")
    uf.ok("rm", "-f", name + "-d")
    assert runtime_id(cid2) not in runtime_ids(runtime)
    assert not is_mounted(os.path.join(uf.root, "containers", cid2, "rootfs"))
    uf.ok("rm", name)


# -- killed pieces ---------------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_exited_container_leaves_nothing(uf, driver):
    cid = None
    r = uf("run", "--storage-driver", driver, "--name", f"gone-{driver}", "busybox", "sh", "-c", "exit 2")
    assert r.returncode == 2
    cid = uf.cid(f"gone-{driver}")
    assert_gone(uf, cid)
    assert uf.rec(cid)["daemon_pid"] is None
    cid2 = uf.ok("run", "-d", "--storage-driver", driver, "busybox", "sh", "-c", "sleep 0.3").strip()
    wait_for(lambda: uf.rec(cid2)["state"] == "exited", what="detached exit")
    wait_for(lambda: not uf.leftovers(cid2), what="cleanup after detached exit")
    uf.ok("rm", f"gone-{driver}", cid2)


def test_killed_daemon(uf):
    cid = run_d(uf, "--name", "nodaemon", "busybox", "sleep", "100").strip()
    pid = uf.rec(cid)["daemon_pid"]
    assert pid and daemons_for(uf.rootfs(cid)) == [pid]
    os.kill(pid, signal.SIGKILL)  # the daemon our run started, proved above
    wait_for(lambda: not alive(pid), what="daemon death")
    r = uf("rm", "-f", "nodaemon")
    assert r.returncode == 0, r
    assert cid not in uf.cids()
    assert not is_mounted(uf.rootfs(cid))
    assert runtime_id(cid) not in runtime_ids("runc")
    assert uf.ok("run", "--rm", "busybox", "echo", "ok") == "ok\n"
    assert uf.ok("run", "--rm", "--name", "nodaemon", "busybox", "echo", "ok") == "ok\n"


def test_killed_daemon_then_ps_and_exec(uf):
    """With the daemon gone the container can't read its files: exec fails cleanly,
    ps still answers."""
    cid = run_d(uf, "--name", "nodaemon2", "busybox", "sleep", "100").strip()
    pid = uf.rec(cid)["daemon_pid"]
    assert daemons_for(uf.rootfs(cid)) == [pid]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), what="daemon death")
    assert "nodaemon2" in uf.ok("ps", "-a")
    r = uf("exec", "nodaemon2", "cat", "/etc/hostname", timeout=30)
    assert r.returncode != 0
    uf.ok("stop", "-t", "1", "nodaemon2")
    assert_gone(uf, cid)
    uf.ok("rm", "nodaemon2")


def test_killed_shim(uf):
    cid = run_d(uf, "--name", "noshim", "busybox", "sleep", "100").strip()
    shim = uf.rec(cid)["shim_pid"]
    assert shim and "_shim" in open(f"/proc/{shim}/cmdline").read()
    os.kill(shim, signal.SIGKILL)
    wait_for(lambda: not alive(shim), what="shim death")
    row = wait_for(lambda: [r for r in uf.ps_rows("-a") if r[-1] == "noshim" and r[4].startswith("Exited")],
                   what="ps -a showing the container exited")
    assert "noshim" not in uf.ok("ps")
    wait_for(lambda: not uf.leftovers(cid), what="cleanup after a killed shim")
    r = uf("rm", "noshim")
    assert r.returncode == 0, r
    assert cid not in uf.cids()
    assert uf.ok("run", "--rm", "busybox", "echo", "ok") == "ok\n"


def test_run_detached_returns_when_started(uf):
    """docker run -d prints the id once the container is started: at that point the
    OCI runtime has it (so an immediate exec/kill finds it)."""
    for i in range(3):
        cid = uf.ok("run", "-d", "busybox", "sleep", "100").strip()
        r = subprocess.run(["runc", "state", runtime_id(cid)], capture_output=True, text=True)
        assert r.returncode == 0 and '"running"' in r.stdout, f"try {i}: {r.stderr.strip()}"


def test_exited_state_recorded_after_cleanup(uf):
    """Once a detached container shows as exited, its mount and daemon are gone."""
    cid = run_d(uf, "busybox", "sleep", "100")
    uf.ok("kill", cid)
    wait_for(lambda: uf.rec(cid)["state"] == "exited", what="exit")
    assert uf.leftovers(cid) == []


def test_start_returns_when_running(uf):
    """docker start returns once the container runs: right after `start` the record says
    running and the OCI runtime has the container."""
    cid = run_d(uf, "--name", "restart", "busybox", "sleep", "100")
    for i in range(4):
        uf.ok("kill", "restart")
        wait_for(lambda: uf.rec(cid)["state"] == "exited", what="exit")
        uf.ok("start", "restart")
        state = uf.rec(cid)["state"]
        r = subprocess.run(["runc", "state", runtime_id(cid)], capture_output=True, text=True)
        assert state == "running" and '"running"' in r.stdout, f"try {i}: record {state}, runc: {r.stderr.strip()}"
