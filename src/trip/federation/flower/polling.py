"""How often the federation's loops ask for work. Every hop of a message on the local federation is a poll: the
SuperNode asks the SuperLink for messages, the worker asks its SuperNode for a task, the SuperNode waits for the
worker's reply, the strategy asks the SuperLink for the replies. Flower's SuperNode waits 3 s after an empty pull
and 0.5 s between looks for the reply: with two exchanges a round, seconds a round on loopback.

A `Backoff` polls fast right after activity and slows down the longer nothing happens (at most once per `cap`):
a message is seen at most a tenth of the time the loop had been idle late, and an idle federation costs a
request per second per loop.

`python -m trip.federation.flower.polling flower-supernode ARGS` runs Flower's SuperNode with these waits. Flower
exposes no setting for them, so this relies on two Flower internals (flwr 1.42):
- `flwr.supernode.start_client_internal` waits with `time.sleep(3)` after an empty pull and `time.sleep(0.5)` for
  a reply or an object of its own state; that module's `time` is replaced (nothing else there uses it).
- `flwr.supercore.inflatable.inflatable_utils.pull_objects` retries an object that is not there yet after 1 s,
  doubling up to 10 s. That is the common case here, not an exception: a SuperNode lists a message (and the
  SuperLink a reply) before its objects have arrived, and a fast worker (or ServerApp) asks at once. Its default
  first wait is made `Backoff.fast` (`quick_object_pulls`, in the SuperNode and in both workers)."""

from __future__ import annotations

import importlib
import math
import sys
import time
from types import SimpleNamespace

IDLE_WAIT = 1.0  # a wait this long or longer in Flower's SuperNode is its idle pull loop


class Backoff:
    def __init__(self, fast: float = 0.05, cap: float = 1.0, share: float = 0.1):
        self.fast, self.cap, self.share = fast, cap, share
        self.last = time.monotonic()

    def busy(self) -> None:
        """Something happened: poll fast again."""
        self.last = time.monotonic()

    def pause(self, most: float = math.inf) -> None:
        idle = time.monotonic() - self.last
        time.sleep(min(most, self.cap, max(self.fast, self.share * idle)))


def supernode_clock(backoff: Backoff) -> SimpleNamespace:
    """A `time` for Flower's SuperNode loop: its idle pulls back off, its waits on its own state (a reply of
    the worker, an object) are short and count as activity."""

    def sleep(seconds: float) -> None:
        if seconds >= IDLE_WAIT:
            backoff.pause(seconds)
        else:
            backoff.busy()
            time.sleep(min(seconds, backoff.fast))

    return SimpleNamespace(sleep=sleep)


def quick_object_pulls(first: float = 0.02, cap: float = 1.0) -> None:
    """Flower's object pulls retry a missing object after `first` s (not 1 s), doubling up to `cap`."""
    utils = importlib.import_module("flwr.supercore.inflatable.inflatable_utils")
    for fn in (utils.pull_objects, utils.pull_and_inflate_object_from_tree):
        fn.__kwdefaults__.update(initial_backoff=first, backoff_cap=cap)


def main(argv: list[str]) -> int:
    if argv[:1] != ["flower-supernode"]:
        sys.exit("usage: python -m trip.federation.flower.polling flower-supernode ARGS")
    from flwr.supernode.cli import flower_supernode

    importlib.import_module("flwr.supernode.start_client_internal").time = supernode_clock(Backoff())
    quick_object_pulls()
    sys.argv = argv
    return flower_supernode()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
