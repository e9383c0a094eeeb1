"""The progress display of a training loop: tqdm's bar on a terminal; plain lines in a log file.

In a log file (Slurm, nohup: stdout and stderr in one file, no terminal) a bar redrawn with
carriage returns glues itself to the sample blocks and metric lines printed between redraws
(`loss=4.07]   === Validation Samples (Step 2) ===`), and `grep '^=== Validation Samples'`
finds nothing. There the progress is a plain line every `PLAIN_INTERVAL_S` and one at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

from tqdm import tqdm

PLAIN_INTERVAL_S = 30.0


class PlainProgress:
    """The part of tqdm's interface the loops use (`update`, `set_postfix`, `close`), written as
    whole lines: `train: 306/1200 steps (26%), 2.10 steps/s, eta 7m06s, loss=4.0700`."""

    def __init__(self, total: int, initial: int, desc: str, stream: TextIO, interval_s: float = PLAIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.n, self.desc, self.stream, self.interval_s, self.clock = total, initial, desc, stream, interval_s, clock
        self.start_n, self.start_s = initial, clock()
        self.last_s, self.last_n = self.start_s, initial
        self.postfix: dict[str, Any] = {}

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last_s >= self.interval_s:
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        if self.n != self.last_n:
            self._emit()

    def _emit(self) -> None:
        now = self.clock()
        rate = (self.n - self.start_n) / max(now - self.start_s, 1e-9)
        eta = f", eta {_duration((self.total - self.n) / rate)}" if rate > 0 and self.n < self.total else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        pct = 100 * self.n // max(self.total, 1)
        print(f"{self.desc}: {self.n}/{self.total} steps ({pct}%), {rate:.2f} steps/s{eta}{extra}", file=self.stream, flush=True)
        self.last_s, self.last_n = now, self.n


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class _Off:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **values: Any) -> None: ...
    def close(self) -> None: ...


def progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    """tqdm's bar when stderr is a terminal, plain periodic lines otherwise, nothing when off
    (ranks other than 0)."""
    if not enabled:
        return _Off()
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=0.5)
    return PlainProgress(total, initial, desc, sys.stderr)


def line_buffered_stdout() -> None:
    """Without a terminal, stdout is block-buffered and a buffer flushed mid-line lets a stderr
    line land inside a sample block. Line buffering writes every line whole."""
    if not sys.stdout.isatty():
        try:
            sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        except (AttributeError, ValueError):  # a replaced stdout (pytest capture, redirect_stdout)
            pass
