"""The similarity room (issue 14 item 3, issue 12's near-duplicate search): the ANN index over
the cache, its file, ``trainingd similar`` and the near-duplicate pairs of the split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from daemon.cli import main
from daemon.embedding.cache import VectorCache
from daemon.embedding.ledger import META_EMBEDDER
from daemon.settings import Settings
from daemon.similar.index import AnnIndex
from daemon.similar.live import held_index, vectors_written
from daemon.similar.pairs import PairSearch, knn_pairs
from daemon.similar.persist import SimilarIndex, index_path
from daemon.store import StateStore
from daemon.training.units import GroupImages, build_units, near_duplicate_pairs

pytest.importorskip("faiss")
EMBEDDER = "test-embedder:v1"


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _clustered(rng: np.random.Generator, centres: int, per: int, dim: int, noise: float,
               planted: int) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """CLIP-like vectors: members of a cluster sit near its centre (cosine ~0.8-0.9 to each
    other), plus ``planted`` near copies (cosine > 0.99) of random members."""
    c = _unit(rng, centres, dim)
    x = np.repeat(c, per, axis=0) + noise * rng.standard_normal((centres * per, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    src = rng.choice(len(x), planted, replace=False)
    dup = x[src] + 0.005 * rng.standard_normal((planted, x.shape[1])).astype(np.float32)
    x = np.concatenate([x, dup / np.linalg.norm(dup, axis=1, keepdims=True)]).astype(np.float32)
    return x, {(int(s), len(x) - planted + i) for i, s in enumerate(src)}


def _cache(settings: Settings, vectors: np.ndarray) -> tuple[VectorCache, list[str]]:
    cache = VectorCache(settings.cache_dir, EMBEDDER)
    cache.prepare()
    shas = [f"{i:064x}" for i in range(len(vectors))]
    cache.write_vectors(list(zip(shas, vectors, strict=True)))
    return cache, shas


class TestNearDuplicatePairs:
    def test_dense_clusters_and_planted_copies_match_exact_search(self) -> None:
        """Above the exact limit the range search over cells, and the k-NN search over a held
        HNSW index, return exactly the exact search's pairs on clustered vectors with planted
        copies and one tight cluster of 300."""
        rng = np.random.default_rng(7)
        x, planted = _clustered(rng, 60, 40, 64, 0.035, 40)
        tight = x[0] + 0.01 * _unit(rng, 300, 64)
        x = np.concatenate([x, tight / np.linalg.norm(tight, axis=1, keepdims=True)])
        exact = {tuple(p) for p in near_duplicate_pairs(x, 0.97, exact_limit=10**9)}
        st = PairSearch()
        ann = {tuple(p) for p in near_duplicate_pairs(x, 0.97, exact_limit=100, stats=st)}
        assert planted <= ann
        assert ann == exact
        assert st.method == "ann" and st.structure == "cells" and st.probes < st.cells
        graph = AnnIndex(64)
        graph.add(np.arange(len(x)), x)
        hn = PairSearch()
        held = {tuple(p) for p in near_duplicate_pairs(x, 0.97, exact_limit=100, index=graph,
                                                       stats=hn)}
        assert held == exact and hn.structure == "hnsw" and hn.widened > 0

    def test_units_say_the_ann_index_found_the_pairs(self) -> None:
        """build_units records that the shared ANN index did the search (it was LSH before)."""
        rng = np.random.default_rng(1)
        x = _unit(rng, 300, 32)
        groups = [GroupImages(f"p/g{i}", (f"file:p/{i}",), x[i:i + 1]) for i in range(300)]
        groups.append(GroupImages("p/copy", ("file:p/copy",), x[5:6] * 1.0001))
        units = build_units(groups, cosine=0.97, seed=0, test_fraction=0.2,
                            validation_fraction=0.1, exact_limit=100)
        assert units.search["method"] == "ann"
        assert units.unit_of["p/copy"] == units.unit_of["p/g5"]

    def test_no_pair_below_the_threshold_is_returned(self) -> None:
        """Every returned pair's float32 cosine is at or above the threshold."""
        rng = np.random.default_rng(3)
        x, _ = _clustered(rng, 30, 30, 48, 0.05, 20)
        pairs = knn_pairs(x, 0.97)
        sims = np.einsum("ij,ij->i", x[pairs[:, 0]], x[pairs[:, 1]])
        assert len(pairs) and (sims >= 0.97).all() and (pairs[:, 0] < pairs[:, 1]).all()


