"""One owner per problem folder: the ownership lease (storage/ownership.py), in-process.

The command line's side (two ``serve`` processes on one root, ``rollback`` while
served) is in tests/cli/test_cli.py.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import trio

from fl_coordinator.errors import ProblemError, first_of
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.ownership import (
    LEASE,
    acquire,
    ensure_not_served,
    hold_ownership,
    holder,
)


def plant(layout: Layout, *, host: str, pid: int, age: float) -> None:
    """A lease written by someone else, whose last heartbeat is ``age`` seconds old."""
    layout.own.mkdir(parents=True, exist_ok=True)
    owner = {"host": host, "pid": pid, "started": "2026-11-29T08:00:00+00:00",
             "heartbeat": time.time() - age, "instance": "theirs"}  # fmt: skip
    (layout.own / "owner.json").write_text(json.dumps(owner))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_first_owns_and_a_second_is_refused_naming_the_first(layout: Layout) -> None:
    lease, previous = acquire(layout)
    assert previous is None and holder(layout) == lease.owner
    with pytest.raises(ProblemError) as refused:
        acquire(layout)
    message = str(refused.value)
    assert f"is served by {socket.gethostname()} pid {os.getpid()}" in message
    assert "stop that coordinator first" in message
    lease.release()
    assert holder(layout) is None
    acquire(layout)[0].release()  # free again


def test_a_live_lease_on_another_host_is_refused(layout: Layout) -> None:
    plant(layout, host="other-host", pid=4242, age=3)
    with pytest.raises(ProblemError, match=r"served by other-host pid 4242.*heartbeat 3 s ago"):
        acquire(layout)
    with pytest.raises(ProblemError, match=r"rollback refused: .* served by other-host pid 4242"):
        ensure_not_served(layout, "rollback")


def test_a_stale_lease_is_taken_over_only_when_asked(layout: Layout) -> None:
    plant(layout, host="other-host", pid=4242, age=LEASE + 60)
    with pytest.raises(ProblemError, match=r"last heartbeat is \d+ s old.*--take-over"):
        acquire(layout)
    assert holder(layout).host == "other-host"  # refusing changed nothing
    ensure_not_served(layout, "rollback")  # a stale owner does not block a rollback
    lease, previous = acquire(layout, take_over=True)
    assert previous is not None and previous.host == "other-host"
    assert holder(layout) == lease.owner


def test_a_provably_dead_owner_on_this_host_is_taken_over_with_a_warning(layout: Layout) -> None:
    plant(layout, host=socket.gethostname(), pid=dead_pid(), age=1)  # kill -9, then restart
    lease, previous = acquire(layout)
    assert previous is not None and previous.instance == "theirs"
    assert holder(layout) == lease.owner


def test_a_renewal_after_a_take_over_refuses(layout: Layout) -> None:
    lease, _ = acquire(layout)
    lease.renew()  # still ours
    plant(layout, host="elsewhere", pid=7, age=0)  # an operator's --take-over
    with pytest.raises(ProblemError, match="ownership was taken over by elsewhere pid 7"):
        lease.renew()
    lease.release()
    assert holder(layout).host == "elsewhere"  # giving up never removes the new owner's lease


async def test_an_owner_that_was_taken_over_stops(layout: Layout) -> None:
    """The lease task ends its nursery (the whole coordinator) at its next renewal."""
    with pytest.raises(ExceptionGroup) as stopped, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(hold_ownership, layout, renew_every=0.01))
            plant(layout, host="elsewhere", pid=7, age=0)  # an operator's --take-over
            await trio.sleep_forever()  # until the lease task fails the nursery
    error = first_of(stopped.value, ProblemError)
    assert error is not None and "ownership was taken over by elsewhere pid 7" in str(error)
