"""Similarity search over the embedding cache: one approximate nearest-neighbour index per
embedder, kept next to the cache, shared by ``trainingd similar``, the leak-proof split's
near-duplicate search and the inspection report (one index, one threshold).

Rooms: :mod:`.index` (the index: exact or a PQ scan with an exact re-rank, and the cells of the
near-duplicate search), :mod:`.pairs` (near-duplicate pairs: a range search over cells),
:mod:`.persist` (the on-disk index keyed by content hash), :mod:`.live` (the heavy lane's hook
after embedding batches), :mod:`.cli`.
"""
