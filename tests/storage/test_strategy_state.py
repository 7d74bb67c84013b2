"""The optimizer state a round starts from, changed on disk since it was written: truncated,
emptied, rewritten with other shapes or dtypes, or compressed in chunks (an older layout).
Each either averages to the same bits or fails the round with an error naming the state file;
never a wrong result, never blamed on the global checkpoint."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from fl_coordinator.core.strategy import ServerOptimizer, Strategy
from fl_coordinator.errors import AggregationError, CheckpointError
from fl_coordinator.storage.aggregation import Contribution, ServerUpdate, aggregate
from fl_coordinator.storage.strategy_state import StateUpdate
from fl_coordinator.storage.untrusted import UntrustedFile

OPTIMIZER = ServerOptimizer.of("fedadam")  # m and v
SHAPES = [(300, 7 + index) for index in range(3)]


def _weights(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as file:
        for index, shape in enumerate(SHAPES):
            file[f"layers/d{index}/vars/0"] = rng.normal(size=shape).astype(np.float32)
    return path


def _rewritten(path: Path, change: Callable[[h5py.File, str, np.ndarray], None]) -> None:
    """``path`` written again, each dataset through ``change``, the attributes kept."""
    with h5py.File(path, "r") as file:
        arrays: dict[str, np.ndarray] = {}
        file.visititems(
            lambda name, item: (
                arrays.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None
            )
        )
        attributes = dict(file.attrs)
    with h5py.File(path, "w") as file:
        for name, values in arrays.items():
            change(file, name, values)
        file.attrs.update(attributes)


def _truncated(path: Path) -> None:
    os.truncate(path, path.stat().st_size * 3 // 5)


def _emptied(path: Path) -> None:
    os.truncate(path, 0)


def _wider(path: Path) -> None:  # read as rows of the weight's length: wrong values
    _rewritten(
        path, lambda file, name, values: file.create_dataset(name, data=np.hstack([values] * 2))
    )


def _transposed(path: Path) -> None:  # the same number of values
    _rewritten(path, lambda file, name, values: file.create_dataset(name, data=values.T))


def _float64(path: Path) -> None:
    _rewritten(
        path, lambda file, name, values: file.create_dataset(name, data=values.astype(np.float64))
    )


def _without_v(path: Path) -> None:
    with h5py.File(path, "a") as file:
        del file["v"]


def _compressed(path: Path) -> None:
    _rewritten(
        path,
        lambda file, name, values: file.create_dataset(
            name, data=values, chunks=(30, values.shape[1]), compression="gzip"
        ),
    )


def _compressed_then_garbled(path: Path) -> None:
    """A chunk's compressed bytes overwritten: the file opens, that chunk cannot be read."""
    _compressed(path)
    with h5py.File(path, "r") as file:
        chunk = file["v/layers/d2/vars/0"].id.get_chunk_info(3)
    with open(path, "r+b") as file:
        file.seek(chunk.byte_offset)
        file.write(b"\xff" * chunk.size)


def _round(folder: Path, source: Path | None, number: int) -> Path:
    """Round ``number`` of FedAdam over three inputs, from the state ``source``; its state."""
    checkpoint = folder / "fl_checkpoint"
    parts = [
        Contribution(f"s{i}", UntrustedFile.at(_weights(folder / f"s{i}", i + 1)), i + 2)
        for i in range(3)
    ]
    dest = folder / f"state{number}.h5"
    update = ServerUpdate(Strategy(OPTIMIZER), StateUpdate(OPTIMIZER, source, dest, number))
    aggregate(checkpoint, parts, folder / "tmp", None, update)
    return dest


def _two_rounds(folder: Path, change: Callable[[Path], None] | None) -> bytes:
    """The global checkpoint's bytes after two rounds, the first round's state changed
    by ``change`` before the second."""
    _weights(folder / "fl_checkpoint", 0)
    state = _round(folder, None, 1)
    if change is not None:
        change(state)
    _round(folder, state, 2)
    with h5py.File(folder / "fl_checkpoint", "r") as file:
        return b"".join(file[f"layers/d{i}/vars/0"][()].tobytes() for i in range(len(SHAPES)))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_truncated, "not a readable optimizer state (Unable to synchronously open file "
                     "(truncated file: eof = "),
        (_emptied, "not a readable optimizer state (Unable to synchronously open file "
                   "(file signature not found))"),
        (_wider, "no m of shape (300, 7) (float32) for 'layers/d0/vars/0' (found (300, 14) "
                 "(float32)): not the state of this model"),
        (_transposed, "no m of shape (300, 7) (float32) for 'layers/d0/vars/0' (found (7, 300) "
                      "(float32)): not the state of this model"),
        (_float64, "no m of shape (300, 7) (float32) for 'layers/d0/vars/0' (found (300, 7) "
                   "(float64)): not the state of this model"),
        (_without_v, "no v of shape (300, 7) (float32) for 'layers/d0/vars/0' (found none): "
                     "not the state of this model"),
        (_compressed_then_garbled, "the optimizer's v of 'layers/d2/vars/0' cannot be read ("),
    ],
)  # fmt: skip
def test_a_state_changed_on_disk_fails_the_round_naming_it(
    tmp_path: Path, change: Callable[[Path], None], reason: str
) -> None:
    """Before: a wider state averaged silently into wrong values; a truncated one failed as
    'cannot write the new global checkpoint'; a transposed or float64 one was read anyway."""
    folder = tmp_path / "changed"
    _weights(folder / "fl_checkpoint", 0)
    state = _round(folder, None, 1)
    change(state)
    before = (folder / "fl_checkpoint").read_bytes()
    with pytest.raises(AggregationError) as failed:
        _round(folder, state, 2)
    assert not isinstance(failed.value, CheckpointError)  # not the global checkpoint's fault
    message = str(failed.value)
    assert message.startswith(f"{state}: {reason}"), message
    assert message.endswith(
        "; move it away (the optimizer of that round's checkpoint then starts again from its "
        "initial state)"
    )
    assert (folder / "fl_checkpoint").read_bytes() == before  # untouched
    assert not (folder / "state2.h5").exists()


def test_moments_compressed_in_chunks_give_the_same_bits(tmp_path: Path) -> None:
    """An older layout (chunked, gzip) is read through HDF5: the same average, bit for bit."""
    assert _two_rounds(tmp_path / "plain", None) == _two_rounds(tmp_path / "chunked", _compressed)
