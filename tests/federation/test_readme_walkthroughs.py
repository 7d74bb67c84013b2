"""The README's walkthroughs, run as written: each role on a host of its own.

The commands are taken from README.md itself (helpers/readme.py), so the README
cannot drift from what is tested, and each runs under ``sh`` (dash) on a host
of its own (a network namespace, helpers/netns.py) whose ``/etc/hosts`` names
the others (``coord.example``, ``sel1.example``), with the README's paths
(``/shared/digits``, ``/run/secrets``) mounted in that host's own mount
namespace (helpers/walkthrough.py). What is changed, and why:

* "The three roles": the lines for "each selector" and "each client" are run
  for a second selector with ``sel1`` replaced by ``sel2`` (what "each" means);
  the clients take part in 2 rounds, not 10 (``--rounds 10`` -> ``--rounds 2``),
  to keep the run short. The selectors tell a refused client to come back in 2 s
  (``--waiting-time-ms 2000`` added), not the protocol's 20 s: a client done with
  round 1 checks in before the round's last upload, is refused, and would otherwise
  idle 20 s. The six clients (``CHECKIN_LIMIT=6``) use the demo's
  shards of the digits data (``numpy.savez``), one per client.
* "Security": the ``openssl`` lines that make ``coord.pem`` are run again with
  ``coord`` replaced by ``sel1``, as the README's comment says ("the same for
  each selector"); the clients are the three-roles client line with
  ``--selector-ca ca.pem`` added, as "The three roles" says to do with TLS.

Both follow the rounds with ``fl-coordinator watch --plain`` on an operator's
host, and check the problem folder afterwards. They need root and iproute2
(they fail, never skip, where those are missing: CI runs as root).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trio
from helpers.netns import Host, Network
from helpers.peers import read_floats
from helpers.readme import BlockNotFound, block, commands, part, replaced
from helpers.walkthrough import WATCHED, Operator, Shell, mount_point, stage_for, watched

from fl_coordinator.config import default_settings
from fl_coordinator.federation.data import split_digits, write_shards
from fl_coordinator.storage.journal import history
from fl_coordinator.storage.layout import Layout

SERVING = r"selectors at \S+:50050 \(FlIntra\), status stream at"
SELECTOR_READY = r"selector (\S+) serving"
#: Each round's stages as the status stream shows them, in order.
ROUND = ["SELECTION", "CONFIGURATION", "REPORTING", "COMPLETED"]
LIMIT = 240  # s, for a whole walkthrough: far more than they take (about 60 s and 25 s)


@pytest.fixture
def shared() -> Iterator[Path]:
    with mount_point(Path("/shared")) as path:
        yield path


def hosts(network: Network, names: dict[str, str]) -> dict[str, Host]:
    """One host per name (its address), each resolving every name."""
    made = {name: network.add(name.split(".")[0], address) for name, address in names.items()}
    for host in made.values():
        network.resolve(host, names)
    return made


def shards(folder: Path, clients: int) -> list[Path]:
    """The demo's data: one ``my_shard.npz`` per client, each in a folder of its own."""
    paths = []
    for index, shard in enumerate(write_shards(split_digits(clients), folder / "data")):
        home = folder / f"client{index}"
        home.mkdir()
        paths.append(shutil.copy(shard, home / "my_shard.npz"))
    return [Path(path) for path in paths]


def journal(root: Path) -> dict:
    return json.loads((root / ".coordinator" / "journal.json").read_text())


def kept_rounds(root: Path) -> list[int]:
    """The rounds whose checkpoints ``rollback`` could restore."""
    return sorted(history(Layout.from_settings(default_settings().replace(fl_root_path=str(root)))))


