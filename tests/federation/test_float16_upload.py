"""A float16 model whose update ``n * delta`` overflows float16 still gets through.

The reference client uploads float16 (and bfloat16) weights' updates as
float32, the reference selector sums them as they come, and the coordinator
accepts a wider dtype than the checkpoint's for an aggregate. All real: the
client's check-in and upload code, the selector and the coordinator, on
loopback; only the training is replaced by a weights file Keras wrote with
known values, so the arithmetic can be checked exactly.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import trio
from helpers.peers import completed, read_floats, serve_and_watch

from fl_coordinator.config import Settings
from fl_coordinator.federation.client import Client, ClientOptions
from fl_coordinator.federation.selector import Selector, SelectorOptions
from fl_coordinator.federation.training import save_weights, write_update
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.model import import_keras
from fl_coordinator.storage.problem import init_problem

FLOAT16_MAX = 65504.0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
async def test_update_beyond_the_weights_own_range_is_uploaded_and_averaged(
    settings: Settings, tmp_path: Path, nursery: trio.Nursery, dtype: str
) -> None:
    keras = import_keras()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, dtype=dtype, name="d")])
    model.save(tmp_path / "model.keras")
    root = tmp_path / "problem"
    settings = settings.replace(fl_root_path=str(root), checkin_limit=1)
    layout = Layout.from_settings(settings)
    init_problem(layout, tmp_path / "model.keras")
    start = read_floats(layout.checkpoint)

    endpoints, watcher, _ = await serve_and_watch(nursery, settings)
    selector = Selector(SelectorOptions(f"127.0.0.1:{endpoints.grpc_port}", layout))
    selector_id = await nursery.start(selector.serve)
    np.savez(tmp_path / "shard.npz", x=np.zeros((2, 4), np.float32), y=np.zeros(2, np.int64))
    client = Client(ClientOptions(selector_id, tmp_path / "shard.npz", tmp_path / "client"))
    client.calls.connect(nursery)
    assert await client.calls.check_in() is None  # accepted: it has the model and the checkpoint

    # "Training" moved every weight by +2 over n = 40000 batches: n * delta = 80000.
    model.set_weights([(w.astype(np.float32) + 2).astype(w.dtype) for w in model.get_weights()])
    trained = tmp_path / "trained"
    save_weights(model, trained)
    n = 40_000
    write_update(client.files / "fl_checkpoint", trained, n, client.update)
    with h5py.File(client.update, "r") as update:
        kernel = update["layers/dense/vars/0"]
        assert kernel.dtype == np.float32 and "dtype" not in kernel.attrs
        delta = (read_floats(trained)["layers/dense/vars/0"].astype(np.float32)
                 - start["layers/dense/vars/0"].astype(np.float32))  # fmt: skip
        np.testing.assert_array_equal(kernel[()], delta * n)
        assert np.abs(kernel[()]).max() > FLOAT16_MAX  # float16 could not have held it
    await client.calls.upload(client.update, n)

    done = await watcher.wait_for(completed(1))
    assert (done["stage"], done["rejected"]) == ("COMPLETED", {})
    with h5py.File(layout.agg_checkpoint(selector_id), "r") as aggregate:
        assert aggregate["layers/dense/vars/0"].dtype == np.float32
    assert layout.agg_weight(selector_id).read_text() == f"{n}\n"
    after = read_floats(layout.checkpoint)
    trained_values = read_floats(trained)
    for name, value in after.items():
        assert value.dtype == start[name].dtype  # the checkpoint keeps its own dtype
        np.testing.assert_array_equal(value, trained_values[name])  # w + 80000 / 40000
