"""A federation across hosts: coordinator, two selectors and the clients each on a host of its own.

The hosts are Linux network namespaces on one switch (helpers/netns.py), each
with its own address; no process shares a loopback with another. The real
``fl-coordinator serve`` and two real ``fl-selector serve`` run on their hosts,
the selectors' ids are their own addresses, and the coordinator's
GoalCountReached to each crosses from its host to the selector's. The clients
(helpers/client_host.py, the reference client's wire code uploading real
Keras-written files) and a status subscriber run on a fourth host.

Two rounds complete with both selectors. In the third, one selector's cable is
pulled after it was told to configure and before its clients upload: the round
goes on without it when the reporting window closes, as MIN_REPORTING_FRACTION
allows (its 2 of the 4 clients are missing; the other's 2 are the half required).

This test needs root and iproute2 to make the namespaces; where it cannot, it
fails and says so (CI runs as root; .ci/run installs iproute2 if it is missing).
"""

from __future__ import annotations

import functools
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from helpers.client_host import ClientHost
from helpers.netns import Host, Network, network_names
from helpers.peers import assert_arrays_close, completed, fedavg, read_floats, stage_sequence

from fl_coordinator.config import Settings
from fl_coordinator.federation.processes import Child
from fl_coordinator.storage.layout import Layout

COORDINATOR, SELECTORS, CLIENTS = "192.0.2.1", ("192.0.2.11", "192.0.2.12"), "192.0.2.100"
SELECTOR_IDS = tuple(f"{address}:50051" for address in SELECTORS)
#: Client k uploads keras_weights[k] with weight WEIGHTS[k] to selector k // 2.
WEIGHTS = (3, 5, 7, 11)
REPORTING_WINDOW = 15  # s: far longer than a selector needs to report, even on a busy machine


@pytest.fixture
def problem(settings: Settings) -> Layout:
    """A fresh copy of the problem folder, on the one file system every host sees."""
    return Layout.from_settings(settings)


