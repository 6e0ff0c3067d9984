"""The poll waits of the Flower engine: fast after activity, growing with idleness up to a cap; Flower's SuperNode
and object pulls use them (the Flower internals this relies on are checked to be still what it assumes)."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

from trip.federation.flower import polling
from trip.federation.flower.polling import Backoff, quick_object_pulls, supernode_clock


class FakeClock:
    def __init__(self):
        self.now, self.slept = 100.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(polling, "time", fake)
    return fake


def test_backoff_is_fast_after_activity_then_a_share_of_the_idle_time_up_to_the_cap(clock):
    backoff = Backoff(fast=0.05, cap=1.0, share=0.1)
    backoff.pause()
    assert clock.slept == [0.05]
    clock.now += 3.0  # idle 3.05 s
    backoff.pause()
    assert clock.slept[-1] == pytest.approx(0.305)
    clock.now += 60.0
    backoff.pause()
    backoff.pause(most=0.3)
    assert clock.slept[-2:] == [1.0, 0.3]
    backoff.busy()
    backoff.pause()
    assert clock.slept[-1] == 0.05


def test_supernode_clock_backs_off_idle_pulls_and_waits_briefly_on_its_own_state(clock):
    backoff = Backoff(fast=0.05, cap=1.0, share=0.1)
    sleep = supernode_clock(backoff).sleep
    clock.now += 30.0
    sleep(3)  # Flower's wait after an empty pull
    assert clock.slept == [1.0]
    sleep(0.5)  # Flower's wait for the worker's reply: activity
    sleep(3)
    assert clock.slept[1:] == [0.05, 0.05]


def test_flower_internals_relied_on_are_as_assumed():
    """`start_client_internal` uses its `time` only to sleep, and the object pulls take their first retry wait
    and its cap as keyword defaults that `quick_object_pulls` sets."""
    loop = importlib.import_module("flwr.supernode.start_client_internal")
    assert set(re.findall(r"\btime\.(\w+)", inspect.getsource(loop))) == {"sleep"}
    quick_object_pulls(first=0.02, cap=1.0)
    utils = importlib.import_module("flwr.supercore.inflatable.inflatable_utils")
    for fn in (utils.pull_objects, utils.pull_and_inflate_object_from_tree):
        params = inspect.signature(fn).parameters
        assert (params["initial_backoff"].default, params["backoff_cap"].default) == (0.02, 1.0)
