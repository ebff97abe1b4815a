"""Standard embedding exports (``trainingd export embeddings``): the cache's vectors in the
layout clip-retrieval and embedding-reader read, written incrementally with a manifest.

Rooms: :mod:`.layout` (file names, the manifest, what a folder holds), :mod:`.vectors` (reading
cached vectors fast and refusing damaged ones), :mod:`.shards` (one shard written whole),
:mod:`.run` (the export), :mod:`.cli` (the command).  Importing this package imports neither
torch nor pyarrow; pyarrow (the ``[export]`` extra) is imported when a shard is written or read.
"""
