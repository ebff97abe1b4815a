"""CLIP embeddings: open_clip loading, the content-addressed cache, batched extraction.

Rooms: :mod:`.model` (weights, device, the ``Embedder`` seam), :mod:`.decode` (one file ->
tensor or issue), :mod:`.cache` (``.npy`` files and ``processed_images.jsonl``), :mod:`.ledger`
(state DB tables), :mod:`.stage` (the pipeline), :mod:`.lookup` (vectors for training),
:mod:`.verify` (cache, index and files agree), :mod:`.cli` (``trainingd embed``).
Importing this package does not import torch or open_clip.
"""
