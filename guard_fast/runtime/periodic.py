"""A call repeated on a timer while a long job runs (the carries of reproduce and of the study)."""

from __future__ import annotations

import threading
from typing import Any, Callable


class Periodic:
    """Calls `fn()` every `every_s` seconds on a daemon thread while inside its `with` block, and once more on the
    way out (interrupts included); `now()` calls it at once. Calls never overlap: they hold `self.lock`, which a
    subclass also takes to change what `fn` reads."""

    def __init__(self, fn: Callable[[], Any], every_s: float, name: str):
        self.fn, self.every_s = fn, every_s
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            self.now()

    def now(self) -> Any:
        with self.lock:
            return self.fn()

    def __enter__(self) -> Periodic:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self.now()
