"""trainingd: keeps the training data of an image-review workflow clean, embedded, learned from."""

from __future__ import annotations

__version__ = "0.1.0"
