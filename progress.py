"""One progress bar that stays readable in a terminal (redrawn in place) and in a log file (a line per 10%)."""
import sys
import time


class Progress:
    def __init__(self, total, desc, enabled=True):
        # the sys.stdout of now, not of import time: a notebook or a test may have replaced it since
        self.total, self.desc, self.enabled, self.stream = max(total, 1), desc, enabled, sys.stdout
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self.done = 0
        self.next_line, self.last_draw = 0.1, 0.0

    def update(self, n=1, info=None):
        """info: text, or a function giving it, called only when a line is drawn (it may sync the GPU)."""
        self.done += n
        if not self.enabled:
            return
        frac, finished, now = self.done / self.total, self.done >= self.total, time.perf_counter()
        if self.tty and (finished or now - self.last_draw > 0.5):
            self.stream.write("\r" + self.line(frac, info) + ("\n" if finished else ""))
        elif not self.tty and (frac >= self.next_line or finished):
            self.stream.write(self.line(frac, info) + "\n")
            while self.next_line <= frac:
                self.next_line += 0.1
        else:
            return
        self.last_draw = now
        self.stream.flush()

    def line(self, frac, info):
        info = info() if callable(info) else info or ""
        elapsed = time.perf_counter() - self.start
        eta = elapsed / frac * (1 - frac) if frac > 0 else 0.0
        bar = "#" * int(20 * frac)
        return f"{self.desc} [{bar:<20}] {self.done}/{self.total} {elapsed:5.0f}s<{eta:4.0f}s {info}".rstrip()


def format_seconds(s):
    h, rem = divmod(int(s), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"
