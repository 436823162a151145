"""Wait for the next FUSE request without a trip through trio's scheduler.

pyfuse3's worker loop waits for /dev/fuse with ``trio.lowlevel.wait_readable``: the
task parks, trio runs its I/O loop (epoll), wakes the task and switches back to it.  For
a daemon that answers one request at a time that round costs about as much as
answering the request.  While nothing else in the daemon can need trio (no thread is
running for a request, no second worker exists), the wait can instead be a plain
blocking ``poll()`` on the FUSE fd with the GIL released: the kernel wakes this thread
directly when the next request arrives.

What else could need the trio loop, and how it is noticed:

* signals and threads: Python writes a byte to trio's wakeup socketpair on every
  signal (``signal.set_wakeup_fd``), and so does a thread handing trio work; the read
  end is in the poll set, and when it fires we go back to trio's own wait, which
  drains it and runs what is due.
* a blocking request run in a thread (UnionOperations._in_thread): it calls
  :func:`busy` / :func:`idle` around the thread and the extra worker, and while
  anything is busy every wait is trio's.
* fairness: every ``YIELD_EVERY`` requests, and after ``IDLE_MS`` without one, the
  wait goes through trio anyway.

With the C fast path on, fs/_fuseshim.c also runs a C serve loop by the same rules: a
request it answers in C is followed by the next wait in C, and only a request that
needs Python comes back up here.  Both waits then use the shim's spinning poll
(``wait``/``set_spin``): a request that comes within the spin window is read without
the thread ever going to sleep.

pyfuse3 looks ``_wait_fuse_readable`` up in its module globals on every call, so
:func:`install` replaces it; the original keeps doing the trio wait (with pyfuse3's read
lock and reader count, which its worker loop relies on).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal

log = logging.getLogger(__name__)

YIELD_EVERY = 64
IDLE_MS = 1000
NO_FASTWAIT_ENV = "UNIONFUSE_NO_FASTWAIT"

_busy = 0
_shim = None  # fs/_fuseshim, when its C serve loop is on (install)


def busy() -> None:
    global _busy
    _busy += 1
    if _shim is not None and _busy == 1:
        _shim.loop_busy(True)


def idle() -> None:
    global _busy
    _busy -= 1
    if _shim is not None and _busy == 0:
        _shim.loop_busy(False)


def fuse_fd() -> int | None:
    """The /dev/fuse fd pyfuse3 opened (it does not export it)."""
    found = None
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                if found is not None:
                    return None  # two: can't tell which is the session's
                found = int(name)
        except OSError:
            continue
    return found


def _trio_wakeup_fd() -> int | None:
    """The read end of trio's wakeup socketpair, written on every signal (it is the
    ``signal.set_wakeup_fd``) and whenever a thread hands trio work; None if this trio
    is not built that way (then the fast wait stays off)."""
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT

        wakeup = GLOBAL_RUN_CONTEXT.runner.entry_queue.wakeup
        read_fd, write_fd = wakeup.wakeup_sock.fileno(), wakeup.write_sock.fileno()
    except (ImportError, AttributeError):
        return None
    current = signal.set_wakeup_fd(-1)  # only to read it: put back as trio set it
    signal.set_wakeup_fd(current, warn_on_full_buffer=False)
    return read_fd if current == write_fd else None


def install(pyfuse3, shim=None) -> bool:
    """Install the fast wait; and, given fs/_fuseshim with its fast path on, its C
    serve loop (requests answered in C are read, answered and waited for there, by the
    same rules as here; see the C source)."""
    global _shim
    if os.environ.get(NO_FASTWAIT_ENV) == "1":
        return False
    original = getattr(pyfuse3, "_wait_fuse_readable", None)
    fd = fuse_fd()
    wake = _trio_wakeup_fd()
    if original is None or fd is None or wake is None:
        log.debug("fast wait not installed (pyfuse3 or trio internals or fd not found)")
        return False
    if shim is not None and hasattr(shim, "loop_enable") and shim.loop_enable(wake, IDLE_MS, YIELD_EVERY):
        _shim = shim
        shim.loop_busy(_busy > 0)
        log.debug("C serve loop on")
    if shim is not None:
        spin_wait = shim.wait  # spins before it sleeps (set_spin), as the C loop does

        def wait_fd() -> bool:
            return spin_wait(fd, wake, IDLE_MS)
    else:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(wake, select.POLLIN)

        def wait_fd() -> bool:
            try:
                ready = poller.poll(IDLE_MS)
            except OSError as e:
                if e.errno != errno.EINTR:
                    raise
                return False
            return len(ready) == 1 and ready[0][0] == fd and not ready[0][1] & ~select.POLLIN

    count = 0

    async def _wait_fuse_readable():
        nonlocal count
        if _busy or count >= YIELD_EVERY or (_shim is not None and _shim.loop_take_yield()):
            count = 0
            return await original()
        count += 1
        if wait_fd():
            return True
        count = 0
        return await original()

    pyfuse3._wait_fuse_readable = _wait_fuse_readable
    return True
