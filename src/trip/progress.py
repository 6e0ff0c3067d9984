"""Progress of a phase (pretraining, frozen features, a run's rounds, a download): tqdm's bar on a terminal, plain
lines elsewhere. A bar redraws itself with carriage returns, which a log file, a pipe or a cluster job's output
keeps every one of; off a terminal a phase writes one line when it starts, one every `LINE_EVERY_S` seconds
while it runs and one when it ends, each with the count, the rate and the time taken."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

LINE_EVERY_S = 20.0


def progress(iterable: Iterable | None = None, *, desc: str, total: float | None = None, unit: str = "it",
             unit_scale: bool = False, initial: float = 0, stream: TextIO | None = None) -> Any:
    """A tqdm bar (left on screen only while it runs) when `stream` (default stderr) is a terminal, else a
    `LineProgress`; both take `update`, `set_postfix`, `close`, iteration and `with`."""
    stream = stream or sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if stream.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, unit_scale=unit_scale, initial=initial,
                    leave=False, file=stream)
    return LineProgress(iterable, desc=desc, total=total, unit=unit, unit_scale=unit_scale, initial=initial,
                        stream=stream)


class LineProgress:
    def __init__(self, iterable: Iterable | None, *, desc: str, total: float | None, unit: str, unit_scale: bool,
                 initial: float, stream: TextIO, every_s: float = LINE_EVERY_S, clock=time.monotonic):
        self.iterable, self.desc, self.total, self.unit, self.unit_scale = iterable, desc, total, unit, unit_scale
        self.stream, self.every_s, self.clock = stream, every_s, clock
        self.n = self.initial = initial
        self.postfix: dict[str, object] = {}
        self.closed = False
        self.start = self.last_line = clock()
        self._write(f"started{f' ({self._amount(total)})' if total is not None else ''}")

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last_line >= self.every_s:
            self.last_line = now
            self._write(self._state(now))

    def set_postfix(self, **values: object) -> None:
        self.postfix = values

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        finished = self.total is None or self.n >= self.total
        self._write(("done: " if finished else "stopped at ") + self._state(self.clock()))

    def _state(self, now: float) -> str:
        elapsed = now - self.start
        done = self._amount(self.n) if self.total is None else f"{self._count(self.n)}/{self._amount(self.total)}"
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        speed = f"{1 / rate:.1f} s each" if 0 < rate < 1 and not self.unit_scale else f"{self._amount(rate)}/s"
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        return f"{done}, {speed}, {elapsed:.0f} s{extra}"

    def _amount(self, n: float) -> str:
        return f"{self._count(n)}{'' if self.unit_scale else ' '}{self.unit}"

    def _count(self, n: float) -> str:
        if self.unit_scale:
            return tqdm.format_sizeof(n)
        return f"{n:,.0f}" if n >= 10 or n == int(n) else f"{n:.2f}"

    def _write(self, text: str) -> None:
        print(f"{' '.join(self.desc.split())}: {text}", file=self.stream, flush=True)  # no column padding
