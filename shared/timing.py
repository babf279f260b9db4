"""Seconds per section of a notebook, which a chapter's summary prints: a reader sees where the time goes, and a
maintainer sees a cpu-scale run stay within its budget (DESIGN.md, section 3)."""

import time
from collections.abc import Callable


class SectionClock:
    """`start(name)` at the top of each section; `seconds()` is {name: seconds from its start to the next
    section's start, or to now for the last one}. The clock is injected, so tests need no real time."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.starts: list[tuple[str, float]] = []

    def start(self, section: str) -> None:
        if any(name == section for name, _ in self.starts):
            raise ValueError(f"section {section!r} was started already")
        self.starts.append((section, self.clock()))

    def seconds(self) -> dict[str, float]:
        ends = [stamp for _, stamp in self.starts[1:]] + [self.clock()]
        return {name: end - stamp for (name, stamp), end in zip(self.starts, ends)}

    def table(self) -> str:
        """One line per section and a total, in whole seconds."""
        seconds = self.seconds()
        width = max([len(name) for name in seconds] + [len("total")])
        lines = [f"{name:{width}}  {value:6.0f} s" for name, value in seconds.items()]
        return "\n".join(lines + [f"{'total':{width}}  {sum(seconds.values()):6.0f} s"])


class TickingClock:
    """A clock that moves on `tick` seconds each time it is read: what tests inject where code reads the time, so
    that the timing they check is the same on any machine, however loaded."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now
