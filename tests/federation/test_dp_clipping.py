"""Differential privacy at the edges of the hierarchy: the reference client clips its update
and uploads it with weight 1; the real reference selector refuses, before summing, an upload
over the clip norm or with another weight, and sums the clipped one."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import trio
from helpers.peers import completed, read_floats, watch
from helpers.processes import Served, environment

from fl_coordinator.app import serve
from fl_coordinator.config import Settings
from fl_coordinator.federation.client import SelectorCalls
from fl_coordinator.federation.training import clip_update, write_update
from fl_coordinator.storage.contribution import update_norm
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.untrusted import UntrustedFile
from fl_coordinator.storage.weights import read_plan

SELECTOR = [sys.executable, "-m", "fl_coordinator.federation.selector_cli", "serve"]
C = 0.5


def norm(path: Path) -> float:
    return math.sqrt(
        sum(float(np.sum(a.astype(np.float64) ** 2)) for a in read_floats(path).values())
    )


def update(layout: Layout, trained: Path, dest: Path) -> Path:
    """``trained - w``, in the checkpoint's layout, with weight 1 (as a client under DP)."""
    write_update(layout.checkpoint, trained, 1, dest)
    return dest


def test_the_client_clips_its_update_to_the_norm_and_keeps_its_direction(
    layout: Layout, keras_weights: list[Path], tmp_path: Path
) -> None:
    path = update(layout, keras_weights[1], tmp_path / "update")
    original, measured = read_floats(path), norm(path)
    before = clip_update(path, C)
    assert before == pytest.approx(measured, rel=1e-9) and before > 10 * C
    assert norm(path) == pytest.approx(C, rel=1e-6)
    for name, values in read_floats(path).items():  # the same direction, scaled by C / norm
        np.testing.assert_allclose(values, original[name] * (C / before), rtol=1e-6, atol=1e-9)
    short = update(layout, keras_weights[2], tmp_path / "short")
    clip_update(short, 2 * before)  # already within the norm: unchanged, byte for byte
    kept = read_floats(update(layout, keras_weights[2], tmp_path / "again"))
    for name, values in read_floats(short).items():
        assert np.array_equal(values, kept[name])


async def test_the_reference_selector_refuses_what_breaks_the_bound_and_sums_the_rest(
    settings: Settings, layout: Layout, keras_weights: list[Path], tmp_path: Path
) -> None:
    clipped = update(layout, keras_weights[1], tmp_path / "clipped")
    clip_update(clipped, C)
    long = update(layout, keras_weights[2], tmp_path / "long")
    with h5py.File(long, "r") as file:
        plan = read_plan(file, long)
    long_norm = update_norm(UntrustedFile.at(long), plan)
    assert long_norm > C
    settings = settings.replace(
        checkin_limit=3, dp_noise_multiplier=1.0, dp_clip_norm=C, dp_population=100
    )
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            endpoints = await nursery.start(serve, settings)
            watcher = await watch(nursery, endpoints.status_url)
            address = f"127.0.0.1:{endpoints.grpc_port}"
            flags = ["--root", str(layout.root), "--port", "0", "--clip-norm", str(C)]
            command = [*SELECTOR, "--coordinator", address, *flags]
            with Served(environment(layout.root), command) as selector:
                line = await trio.to_thread.run_sync(selector.wait_for_line, "serving")
                selector_id = line.split("selector ", 1)[1].split(" serving", 1)[0]
                clients = [SelectorCalls(selector_id, tmp_path / f"c{i}") for i in range(3)]
                async with trio.open_nursery() as checking:
                    for calls in clients:
                        calls.connect(nursery)
                        checking.start_soon(calls.check_in)
                await clients[0].upload(long, 1)  # over the clip norm
                await clients[1].upload(clipped, 2)  # clipped, but counted twice
                await clients[2].upload(clipped, 1)  # the one honest upload
                done = await watcher.wait_for(completed(1))
                await trio.to_thread.run_sync(selector.wait_for_line, "reported to the coordinator")
                refused = [line for line in selector.lines if "refused:" in line]
            nursery.cancel_scope.cancel()
    assert [line.split("refused: ", 1)[1].rstrip() for line in refused] == [
        f"L2 norm {long_norm:.6g} exceeds the clip norm {C:g}",
        "weight 2, not 1 (under differential privacy each client counts once)",
    ]
    assert (done["stage"], done["reported"], done["rejected"]) == ("COMPLETED", [selector_id], {})
    # What the selector summed is the clipped upload alone, with weight 1.
    assert layout.agg_weight(selector_id).read_text() == "1\n"
    summed = read_floats(layout.agg_checkpoint(selector_id))
    for name, values in read_floats(clipped).items():
        np.testing.assert_array_equal(summed[name], values)
