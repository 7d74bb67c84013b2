"""Put on ``PYTHONPATH`` of a subprocess: Keras, JAX and scikit-learn then cannot be imported.

Python imports ``sitecustomize`` at start-up; a ``None`` in ``sys.modules``
makes ``import keras`` raise ``ModuleNotFoundError`` (name ``"keras"``) as on a
machine where it is not installed: the slim image, or ``pip install
fl-coordinator`` without the ``keras`` extra.
"""

import sys

for _name in ("keras", "jax", "jaxlib", "sklearn"):
    sys.modules[_name] = None  # type: ignore[assignment]