def changed(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> list[str]:
    assert before.keys() == after.keys()
    for name, values in after.items():
        assert np.isfinite(values).all(), name
    return [name for name in before if not np.array_equal(before[name], after[name])]


def round_lines(watch_lines: list[str], round_no: int, stage: str) -> list[tuple[str, ...]]:
    found = []
    for line in watch_lines:
        match = re.search(WATCHED, line)
        if match and (int(match[1]), match[2]) == (round_no, stage):
            found.append(match.groups())
    return found


def test_a_block_the_readme_no_longer_holds_fails_loudly() -> None:
    with pytest.raises(BlockNotFound, match="no section headed 'Nowhere'"):
        block("Nowhere", "fl-selector serve")
    with pytest.raises(BlockNotFound, match="0 ```sh blocks contain 'fl-coordinator teleport'"):
        block("Security", "fl-coordinator teleport")
    with pytest.raises(BlockNotFound, match="'--rounds 10' is no longer in the README's line"):
        replaced("fl-client --rounds 3", ("--rounds 10", "--rounds 2"))


# -- "The three roles, on separate machines" --------------------------------------------------


async def test_three_roles_on_separate_machines(
    network: Network, shared: Path, tmp_path: Path
) -> None:
    parts = commands(block("The three roles, on separate machines", "fl-selector serve"))
    init, serve = part(parts, "coordinator")
    (selector,) = part(parts, "each selector")
    selector += " --waiting-time-ms 2000"
    (client,) = part(parts, "each client")
    client = replaced(client, ("--rounds 10", "--rounds 2"))
    names = {"coord.example": "192.0.2.1", "sel1.example": "192.0.2.11",
             "sel2.example": "192.0.2.12", "operator.example": "192.0.2.2"}  # fmt: skip
    names |= {f"client{k}.example": f"192.0.2.{100 + k}" for k in range(6)}
    machines = hosts(network, names)
    storage = tmp_path / "shared"  # the file server's folder, mounted at /shared everywhere
    storage.mkdir()
    homes = [path.parent for path in shards(tmp_path, 6)]

    def on(name: str, cwd: Path | None = None) -> Shell:
        home = cwd or tmp_path / name
        home.mkdir(exist_ok=True)
        return Shell(machines[f"{name}.example"], home, binds={"/shared": storage})

    root = storage / "digits"
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            operator = Operator(nursery, tmp_path / "logs")
            try:
                await operator.run("init", on("coord"), init)
                before = read_floats(root / "initFiles" / "fl_checkpoint")
                await operator.start("coordinator", on("coord"), serve, SERVING)
                watch = await operator.start(
                    "watch",
                    on("operator"),
                    "fl-coordinator watch ws://coord.example:50052/status --plain",
                    WATCHED,  # following the rounds before any client comes
                )
                for name in ("sel1", "sel2"):
                    line = replaced(selector, ("sel1", name)) if name != "sel1" else selector
                    started = await operator.start(name, on(name), line)
                    ready = await started.line(SELECTOR_READY)
                    assert ready[1] == f"{name}.example:50051"  # its id: its own address
                clients = []
                for k, home in enumerate(homes):
                    line = client if k < 3 else replaced(client, ("sel1", "sel2"))
                    clients.append(await operator.start(f"client{k}", on(f"client{k}", home), line))
                for program in clients:
                    assert await program.wait() == 0, program.tail()
                    await program.line(r"round done \(2/2\)")
                await watch.line(r"round 2\s+COMPLETED")
                assert await operator.stop("coordinator") == 0
            finally:
                await operator.stop_all()

    assert [stage for number, stage in watched(watch) if number == 1] == ROUND
    assert [stage for number, stage in watched(watch) if number == 2] == ROUND
    for round_no in (1, 2):
        (done, *_) = round_lines(watch.lines, round_no, "COMPLETED")
        # clients 6/6, 2 selectors, both configured and reported
        assert done[2:] == ("6", "6", "2", "2", "2"), done
    assert kept_rounds(root) == [0, 1, 2]  # the initial checkpoint and both rounds'
    assert (journal(root)["round"], journal(root)["stage"]) == (3, "SELECTION")  # opened next
    for name in ("sel1", "sel2"):
        weight = int((root / f"{name}.example:50051" / "fl_agg_checkpoint_weight").read_text())
        assert weight > 0
    after = read_floats(root / "initFiles" / "fl_checkpoint")
    assert len(changed(before, after)) == len(before)  # every weight array was trained


# -- "Security": the TLS walkthrough ------------------------------------------------------------


async def make_certificates(operator: Operator, shell: Shell) -> None:
    """The README's openssl lines for the CA and the coordinator, then, as its comment says,
    "the same for each selector": the coordinator's lines with ``coord`` -> ``sel1``."""
    (lines,) = commands(block("Security", "openssl req -x509"))
    assert lines.title == ""  # the CA's line, then the coordinator's
    for index, line in enumerate(lines.lines):
        await operator.run(f"openssl-{index}", shell, line)
    for index, line in enumerate(lines.lines[1:]):
        await operator.run(f"openssl-sel1-{index}", shell, replaced(line, ("coord", "sel1")))


async def test_tls_walkthrough(network: Network, tmp_path: Path) -> None:
    parts = commands(block("Security", "fl-coordinator serve"))
    (serve,) = part(parts, "coordinator: TLS")
    (selector,) = part(parts, "reference selector")
    three_roles = commands(block("The three roles, on separate machines", "fl-selector serve"))
    (client,) = part(three_roles, "each client")
    # "With TLS on the selector, give the client the selector's CA with --selector-ca ca.pem"
    client = replaced(client, ("--rounds 10", "--rounds 1")) + " --selector-ca ca.pem"
    plaintext_client = replaced(client, (" --selector-ca ca.pem", ""))
    health = "fl-coordinator health --address coord.example:50050"
    names = {"coord.example": "192.0.2.1", "sel1.example": "192.0.2.11",
             "operator.example": "192.0.2.2", "client0.example": "192.0.2.100",
             "client1.example": "192.0.2.101"}  # fmt: skip
    machines = hosts(network, names)
    work = tmp_path / "work"  # where the certificates are made, and ./data: FL_ROOT_PATH
    secrets = tmp_path / "secrets"  # mounted at /run/secrets where the README reads it
    for folder in (work, secrets):
        folder.mkdir()
    homes = [path.parent for path in shards(tmp_path, 2)]

    def on(name: str, cwd: Path = work) -> Shell:
        return Shell(machines[f"{name}.example"], cwd, binds={"/run/secrets": secrets},
                     empty=("/run",))  # fmt: skip

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            operator = Operator(nursery, tmp_path / "logs")
            try:
                await make_certificates(operator, on("operator"))
                for token in ("fl-token", "status-token"):  # "make them with openssl rand -hex 24"
                    await operator.run(
                        token, on("operator", secrets), f"openssl rand -hex 24 > {token}"
                    )
                for home in homes:  # the CA goes to the clients' machines
                    shutil.copy(work / "ca.pem", home)
                await operator.run("init", on("coord"), "fl-coordinator init")  # ./data
                before = read_floats(work / "data" / "initFiles" / "fl_checkpoint")
                await operator.start("coordinator", on("coord"), serve, SERVING)
                sel1 = await operator.start("sel1", on("sel1"), selector)
                assert (await sel1.line(SELECTOR_READY))[1] == "sel1.example:50051"
                watch = await operator.start("watch", on("operator"),
                    "fl-coordinator watch wss://coord.example:50052/status --ca ca.pem "
                    '--token "$(cat /run/secrets/status-token)" --plain', WATCHED)  # fmt: skip
                clients = [await operator.start(f"client{k}", on(f"client{k}", home), client)
                           for k, home in enumerate(homes)]  # fmt: skip
                for program in clients:
                    assert await program.wait() == 0, program.tail()
                    await program.line(r"round done \(1/1\)")
                await watch.line(r"round 1\s+COMPLETED")
                # Plaintext is refused, by the selector (a client without --selector-ca)
                # and by the coordinator (its health service too: the port is TLS only).
                plain = await operator.start(
                    "plain-client", on("client0", homes[0]), plaintext_client
                )
                plain_health = await operator.start("plain-health", on("operator"), health)
                plain_statuses = (await plain.wait(), await plain_health.wait())
                mutual = f"{health} --ca ca.pem --cert sel1.pem --key sel1.key"
                await operator.run("health", on("operator"), mutual)
                assert await operator.stop("coordinator") == 0
            finally:
                await operator.stop_all()

    assert [stage for number, stage in watched(watch) if number == 1] == ROUND
    (done, *_) = round_lines(watch.lines, 1, "COMPLETED")
    assert done[2:] == ("2", "2", "1", "1", "1"), done  # clients 2/2 (CHECKIN_LIMIT's default)
    assert kept_rounds(work / "data") == [0, 1]
    after = read_floats(work / "data" / "initFiles" / "fl_checkpoint")
    assert len(changed(before, after)) == len(before)
    # The selector took only TLS: the plaintext client's handshake failed there, and the
    # client said what to do (exit status 1: it cannot tell this from a selector going away).
    assert plain_statuses[0] == 1, plain.tail()
    assert plain.lines[-1] == (
        "fl-client: the selector at sel1.example:50051 closed the connection before answering: "
        "if it serves TLS, give the client --selector-ca"
    )
    refused = r"TLS handshake with 192\.0\.2\.100:\d+ failed: WRONG_VERSION_NUMBER"
    assert any(re.search(refused, line) for line in sel1.lines)
    assert plain_statuses[1] == 1, plain_health.tail()
    assert "UNAVAILABLE" in plain_health.lines[-1]


def test_mounts_are_staged_apart_from_every_folder_they_touch() -> None:
    """A checkout (or a test's folder) under /mnt, as on runners with TMPDIR=/mnt/tmp, was
    hidden by the stage's own tmpfs at /mnt before it could be bound."""
    assert stage_for([Path("/tmp/checkout"), Path("/shared")]) == "/mnt"
    assert stage_for([Path("/mnt/tmp/checkout"), Path("/shared")]) == "/media"
    assert stage_for([Path("/mnt/a"), Path("/media"), Path("/srv/b/c")]) == "/opt"
    with pytest.raises(RuntimeError, match="no folder among"):
        stage_for([Path("/")])  # covers every candidate
