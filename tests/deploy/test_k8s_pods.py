"""The README's Kubernetes walkthrough, its pods run as processes (there is no cluster here).

helpers/cluster.py does with the rendered manifests what a cluster would:
each pod of ``scripts/k8s/federation`` is a host of its own named and resolved
as in the cluster (``fl-coordinator``, ``fl-selector-0.fl-selector``), running
its init containers, then its container's command and args with the
environment the ConfigMap, the Secret and the fieldRefs give it, as the
manifest's user, with the claim mounted at ``/data``. The README's ``kubectl``
lines are carried out as written: the Secret (``openssl rand -hex 24``), the
deploy, ``rollout status``, ``exec ... fl-coordinator watch``, and the whole
"Roll back" sequence (list, scale to 0, wait, the rollback Job, scale to 1).
Clients (``fl-client``) connect to ``fl-selector-entry:50051``, each client's
host resolving it to one selector (``ClientIP`` affinity).

Changed, and why: the deploy applies ``scripts/k8s/federation`` in the
namespace ``fl-digits`` (the README's "or:" form: 2 selectors, CHECKIN_LIMIT=2),
not the ``digits`` overlay (3 selectors, 6 clients a round), to keep the run
short; ``scripts/k8s/digits`` is rendered and validated by test_k8s.py.

What this proves: the manifests' commands, arguments, environment, users,
mounts and DNS names make a federation that completes rounds, and their
rollback Job restores a round that the restarted coordinator serves. What only
a real cluster can: images, probes, scheduling, Services' load-balancing, the
storage class (ReadWriteMany), the read-only root file system, resource limits
and Pod Security admission (see README, "Kubernetes").
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from helpers.cluster import Cluster
from helpers.netns import Network
from helpers.readme import block, commands, replaced
from helpers.walkthrough import WATCHED, Operator, Program, Shell, mount_point, watched

from fl_coordinator.federation.data import split_digits, write_shards

NAMESPACE = "fl-digits"
FL_UID = 10001
LIMIT = 300  # s, for the whole walkthrough: far more than it takes
ROUND = ["SELECTION", "CONFIGURATION", "REPORTING", "COMPLETED"]
SELECTORS = ("fl-selector-0", "fl-selector-1")
#: "Clients (fl-client ...) connect to fl-selector-entry:50051"; the data as in "The three roles".
CLIENT = "fl-client --selector fl-selector-entry:50051 --data my_shard.npz --rounds 1"


@pytest.fixture
def data_mount() -> Iterator[Path]:
    with mount_point(Path("/data")) as path:
        yield path


def lines_of(heading_text: str) -> list[str]:
    return [line for part in commands(block("Kubernetes", heading_text)) for line in part.lines]


async def clients_round(
    cluster: Cluster, operator: Operator, homes: list[Path], round_no: int
) -> None:
    """One client per selector takes part in one round, keeping what it downloaded."""
    programs: list[Program] = []
    for index, (home, entry) in enumerate(zip(homes, SELECTORS, strict=True)):
        host = cluster.client(f"client{index}", entry)
        line = CLIENT + f" --work-dir round{round_no}"
        programs.append(
            await operator.start(f"client{index}-round{round_no}", Shell(host, home), line)
        )
    for program in programs:
        assert await program.wait() == 0, program.tail()


def checkpoint(volume: Path) -> bytes:
    return (volume / "initFiles" / "fl_checkpoint").read_bytes()


async def test_the_federations_pods_complete_rounds_and_roll_back(
    network: Network, data_mount: Path, tmp_path: Path
) -> None:
    deploy = lines_of("create secret generic")
    (apply,) = [line for line in deploy if " apply -k " in line]
    deploy[deploy.index(apply)] = replaced(
        apply,
        (
            "kubectl apply -k scripts/k8s/digits",
            "kubectl -n fl-digits apply -k scripts/k8s/federation",
        ),
    )
    (watch_line, logs_line) = lines_of("fl-coordinator watch")
    roll_back = lines_of("fl-coordinator rollback")
    homes = []
    for index, shard in enumerate(write_shards(split_digits(2), tmp_path / "data")):
        homes.append(tmp_path / f"client{index}")
        homes[-1].mkdir()
        shutil.copy(shard, homes[-1] / "my_shard.npz")

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            operator = Operator(nursery, tmp_path / "logs")
            cluster = Cluster(network, operator, tmp_path / "cluster", NAMESPACE)
            volume = cluster.volume
            try:
                for line in deploy:
                    await cluster.kubectl(line)
                owner = json.loads((volume / ".coordinator" / "owner.json").read_text())
                first = await cluster.kubectl(logs_line)  # JSON lines, with round and selector
                watch = await cluster.kubectl(watch_line)
                await watch.line(WATCHED)
                for round_no in (1, 2):
                    await clients_round(cluster, operator, homes, round_no)
                    await watch.line(rf"round {round_no}\s+COMPLETED")
                after_two = checkpoint(volume)
                listing = await cluster.kubectl(roll_back[0])
                assert await listing.wait() == 0, listing.tail()
                watch.stop()  # the exec session ends with its pod
                for line in roll_back[1:]:
                    await cluster.kubectl(line)
                restored = checkpoint(volume)
                restarted = cluster.running["fl-coordinator-0"]
                await cluster.rollout_status("fl-coordinator")
                watch_again = await cluster.kubectl(watch_line)
                await watch_again.line(WATCHED)
                await clients_round(cluster, operator, homes, 3)
                await watch_again.line(r"round 3\s+COMPLETED")
            finally:
                await operator.stop_all()

    # The volume was handed to the pods' user; the coordinator's lease names its pod.
    assert volume.stat().st_uid == FL_UID
    assert (owner["host"], owner["pid"] > 0) == ("fl-coordinator-0", True)
    # Both rounds completed, each with both selectors (their ids: their pods' DNS names).
    for round_no in (1, 2):
        assert [stage for number, stage in watched(watch) if number == round_no] == ROUND
    for selector in SELECTORS:
        assert (volume / f"{selector}.fl-selector:50051" / "fl_agg_checkpoint").is_file()
    assert first is not None
    logs = [json.loads(line) for line in first.lines if line.startswith("{")]
    told = [entry for entry in logs if "told" in entry["event"]]
    assert {(entry["round"], entry["selector"]) for entry in told} >= {
        (1, "fl-selector-0.fl-selector:50051"),
        (1, "fl-selector-1.fl-selector:50051"),
    }
    # The rollback: the kept rounds were listed, round 1's checkpoint was restored
    # (the Job's --round 1), and the restarted coordinator served it to round 3's clients.
    assert [line.split(":")[0].strip() for line in listing.lines if line.startswith("  ")] == [
        "0",
        "1",
        "2",
    ]
    kept_one = (volume / ".coordinator" / "history" / "round-000001").read_bytes()
    assert restored == kept_one != after_two
    for home in homes:
        assert (home / "round3" / "files" / "fl_checkpoint").read_bytes() == kept_one
    said = [json.loads(line)["event"] for line in restarted.lines if "restored by" in line]
    assert said == [
        "round 3 starts from the checkpoint of round 1, restored by rollback "
        "(the newest kept round is 2)"
    ]
    assert [stage for number, stage in watched(watch_again) if number == 3] == ROUND