def clients(keras_weights: list[Path], held: set[int] = frozenset()) -> list[dict]:
    return [
        {
            "selector": SELECTOR_IDS[k // 2],
            "update": str(keras_weights[k]),
            "weight": WEIGHTS[k],
            "hold": k in held,
        }
        for k in range(4)
    ]


def stages_of(host: ClientHost, round_no: int) -> list[str]:
    return [stage for number, stage in stage_sequence(host.statuses()) if number == round_no]


async def test_two_rounds_across_hosts_then_a_selector_is_cut_off(
    network: Network, problem: Layout, keras_weights: list[Path], tmp_path: Path
) -> None:
    coordinator = network.add("coord", COORDINATOR)
    selectors = [network.add(f"sel{i}", address) for i, address in enumerate(SELECTORS)]
    client_host = network.add("clients", CLIENTS)
    logs = tmp_path / "logs"
    logs.mkdir()
    root = str(problem.root)
    children: list[Child] = []
    host = ClientHost()

    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            serve = Child("coordinator", ["fl_coordinator", "serve"], logs / "coordinator.log", {
                "FL_ROOT_PATH": root, "HOST": "0.0.0.0", "PORT": "50050", "STATUS_PORT": "50052",
                "CHECKIN_LIMIT": "4", "MIN_REPORTING_FRACTION": "0.5",
                "REPORTING_TIMEOUT": str(REPORTING_WINDOW), "LOG_LEVEL": "INFO",
            }, prefix=coordinator.prefix)  # fmt: skip
            children.append(serve)
            await serve.start(nursery, r"selectors at \S+:50050")
            for index, selector in enumerate(selectors):
                child = Child(f"selector{index}", [
                    "fl_coordinator.federation.selector_cli", "serve",
                    "--coordinator", f"{COORDINATOR}:50050", "--root", root,
                    "--host", "0.0.0.0", "--port", "50051", "--advertise", selector.address,
                    "--waiting-time-ms", "200", "--hold-timeout", "120", "--report-timeout", "60",
                ], logs / f"selector{index}.log", prefix=selector.prefix)  # fmt: skip
                children.append(child)
                ready = await child.start(nursery, r"selector (\S+) serving")
                assert ready.group(1) == SELECTOR_IDS[index]  # its id is its own address
            run = functools.partial(host.run, client_host.prefix,
                                    f"ws://{COORDINATOR}:50052/status", tmp_path / "clients",
                                    logs / "clients.log")  # fmt: skip
            await nursery.start(run)
            try:
                await three_rounds(network, selectors[1], problem, keras_weights, host)
            finally:
                await host.close()
                for child in reversed(children):
                    await child.stop(grace=5)


async def three_rounds(
    network: Network, cut_off: Host, problem: Layout, keras_weights: list[Path], host: ClientHost
) -> None:
    for round_no in (1, 2):
        before = read_floats(problem.checkpoint)
        await host.send(round=round_no, clients=clients(keras_weights))
        done = await host.wait_for_status(completed(round_no))
        assert done["stage"] == "COMPLETED", done
        assert sorted(done["selectors"]) == sorted(done["configured"]) == list(SELECTOR_IDS)
        assert sorted(done["reported"]) == list(SELECTOR_IDS)
        assert (done["accepted"], done["unreachable"], done["rejected"]) == (4, [], {})
        assert stages_of(host, round_no) == ["SELECTION", "CONFIGURATION", "REPORTING", "COMPLETED"]
        expected = fedavg(before, list(zip(keras_weights, WEIGHTS, strict=True)))
        assert_arrays_close(read_floats(problem.checkpoint), expected)
    for selector_id in SELECTOR_IDS:  # each selector's folder is named by its address
        assert problem.agg_checkpoint(selector_id).is_file()

    # Round 3: the second selector's clients wait before uploading; its cable is cut.
    before = read_floats(problem.checkpoint)
    await host.send(round=3, clients=clients(keras_weights, held={2, 3}))
    first_in = await host.wait_for_status(
        lambda status: status["round"] == 3 and status["reported"] == [SELECTOR_IDS[0]]
    )
    assert sorted(first_in["configured"]) == list(SELECTOR_IDS)  # both were told
    network.cut(cut_off)
    await host.send(round=3, release=True)
    outcomes = [await host.wait_for_outcome(client, 3) for client in range(4)]
    # Its clients cannot reach it either; the other selector's uploaded at once.
    assert outcomes == ["uploaded", "uploaded", "upload_failed", "upload_failed"]

    done = await host.wait_for_status(completed(3))
    # 2 of the 4 accepted clients reported: exactly MIN_REPORTING_FRACTION (0.5).
    assert done["stage"] == "COMPLETED", done
    assert done["reported"] == [SELECTOR_IDS[0]]
    assert sorted(done["configured"]) == list(SELECTOR_IDS)
    assert (done["accepted"], done["unreachable"], done["rejected"]) == (4, [], {})
    assert stages_of(host, 3) == ["SELECTION", "CONFIGURATION", "REPORTING", "COMPLETED"]
    expected = fedavg(before, list(zip(keras_weights[:2], WEIGHTS[:2], strict=True)))
    assert_arrays_close(read_floats(problem.checkpoint), expected)


_KILLED_RUN = """
import os, subprocess, sys
sys.path.insert(0, sys.argv[1])
from helpers.netns import Network
network = Network()
host = network.add("h", "192.0.2.1")
network.resolve(host, {})
running = subprocess.Popen([*host.prefix, "sleep", "3600"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
print(network.switch, host.name, running.pid, flush=True)
os.kill(os.getpid(), 9)
"""


def test_the_hosts_of_a_killed_run_are_removed_with_what_runs_on_them() -> None:
    """A run killed before its cleanup (SIGKILL; SIGTERM is the same for pytest) leaves its
    namespaces and what runs on them: the next run's Network deletes both, and kills them."""
    tests = str(Path(__file__).parents[1])
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, tests], capture_output=True, text=True, timeout=60
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    switch, name, pid = killed.stdout.split()
    left = os.pidfd_open(int(pid))  # that very process, whatever pid it may be given later
    try:
        assert {switch, name} <= network_names()
        Network().remove()  # the next run
        ended, _, _ = select.select([left], [], [], 60)
        assert ended == [left]  # the program on the killed run's host was killed
        assert not {switch, name} & network_names()
        assert not (Path("/etc/netns") / name).exists()
    finally:
        signal.pidfd_send_signal(left, signal.SIGKILL)
        os.close(left)
