"""The committed generated code matches protos/ (rebuild with scripts/gen-protos)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO

from fl_coordinator._proto import fl_intra_pb2, fl_round_pb2, fl_status_pb2

REPO = REPO
COMMITTED = REPO / "src" / "fl_coordinator" / "_proto"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [str(REPO / "scripts" / "gen-protos"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    fresh = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    committed = {p.name: p.read_bytes() for p in COMMITTED.iterdir() if p.is_file()}
    stale = sorted(name for name in fresh if committed.get(name) != fresh[name])
    assert stale == [], f"run scripts/gen-protos: {stale} differ from protos/"
    assert sorted(fresh) == sorted(committed)


def test_wire_names_and_field_numbers() -> None:
    """The parts of PROTOCOL.md an existing Go peer depends on."""
    intra = fl_intra_pb2.DESCRIPTOR
    assert intra.package == ""
    assert [m.full_name for m in intra.services_by_name["FlIntra"].methods] == [
        "FlIntra.ClientCountUpdate",
        "FlIntra.SelectorAggregationComplete",
    ]
    assert intra.services_by_name["FLGoalCountBroadcast"].methods[0].name == "GoalCountReached"
    fields = fl_intra_pb2.ClientCount.DESCRIPTOR.fields_by_name
    assert (fields["count"].number, fields["id"].number) == (1, 2)
    data = fl_round_pb2.FlData.DESCRIPTOR.fields_by_name
    assert [data[n].number for n in ("chunk", "intVal", "type", "isLastChunk", "filePath")] == [
        1, 2, 3, 4, 5,
    ]  # fmt: skip
    assert (fl_round_pb2.FL_FILES, fl_round_pb2.FL_INT) == (0, 1)
    assert [fl_status_pb2.Stages.Name(i) for i in range(4)] == [
        "SELECTION", "CONFIGURATION", "REPORTING", "COMPLETED",
    ]  # fmt: skip
    # A ClientCount from a Go selector, byte for byte: count=3, id="h:1".
    assert fl_intra_pb2.ClientCount(count=3, id="h:1").SerializeToString() == b"\x08\x03\x12\x03h:1"
