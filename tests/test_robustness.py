"""The daemon survives bugs in its handlers: it logs them and answers EIO."""

from __future__ import annotations

import errno
import os
import select
import subprocess
import sys

import pytest

from conftest import REPO, Daemon
from unionfuse.mount import LOG_FILE_ENV, READY_FD_ENV

# A daemon whose directory listing has a bug (raises ZeroDivisionError).
BROKEN = """
import sys
from unionfuse.fs import operations
def _broken(self, node):
    if node.path() == b"boom":
        1 / 0
    return _orig(self, node)
_orig = operations.UnionOperations._merged
operations.UnionOperations._merged = _broken
from unionfuse.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_handler_bug_answers_eio_and_daemon_lives(dirs, tmp_path):
    (dirs["l1"] / "boom").mkdir()
    (dirs["l1"] / "fine").write_text("ok")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "daemon.log"
    r, w = os.pipe()
    env = dict(os.environ, **{READY_FD_ENV: str(w), LOG_FILE_ENV: str(log)})
    proc = subprocess.Popen(
        [sys.executable, "-c", BROKEN, "mount", "--foreground", "--lower", str(dirs["l1"]),
         "--upper", str(dirs["upper"]), "--work", str(dirs["work"]), str(mnt)],
        pass_fds=(w,), env=env, cwd=str(REPO), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=open(log, "ab"))
    os.close(w)
    d = Daemon(proc, str(mnt), log)
    try:
        ready, _, _ = select.select([r], [], [], 20)
        assert ready and os.read(r, 16).startswith(b"ready"), d.log_text()
        os.close(r)
        with pytest.raises(OSError) as e:
            os.listdir(mnt / "boom")
        assert e.value.errno == errno.EIO
        # still serving
        assert (mnt / "fine").read_text() == "ok"
        assert proc.poll() is None
        assert "ZeroDivisionError" in d.log_text()
        assert "bug in readdir handler" in d.log_text()
    finally:
        d.stop()
    assert proc.returncode == 0
