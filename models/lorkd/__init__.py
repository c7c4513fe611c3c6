"""LoRKD decomposition toolkit.

`lorkd.decompose(model, tasks=..., rank=..., alpha=...)` turns a torchvision-style CNN into a LoRKD student
(see lorkd/decompose.py); the `lorkd-train` command line covers training, export and parity.
"""

__version__ = "0.1.0"

from .decompose import LoRKDStudent, build_student, decompose  # noqa: E402  (after __version__: export reads it)

__all__ = ["LoRKDStudent", "build_student", "decompose", "__version__"]
