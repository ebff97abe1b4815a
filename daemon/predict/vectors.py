"""Reading a batch's cached vectors into one matrix: the prediction pass scores every image of
every group, so its vectors go straight into the rows of one float32 block that the ranker
then takes in a single forward pass.

The reading is the export's :class:`~daemon.export.vectors.VectorReader` (one ``os.read`` per
file into its row, the header compared with the cache's fixed one, a few threads), not
``np.load`` per file (a header parse and a file object per call; 30,000 ``Path`` objects alone
cost a second).  A vector that is missing, unreadable, of another shape or not unit length is
left out: its image counts as having no vector (the caller predicts the group over the rest and
records an issue), and :attr:`VectorBlock.damaged` says why for all but a plain missing file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from daemon.embedding.cache import VectorCache
from daemon.export.vectors import VectorReader, bad_norms

_MISSING = "export_vector_missing"


@dataclass(frozen=True)
class VectorBlock:
    """``rows[index[sha]]`` is the vector of ``sha``; shas with no usable vector are absent
    from ``index``; ``damaged`` holds a sentence for those whose file exists but is bad."""

    rows: np.ndarray
    index: dict[str, int]
    damaged: dict[str, str] = field(default_factory=dict)


def load_block(cache: VectorCache, dim: int, shas: Iterable[str]) -> VectorBlock:
    """The vectors of ``shas`` (duplicates read once) as float32 rows of ``dim``."""
    wanted = list(dict.fromkeys(shas))
    rows = np.empty((len(wanted), dim), dtype=np.float32)
    if not wanted:
        return VectorBlock(rows, {})
    bad: dict[int, str] = {}
    for i, code, _value, sentence in VectorReader(cache, dim).read_into(wanted, rows):
        bad[i] = "" if code == _MISSING else sentence
    for i in bad_norms(rows).tolist():
        bad.setdefault(i, "the cached vector is not unit length: the file is damaged "
                          "(`trainingd embed --verify` finds and repairs it)")
    index = {sha: i for i, sha in enumerate(wanted) if i not in bad}
    return VectorBlock(rows, index, {wanted[i]: why for i, why in bad.items() if why})
