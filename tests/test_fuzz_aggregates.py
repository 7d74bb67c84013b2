"""Random HDF5 files as a selector's aggregate, against a running coordinator (Hypothesis).

Each example is one round: one selector reports a file built from a random
recipe (groups, soft, external and hard links, virtual datasets, external
storage, dtypes, shapes, chunking, filters, NaN, extra objects anywhere, a
weight file that may be garbage). The recipe says independently whether the
file is usable; the coordinator must average it exactly when it is, reject
it with a reason (never an internal error) when it is not, and end every
round within its window.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import trio
from helpers.peers import FakeSelector, completed, serve_and_watch
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fl_coordinator.config import Settings
from fl_coordinator.storage.contribution import MAX_WEIGHT
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.untrusted import CHUNK_MAX_BYTES, REASON_MAX_CHARS

GLOBAL: dict[str, tuple[tuple[int, ...], Any]] = {
    "layers/a/vars/0": ((3, 4), np.float32),
    "layers/a/vars/1": ((5,), np.float64),
    "layers/b/vars/0": ((2, 2, 2), np.float16),
}
WINDOW = 30.0
MARKER = 1234.5

USABLE = ["contiguous", "chunked", "shuffle", "fletcher32", "unlimited", "compact"]
UNUSABLE = ["gzip", "lzf", "scaleoffset", "soft link", "external link", "external link to a FIFO",
            "virtual", "external storage", "missing", "group", "other shape", "other dtype",
            "NaN", "Inf", "huge chunk", "odd dtype"]  # fmt: skip
EXTRAS = ["group", "integers", "strings", "dangling soft link", "external link to a FIFO",
          "hard link", "attribute"]  # fmt: skip
OTHER_DTYPES = [np.float16, np.float32, np.float64, np.int32, np.dtype(">f4"), np.complex64,
                np.bool_]  # fmt: skip
#: HDF5 types with no float values at all, declared and left unwritten.
ODD_DTYPES = [h5py.string_dtype(), h5py.ref_dtype, h5py.regionref_dtype, np.dtype("V4"),
              np.dtype([("a", "<f4"), ("b", "<i2")]), h5py.enum_dtype({"a": 0, "b": 1}, "i1"),
              h5py.vlen_dtype(np.float32)]  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    datasets: dict[str, tuple[str, np.ndarray, tuple[int, ...]]]  # name: (how, values, chunks)
    extras: list[tuple[str, str]]
    weight: str

    @property
    def usable(self) -> bool:
        return (
            self.weight.isdigit()
            and 1 <= int(self.weight) <= MAX_WEIGHT
            and all(how in USABLE for how, _, _ in self.datasets.values())
        )


#: Weight files no selector may send (a count of clients is a decimal integer >= 1).
BAD_WEIGHTS = ["0", "", "-3", "1.5", "x", "9" * 20, "7" * 200]


@st.composite
def recipes(draw: st.DrawFn) -> Recipe:
    """A usable recipe one time in two: left to chance (each part usable or not), only about
    one in five was, and a run once drew 4 in 61 (the test wants 5 of each kind)."""
    usable = draw(st.booleans())
    layouts = st.sampled_from(USABLE)
    if not usable:
        layouts = st.one_of(layouts, layouts, st.sampled_from(UNUSABLE))
    datasets = {}
    for name, (shape, dtype) in GLOBAL.items():
        how = draw(layouts)
        width = np.dtype(dtype).itemsize * 8
        values = draw(hnp.arrays(dtype, shape, elements=st.floats(-100, 100, width=width)))
        chunks = draw(st.tuples(*(st.integers(1, size) for size in shape)))
        datasets[name] = (how, values, chunks)
    extras = draw(
        st.lists(
            st.tuples(st.sampled_from(EXTRAS), st.text("xyz", min_size=1, max_size=3)), max_size=4
        )
    )
    counts = st.one_of(st.integers(1, 10**6).map(str), st.integers(1, 9).map(str))
    weight = draw(counts if usable else st.one_of(counts, st.sampled_from(BAD_WEIGHTS)))
    recipe = Recipe(datasets, extras, weight)
    if usable or not recipe.usable:
        return recipe
    # meant unusable and drawn usable all the same: spoil the weight or one dataset
    spoiled = draw(st.sampled_from([None, *GLOBAL]))
    if spoiled is None:
        return Recipe(datasets, extras, draw(st.sampled_from(BAD_WEIGHTS)))
    _, values, chunks = datasets[spoiled]
    return Recipe(
        {**datasets, spoiled: (draw(st.sampled_from(UNUSABLE)), values, chunks)}, extras, weight
    )


def _compact(file: h5py.File, name: str, values: np.ndarray) -> None:
    plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    plist.set_layout(h5py.h5d.COMPACT)
    space = h5py.h5s.create_simple(values.shape)
    kind = h5py.h5t.py_create(values.dtype)
    h5py.h5d.create(file.id, name.encode(), kind, space, dcpl=plist)
    file[name][...] = values


def _dataset(file: h5py.File, name: str, how: str, values: np.ndarray, chunks: tuple[int, ...],
             outside: Path) -> None:  # fmt: skip
    shape, dtype = values.shape, values.dtype
    unlimited = (None,) * len(shape)
    match how:
        case "contiguous":
            file.create_dataset(name, data=values)
        case "chunked":
            file.create_dataset(name, data=values, chunks=chunks)
        case "shuffle" | "fletcher32":
            file.create_dataset(name, data=values, chunks=chunks, **{how: True})
        case "unlimited":
            file.create_dataset(name, data=values, chunks=chunks, maxshape=unlimited)
        case "compact":
            _compact(file, name, values)
        case "gzip" | "lzf":
            file.create_dataset(name, data=values, chunks=chunks, compression=how)
        case "scaleoffset":  # HDF5 has it for 32 and 64-bit floats only; szip is absent
            lossy = {"scaleoffset": 2} if dtype.itemsize >= 4 else {"compression": "gzip"}
            file.create_dataset(name, data=values, chunks=chunks, **lossy)
        case "soft link":
            file.create_dataset(f"spare/{name}", data=values)
            file[name] = h5py.SoftLink(f"/spare/{name}")
        case "external link":
            file[name] = h5py.ExternalLink(str(outside / "marker.h5"), name)
        case "external link to a FIFO":
            file[name] = h5py.ExternalLink(str(outside / "pipe"), "/x")
        case "virtual":
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            layout[...] = h5py.VirtualSource(str(outside / "marker.h5"), name, shape=shape)
            file.create_virtual_dataset(name, layout)
        case "external storage":
            file.create_dataset(name, shape=shape, dtype=dtype,
                                external=[(str(outside / "raw"), 0, values.nbytes)])  # fmt: skip
        case "missing":
            pass
        case "group":
            file.create_group(name)
        case "other shape":
            file.create_dataset(name, data=np.resize(values, tuple(n + 1 for n in shape)))
        case "other dtype":
            # One the weight cannot be stored as: a wider float is accepted (float32
            # for a float16 weight is what the reference client uploads).
            other = next(d for d in OTHER_DTYPES if not np.can_cast(dtype, d, "safe"))
            file.create_dataset(name, data=values.astype(other))
        case "NaN" | "Inf":
            spoiled = values.copy()
            spoiled.flat[-1] = np.nan if how == "NaN" else -np.inf
            file.create_dataset(name, data=spoiled)
        case "odd dtype":
            odd = ODD_DTYPES[int(abs(values.flat[0])) % len(ODD_DTYPES)]
            file.create_dataset(name, shape=shape, dtype=odd)
        case "huge chunk":  # declared, never written: the file stays small
            rows = CHUNK_MAX_BYTES // (dtype.itemsize * int(np.prod(shape[1:]))) + 1
            file.create_dataset(name, shape=shape, dtype=dtype, maxshape=unlimited,
                                chunks=(rows, *shape[1:]))  # fmt: skip


def _extra(file: h5py.File, kind: str, label: str, outside: Path) -> None:
    name = f"extra/{kind.replace(' ', '_')}_{label}"
    if name in file:
        return
    match kind:
        case "group":
            file.create_group(f"{name}/inner")
        case "integers":
            file.create_dataset(name, data=np.arange(5))
        case "strings":
            file.create_dataset(name, data=[b"a", b"bc"])
        case "dangling soft link":
            file.require_group("extra")
            file[name] = h5py.SoftLink("/nowhere/at/all")
        case "external link to a FIFO":
            file.require_group("extra")
            file[name] = h5py.ExternalLink(str(outside / "pipe"), "/x")
        case "hard link":
            first = next(iter(GLOBAL))
            if isinstance(file.get(first, getlink=True), h5py.HardLink):
                file.require_group("extra")
                file[name] = file[first]
        case "attribute":
            file.attrs[label] = np.frombuffer(os.urandom(16), np.uint8)


#: Every weight as it is, but the float16 one in a dtype it cannot be stored as.
OTHER_DTYPE_OF_FLOAT16 = Recipe(
    datasets={
        name: ("other dtype" if dtype == np.float16 else "contiguous", np.zeros(shape, dtype), ())
        for name, (shape, dtype) in GLOBAL.items()
    },
    extras=[],
    weight="1",
)


def write_recipe(recipe: Recipe, layout: Layout, selector: str, outside: Path) -> None:
    with h5py.File(layout.agg_checkpoint(selector), "w") as file:
        for name, (how, values, chunks) in recipe.datasets.items():
            file.require_group(name.rsplit("/", 1)[0])
            _dataset(file, name, how, values, chunks, outside)
        for kind, label in recipe.extras:
            _extra(file, kind, label, outside)
    layout.agg_weight(selector).write_text(recipe.weight)


def floats(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as file:
        return {name: file[name][()] for name in GLOBAL}


def prepare(layout: Layout, outside: Path) -> None:
    """A small global checkpoint of three dtypes, and the files outside the root."""
    with h5py.File(layout.checkpoint, "w") as file:
        for name, (shape, dtype) in GLOBAL.items():
            file.create_dataset(name, data=np.zeros(shape, dtype))
    outside.mkdir()
    with h5py.File(outside / "marker.h5", "w") as file:
        for name, (shape, dtype) in GLOBAL.items():
            file.create_dataset(name, data=np.full(shape, MARKER, dtype))
    (outside / "raw").write_bytes(np.full(64, MARKER).tobytes())
    os.mkfifo(outside / "pipe")


async def test_random_aggregates_are_averaged_exactly_or_rejected_with_a_reason(
    settings: Settings, layout: Layout, nursery: trio.Nursery, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    prepare(layout, outside)
    _, watcher, client = await serve_and_watch(
        nursery, settings.replace(checkin_limit=1, min_reporting_fraction=1.0,
                                  reporting_timeout=WINDOW),
    )  # fmt: skip
    selector = await FakeSelector().start(nursery)
    layout.selector_dir(selector.id).mkdir()
    state = {"round": 1, "averaged": 0, "rejected": 0}

    async def play(recipe: Recipe) -> None:
        number = state["round"]
        before = floats(layout.checkpoint)
        try:
            assert await client.check_in(selector.id) is True
            await selector.told.receive()
            write_recipe(recipe, layout, selector.id, outside)
        finally:  # whatever failed here, the round ends before the next example
            await client.report(selector.id)
            with trio.fail_after(WINDOW):  # never a hang
                done = await watcher.wait_for(completed(number))
            state["round"] = number + 1
        after = floats(layout.checkpoint)
        if recipe.usable:
            assert (done["stage"], done["rejected"]) == ("COMPLETED", {}), done
            weight = int(recipe.weight)
            for name, (_, values, _) in recipe.datasets.items():
                expected = (values.astype(np.float64) / weight + before[name]).astype(values.dtype)
                np.testing.assert_array_equal(after[name], expected, err_msg=name)
            state["averaged"] += 1
        else:
            assert done["stage"] == "FAILED", done
            why = done["rejected"][selector.id]
            assert why.startswith(str(layout.selector_dir(selector.id))), why
            assert "internal error" not in why and len(why) <= REASON_MAX_CHARS
            for name in GLOBAL:
                np.testing.assert_array_equal(after[name], before[name], err_msg=name)
            state["rejected"] += 1

    @hypothesis_settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(recipes())
    @example(OTHER_DTYPE_OF_FLOAT16)  # a float16 weight stored as float32 was "unusable"
    def rounds_of(recipe: Recipe) -> None:
        trio.from_thread.run(play, recipe)  # fmt: skip

    await trio.to_thread.run_sync(rounds_of)
    assert state["averaged"] >= 5 and state["rejected"] >= 5, state  # both paths were taken