class TestSimilarIndex:
    def test_saved_index_is_reloaded_and_caught_up_from_the_cache(self, settings: Settings
                                                                   ) -> None:
        """A saved index reopens with its hashes; vectors cached after the save are added."""
        rng = np.random.default_rng(2)
        cache, shas = _cache(settings, _unit(rng, 50, 16))
        first = SimilarIndex.open(cache)
        assert len(first) == 50
        path = first.save()
        assert path == index_path(settings.cache_dir, EMBEDDER) and path.is_file()
        more = _unit(rng, 5, 16)
        cache.write_vectors([(f"{'f' * 60}{i:04x}", v) for i, v in enumerate(more)])
        again = SimilarIndex.open(cache)
        assert len(again) == 55 and again.hashes[:50] == first.hashes
        assert again.neighbours(cache.load(shas[3]), 1)[0][0] == shas[3]

    def test_damaged_file_is_rebuilt_from_the_cache(self, settings: Settings) -> None:
        """A torn index file is logged and rebuilt, never trusted or raised."""
        rng = np.random.default_rng(4)
        cache, _ = _cache(settings, _unit(rng, 20, 8))
        path = SimilarIndex.open(cache).save()
        path.write_bytes(path.read_bytes()[:100])
        with capture_logs() as logs:
            idx = SimilarIndex.open(cache)
        assert len(idx) == 20
        assert [e["event"] for e in logs].count("similar.index_rebuilt") == 1

    def test_another_embedders_file_is_not_used(self, settings: Settings) -> None:
        """An index file made for another embedder id is rebuilt from this embedder's cache."""
        rng = np.random.default_rng(5)
        cache, _ = _cache(settings, _unit(rng, 10, 8))
        other = VectorCache(settings.cache_dir, "other:v2")
        other.prepare()
        other.write_vectors([(f"{i:064x}", v) for i, v in enumerate(_unit(rng, 3, 8))])
        path = SimilarIndex.open(other).save()
        own = index_path(settings.cache_dir, EMBEDDER)
        own.parent.mkdir(parents=True, exist_ok=True)
        own.write_bytes(path.read_bytes())
        with capture_logs() as logs:
            idx = SimilarIndex.open(cache)
        assert len(idx) == 10 and "similar.index_rebuilt" in [e["event"] for e in logs]

    def test_an_index_file_of_the_former_library_is_rebuilt(self, settings: Settings) -> None:
        """A file a usearch-era daemon saved is rebuilt with faiss from the cache, never read."""
        rng = np.random.default_rng(9)
        cache, shas = _cache(settings, _unit(rng, 12, 8))
        path = index_path(settings.cache_dir, EMBEDDER)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"embedder_id": EMBEDDER, "dim": 8, "library": "usearch", "vectors": 12}
        with path.open("wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)),
                     hashes=np.array([h.encode() for h in shas], dtype="S64"),
                     index=np.frombuffer(b"usearch graph bytes", dtype=np.uint8))
        with capture_logs() as logs:
            idx = SimilarIndex.open(cache)
        assert len(idx) == 12 and "similar.index_rebuilt" in [e["event"] for e in logs]
        assert idx.neighbours(cache.load(shas[4]), 1)[0][0] == shas[4]

    def test_embedding_batches_join_the_held_index(self, settings: Settings) -> None:
        """The stage's hook adds a batch's vectors to this process's index of that embedder."""
        rng = np.random.default_rng(6)
        cache, shas = _cache(settings, _unit(rng, 4, 8))
        vectors_written(cache, [(shas[0], cache.load(shas[0])), (shas[1], cache.load(shas[1]))])
        held = held_index(cache)
        assert held is not None and set(held.hashes) >= {shas[0], shas[1]}


class TestSimilarCommand:
    def _prepare(self, settings: Settings) -> tuple[list[str], np.ndarray]:
        rng = np.random.default_rng(8)
        x = _unit(rng, 30, 16)
        x[1] = x[0] + 0.01 * x[2]
        x[1] /= np.linalg.norm(x[1])
        _, shas = _cache(settings, x)
        store = StateStore(settings.state_db)
        store.set_meta(META_EMBEDDER, EMBEDDER)
        store.close()
        return shas, x

    def test_hash_query_prints_the_nearest_first(self, settings: Settings,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
        """``similar HASH --json`` lists k neighbours, the near copy first, not the query."""
        shas, _ = self._prepare(settings)
        capsys.readouterr()  # the store's migration records
        assert main(["similar", shas[0], "-k", "3", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["neighbours"][0]["sha256"] == shas[1]
        assert len(doc["neighbours"]) == 3 and shas[0] not in [n["sha256"]
                                                               for n in doc["neighbours"]]

    def test_unknown_hash_and_unreadable_path_exit_1(self, settings: Settings,
                                                     tmp_path: Path) -> None:
        """A hash with no vector, or a path that cannot be read, is 'not found' (1)."""
        self._prepare(settings)
        assert main(["similar", "a" * 64]) == 1
        assert main(["similar", str(tmp_path / "missing.jpg")]) == 1

    def test_no_embeddings_yet_exits_1(self, settings: Settings) -> None:
        """Before anything was embedded the command says so and exits 1."""
        assert main(["similar", "b" * 64]) == 1
