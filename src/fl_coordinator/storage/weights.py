"""Which datasets of a checkpoint are weights, and how each dtype is read, summed and written.

FedAvg averages a model's parameters; a checkpoint is plain HDF5 with no
notion of which dataset is a parameter. This module decides, once, from the
global checkpoint: every floating-point dataset with values is a weight
array, and each gets an :class:`Encoding` that says how its stored bytes are
decoded into numbers, which dtype the sum is accumulated in, and how the
result is stored again. Anything it could not average *correctly* is refused
with one line naming the dataset and what to do, never left silently
unchanged while the round says COMPLETED.

What each kind of dataset gets (Keras 3's own dtypes first; the README has
the same table):

=========================  ==================================  ===========================
stored in HDF5 as          written by                          gets
=========================  ==================================  ===========================
float16, float32, float64  Keras ``dtype="float16"`` etc.      averaged, sum in float64
opaque ``|V2`` with the    Keras ``dtype="bfloat16"``          averaged (``ml_dtypes``),
attribute ``dtype``                                            sum in float64
compound ``(r, i)``        Keras complex64/complex128          averaged, sum in complex128
float128 (long double)     numpy, never Keras                  averaged, sum in long double
opaque, no such attribute  Keras float8 variables (``|V1``;    refused
                           Keras cannot load them back)
integer scalar             counters (Normalization's count)    kept as it is
integer array              quantized kernels (``quantize()``)  refused
bool, string, enum         metadata                            kept as it is
no elements (0 in the      anything                            kept: nothing to average
shape, null dataspace)
=========================  ==================================  ===========================

Refused as well, in the global checkpoint: optimizer state (an ``optimizer/``
group, Keras 3's ``save_weights`` of a compiled model, or the legacy
``optimizer_weights/``: a learning rate and moments are not model weights),
compound or array types that hold floats, and layout features the new
checkpoint could not reproduce faithfully: soft and external links, an
object under two names (hard links), external raw storage and virtual
datasets (both read other files).

A selector's aggregate (``n * delta`` summed over its clients) may store a
weight in its own encoding or in a wider one that holds every value of it
(float16 and bfloat16 weights as float32 or float64): n * delta of a
float16 weight overflows float16 long before the weight does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import ml_dtypes
import numpy as np

from ..errors import CheckpointError

__all__ = [
    "DTYPE_ATTRIBUTE",
    "OPTIMIZER_GROUPS",
    "Encoding",
    "Weight",
    "accepts",
    "describe",
    "encoding_of",
    "read_plan",
    "upload_encoding",
]

#: Top-level groups that hold optimizer state: Keras 3 ``save_weights`` of a
#: compiled model, and the legacy full-model HDF5 format.
OPTIMIZER_GROUPS = ("optimizer", "optimizer_weights")

#: The attribute Keras 3 puts on a dataset it stores as opaque bytes (bfloat16).
DTYPE_ATTRIBUTE = "dtype"


@dataclass(frozen=True)
class Encoding:
    """How the values of one weight array are stored and computed with.

    ``stored`` is the numpy dtype h5py reads and writes (``|V2`` for
    bfloat16), ``values`` the dtype numpy computes with (the same, or
    ``ml_dtypes.bfloat16``: a view, no copy), ``accumulator`` the dtype sums
    are kept in, ``tag`` the ``dtype`` attribute of an opaque dataset.
    """

    name: str
    stored: np.dtype
    values: np.dtype
    accumulator: np.dtype
    tag: str | None = None

    @property
    def is_complex(self) -> bool:
        return self.values.kind == "c"

    def decode(self, raw: np.ndarray) -> np.ndarray:
        """Values of ``raw`` (as read from HDF5), without a copy."""
        return raw if self.stored == self.values else raw.view(self.values)


@dataclass(frozen=True)
class Weight:
    """One weight array of a checkpoint: its HDF5 path, shape and encoding."""

    name: str
    shape: tuple[int, ...]
    encoding: Encoding


def _native(dtype: np.dtype) -> Encoding:
    wide = dtype.itemsize > (16 if dtype.kind == "c" else 8)
    accumulator = {
        "f": np.longdouble if wide else np.float64,
        "c": np.clongdouble if wide else np.complex128,
    }[dtype.kind]
    return Encoding(dtype.name, dtype, dtype, np.dtype(accumulator))


def _tagged(dtype: np.dtype, tag: str) -> Encoding:
    """An opaque dataset whose ``dtype`` attribute names an ``ml_dtypes`` float type."""
    named = getattr(ml_dtypes, tag, None) if tag.isidentifier() else None
    try:
        if named is None:
            raise TypeError(tag)
        values = np.dtype(named)
        ml_dtypes.finfo(values)
    except (TypeError, ValueError):
        raise ValueError(
            f"opaque values tagged dtype={tag[:40]!r}, not a floating-point type"
        ) from None
    if values.itemsize != dtype.itemsize:
        raise ValueError(f"{dtype.itemsize}-byte opaque values tagged dtype={tag!r}")
    return Encoding(tag, dtype, values, np.dtype(np.float64), tag)


def _holds_floats(dtype: np.dtype) -> bool:
    if dtype.subdtype is not None:
        return _holds_floats(dtype.subdtype[0])
    if dtype.fields:
        return any(_holds_floats(field[0]) for field in dtype.fields.values())
    return dtype.kind in "fc"


def _encoding(dtype: np.dtype, tag: object) -> Encoding | None:
    """The encoding of a dataset of ``dtype`` (None: not floating point); ValueError if unusable."""
    if dtype.kind in "fc" and dtype.subdtype is None:
        return _native(dtype)
    if dtype.kind == "V" and not dtype.fields and dtype.subdtype is None:
        if isinstance(tag, bytes):
            tag = tag.decode("utf-8", "replace")
        if isinstance(tag, str):
            return _tagged(dtype, tag)
        raise ValueError(
            f"{dtype.itemsize}-byte opaque values with no dtype attribute (Keras 3 stores "
            "float8 variables so, and cannot load them back either): convert the model "
            "to float16, bfloat16 or float32"
        )
    if _holds_floats(dtype):
        raise ValueError(f"floats inside a {dtype} type, which Keras never writes")
    return None


def encoding_of(dataset: h5py.Dataset) -> Encoding | None:
    """How ``dataset`` is encoded if it is floating point (None if not); ValueError if unusable."""
    dtype = dataset.dtype
    # Only opaque values carry their type in an attribute (reading one costs an open).
    tag = dataset.attrs.get(DTYPE_ATTRIBUTE) if dtype.kind == "V" else None
    return _encoding(dtype, tag)


def upload_encoding(encoding: Encoding) -> Encoding:
    """The encoding a client's update ``n * delta`` of a weight is stored in.

    float32 for weights narrower than it (float16, bfloat16): ``n * delta``
    of a float16 weight overflows float16 (max 65504) for an ordinary n and
    delta; every other weight is stored as it is.
    """
    if not encoding.is_complex and encoding.values.itemsize < 4:
        return _native(np.dtype(np.float32))
    return encoding


def accepts(weight: Encoding, given: Encoding) -> bool:
    """Whether an aggregate may store a ``weight`` as ``given``: the same, or wider without loss."""
    if given == weight:
        return True
    return (
        given.tag is None
        and given.is_complex == weight.is_complex
        and bool(np.can_cast(weight.values, given.values, "safe"))
    )


def _no_values(dataset: h5py.Dataset) -> bool:
    return dataset.shape is None or 0 in dataset.shape


def _refusal(name: str, dataset: h5py.Dataset) -> str | None:
    """Why the dataset at ``name`` cannot be part of a global checkpoint, if it cannot."""
    plist = dataset.id.get_create_plist()
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        return f"dataset {name!r} is a virtual dataset (it reads other files)"
    if plist.get_external_count():
        return f"dataset {name!r} keeps its values in external files"
    if _no_values(dataset):
        return None
    try:
        encoding = encoding_of(dataset)
    except ValueError as error:
        return f"dataset {name!r}: {error}"
    integers = dataset.dtype.kind in "iu" and h5py.check_enum_dtype(dataset.dtype) is None
    if encoding is None and integers and dataset.shape:
        return (
            f"dataset {name!r} is an integer array ({dataset.dtype}, {dataset.shape}): quantized "
            "weights (Keras `quantize()`), which FedAvg cannot average; federate the float "
            "model and quantize the result"
        )
    return None


def read_plan(file: h5py.File, path: Path) -> tuple[Weight, ...]:
    """The weight arrays of a global checkpoint, in a stable order; CheckpointError if refused.

    ``path`` only names the file in messages. The walk uses HDF5's own visits
    with link and object info (no object opened but the datasets): with
    thousands of small datasets, h5py's ``visititems`` cost five times as much.
    """
    for group in OPTIMIZER_GROUPS:
        if isinstance(file.get(group), h5py.Group):
            raise CheckpointError(
                f"{path} holds optimizer state ({group}/): a learning rate and moments are "
                "not model weights and must never be averaged; save the checkpoint from an "
                "uncompiled model (keras.models.load_model(..., compile=False).save_weights) "
                "or run `fl-coordinator init --model <model> --force`"
            )
    plan: list[Weight] = []
    refusals: list[str] = []

    def link(name: bytes, info: h5py.h5l.LinkInfo) -> None:
        if info.type in (h5py.h5l.TYPE_SOFT, h5py.h5l.TYPE_EXTERNAL):
            kind = "a soft link" if info.type == h5py.h5l.TYPE_SOFT else "an external link"
            text = name.decode("utf-8", "replace")
            refusals.append(f"{text!r} is {kind}: the new checkpoint could not reproduce it")

    def visit(name: bytes, info: h5py.h5o.ObjInfo) -> None:
        text = name.decode("utf-8", "replace")
        if info.rc > 1:
            refusals.append(f"{text!r} is one object under several names (hard links)")
        if info.type != h5py.h5o.TYPE_DATASET:
            return
        try:
            dataset = h5py.Dataset(h5py.h5d.open(file.id, name))
        except (KeyError, OSError, RuntimeError, ValueError) as error:  # HDF5's own check
            refusals.append(f"{text!r} cannot be opened ({error})")
            return
        refusal = _refusal(text, dataset)
        if refusal is not None:
            refusals.append(refusal)
        elif not _no_values(dataset) and (encoding := encoding_of(dataset)) is not None:
            plan.append(Weight(text, dataset.shape, encoding))

    try:
        file.id.links.visit(link, info=True)
        h5py.h5o.visit(file.id, visit, info=True)
    except (OSError, RuntimeError) as error:  # HDF5's answer to a broken group or link
        raise CheckpointError(
            f"{path}: its groups cannot be read ({' '.join(str(error).split())[:300]}); "
            "restore it (`fl-coordinator rollback`) or initialise the problem again"
        ) from None
    if refusals:
        more = f" (and {len(refusals) - 1} more)" if len(refusals) > 1 else ""
        raise CheckpointError(f"{path}: {refusals[0]}{more}")
    if not plan:
        raise CheckpointError(f"{path} has no weight arrays (floating-point datasets) to average")
    return tuple(plan)


def describe(plan: Sequence[Weight]) -> str:
    """A short summary for logs: how many arrays of each encoding."""
    counts: dict[str, int] = {}
    for weight in plan:
        counts[weight.encoding.name] = counts.get(weight.encoding.name, 0) + 1
    return ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))
