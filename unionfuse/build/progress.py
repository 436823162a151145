"""Build output.

- plain: classic ``docker build`` lines (``Step N/M : ...``, `` ---> Using cache``,
  `` ---> Running in ...``, `` ---> <id>``) with the step's time, RUN output streamed;
- tty: a compact view redrawn in place (one line per step, the tail of a RUN's output
  under the running step);
- quiet: nothing but the image id at the end (a failing RUN's output goes to stderr).

RUN output arrives on a pipe that replaces fds 1 and 2 while the runtime runs (the runner
attaches the container to our stdio); a thread copies it where the mode wants it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time


def _w(fd: int, s: str | bytes) -> None:
    b = s.encode("utf-8", "replace") if isinstance(s, str) else s
    while b:
        try:
            n = os.write(fd, b)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        b = b[n:]


class Progress:
    def __init__(self, mode: str = "plain", out_fd: int = 1, err_fd: int = 2):
        self.mode = mode
        self.out = out_fd
        self.err = err_fd
        self.tail = bytearray()       # recent RUN output (for errors / quiet / tty)
        self.lock = threading.Lock()
        self.steps: list[list] = []   # tty: [label, state, start, seconds]
        self.drawn = 0
        self.t0 = time.monotonic()
        self.last_draw = 0.0

    # -- events ------------------------------------------------------------------------

    def step(self, n: int, total: int, text: str) -> None:
        self.cur_start = time.monotonic()
        self.tail = bytearray()
        if self.mode == "plain":
            _w(self.out, f"Step {n}/{total} : {text}\n")
        elif self.mode == "tty":
            self.steps.append([f"[{n}/{total}] {text}", "run", time.monotonic(), 0.0])
            self._draw(force=True)

    def note(self, text: str) -> None:
        if self.mode == "plain":
            _w(self.out, f" ---> {text}\n")

    def info(self, text: str) -> None:
        if self.mode == "plain":
            _w(self.out, text + "\n")

    def step_done(self, image_short: str, cached: bool) -> None:
        dt = time.monotonic() - self.cur_start
        if self.mode == "plain":
            if cached:
                _w(self.out, " ---> Using cache\n")
            _w(self.out, f" ---> {image_short}  [{'CACHED' if cached else f'{dt:.2f}s'}]\n")
        elif self.mode == "tty":
            s = self.steps[-1]
            s[1] = "cached" if cached else "done"
            s[3] = dt
            self.tail = bytearray()
            self._draw(force=True)

    def warn(self, text: str) -> None:
        if self.mode == "tty":
            self._draw(force=True, clear=True)
            self.drawn = 0
        _w(self.err, f"[Warning] {text}\n")

    def failed(self) -> None:
        if self.mode == "tty":
            if self.steps:
                self.steps[-1][1] = "error"
                self.steps[-1][3] = time.monotonic() - self.steps[-1][2]
            self.tail_keep = bytes(self.tail)
            self.tail = bytearray()
            self._draw(force=True)
        if self.mode in ("tty", "quiet") and getattr(self, "run_output", None):
            _w(self.err, self.run_output[-65536:])
            if not self.run_output.endswith(b"\n"):
                _w(self.err, "\n")

    def finished(self, image_id: str, tags: list[str]) -> None:
        if self.mode == "quiet":
            _w(self.out, image_id + "\n")
            return
        if self.mode == "tty":
            self._draw(force=True)
        _w(self.out, f"Successfully built {image_id.split(':', 1)[1][:12]}\n")
        for t in tags:
            _w(self.out, f"Successfully tagged {t}\n")

    # -- RUN output --------------------------------------------------------------------

    @contextlib.contextmanager
    def capture(self):
        """fds 1 and 2 go to a pipe for the duration (the container writes there)."""
        sys.stdout.flush()
        sys.stderr.flush()
        saved = (os.dup(1), os.dup(2))
        r, w = os.pipe()
        self.run_output = b""
        real_out = saved[0] if self.out == 1 else self.out
        chunks: list[bytes] = []

        def pump():
            while True:
                try:
                    b = os.read(r, 65536)
                except OSError:
                    break
                if not b:
                    break
                chunks.append(b)
                if self.mode == "plain":
                    _w(real_out, b)
                else:
                    with self.lock:
                        self.tail += b
                        if len(self.tail) > 65536:
                            del self.tail[:-65536]
                    if self.mode == "tty":
                        self._draw(out_fd=real_out)

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        os.dup2(w, 1)
        os.dup2(w, 2)
        os.close(w)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            t.join(10)
            os.close(r)
            self.run_output = b"".join(chunks)

    # -- tty view ----------------------------------------------------------------------

    def _draw(self, force: bool = False, out_fd: int | None = None, clear: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        fd = self.out if out_fd is None else out_fd
        with self.lock:
            lines = []
            done = sum(1 for s in self.steps if s[1] in ("done", "cached"))
            lines.append(f"[+] Building {now - self.t0:.1f}s ({done}/{len(self.steps)})")
            for label, state, start, secs in self.steps:
                t = secs if state != "run" else now - start
                prefix = "CACHED " if state == "cached" else ("ERROR " if state == "error" else "")
                lines.append(f" => {prefix}{label[:100]:<70} {t:5.1f}s")
            if self.tail:
                for ln in bytes(self.tail).decode("utf-8", "replace").splitlines()[-6:]:
                    lines.append(f" => => # {ln[:110]}")
            out = "".join(f"\x1b[{self.drawn}F" if self.drawn else "")
            out += "\x1b[J" + "\n".join(lines) + "\n"
            if clear:
                out = (f"\x1b[{self.drawn}F" if self.drawn else "") + "\x1b[J"
                self.drawn = 0
            else:
                self.drawn = len(lines)
        _w(fd, out)
