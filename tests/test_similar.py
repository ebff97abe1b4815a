"""The similarity room (issue 14 item 3, issue 12's near-duplicate search): the ANN index over
the cache, its file, ``trainingd similar`` and the near-duplicate pairs of the split."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from daemon.cli import main
from daemon.embedding.cache import VectorCache
from daemon.embedding.ledger import META_EMBEDDER
from daemon.settings import Settings
from daemon.similar import index as index_module
from daemon.similar.index import AnnIndex
from daemon.similar.live import held_index, vectors_written
from daemon.similar.pairs import PairSearch, range_pairs
from daemon.similar.persist import SimilarIndex, index_path, saved_cells
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
        """Above the exact limit the range search over cells returns exactly the exact
        search's pairs on clustered vectors with planted copies and one tight cluster of 300."""
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
        pairs = range_pairs(x, 0.97)
        sims = np.einsum("ij,ij->i", x[pairs[:, 0]], x[pairs[:, 1]])
        assert len(pairs) and (sims >= 0.97).all() and (pairs[:, 0] < pairs[:, 1]).all()


class TestOneIndexForTheSplit:
    """The near-duplicate search of the split runs over the similarity index's own cells."""

    def test_the_index_trains_cells_that_the_range_search_uses(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Past the exact limit the index holds ~2 sqrt(n) cells, retrained at 4x growth; the
        range search over them finds exactly the exact search's pairs, and says it used them."""
        monkeypatch.setattr(index_module, "FLAT_LIMIT", 1000)
        rng = np.random.default_rng(31)
        x, planted = _clustered(rng, 60, 40, 64, 0.035, 40)
        idx = AnnIndex(64)
        idx.add(np.arange(900), x[:900])
        assert idx.cells is None
        idx.add(np.arange(900, 1100), x[900:1100])
        assert idx.cells is not None and len(idx.cells) == index_module.cells_for(1100)
        first = idx.cells
        idx.add(np.arange(1100, len(x)), x[1100:])
        assert idx.cells is first  # 2440 < 4 x 1100: not retrained yet
        exact = {tuple(p) for p in near_duplicate_pairs(x, 0.97, exact_limit=10**9)}
        st = PairSearch()
        got = {tuple(p) for p in near_duplicate_pairs(x, 0.97, exact_limit=100,
                                                      cells=idx.cells, stats=st)}
        assert planted <= got and got == exact
        assert st.structure == "index cells" and st.cells == len(first)
        other = PairSearch()  # cells of another width are not used: trained here instead
        near_duplicate_pairs(x, 0.97, exact_limit=100, cells=np.ones((4, 8), np.float32),
                             stats=other)
        assert other.structure == "cells"

    def test_saved_cells_come_from_the_embedders_index_file_only(
            self, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
        """saved_cells reads the cells of this embedder's saved index; no file, a small index
        (no cells), another embedder's file or a torn file give None (the search trains its
        own), the torn one with a log line."""
        monkeypatch.setattr(index_module, "FLAT_LIMIT", 100)
        assert saved_cells(settings.cache_dir, EMBEDDER) is None
        rng = np.random.default_rng(32)
        cache, _ = _cache(settings, _unit(rng, 80, 16))
        SimilarIndex.open(cache).save()
        assert saved_cells(settings.cache_dir, EMBEDDER) is None  # 80 vectors: no cells yet
        cache.write_vectors([(f"{'e' * 60}{i:04x}", v) for i, v in enumerate(_unit(rng, 70, 16))])
        with capture_logs() as trained:
            index = SimilarIndex.open(cache)
        assert [e["cells"] for e in trained if e["event"] == "similar.index_trained"] == \
            [index_module.cells_for(150)]
        index.save()
        cells = saved_cells(settings.cache_dir, EMBEDDER)
        assert index.ann is not None and index.ann.cells is not None and cells is not None
        assert np.array_equal(cells, index.ann.cells)
        assert saved_cells(settings.cache_dir, "other:v9") is None
        path = index_path(settings.cache_dir, EMBEDDER)
        path.write_bytes(path.read_bytes()[:200])
        with capture_logs() as logs:
            assert saved_cells(settings.cache_dir, EMBEDDER) is None
        assert [e["event"] for e in logs] == ["similar.cells_unreadable"]
        path.unlink()
        os.mkfifo(path)  # a FIFO in its place: refused at once, never opened (it would block)
        with capture_logs() as logs:
            assert saved_cells(settings.cache_dir, EMBEDDER) is None
        assert [(e["event"], e["error"]) for e in logs] == [
            ("similar.cells_unreadable", "not a regular file")]

    def test_the_split_searches_the_cells_of_the_saved_index(
            self, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
        """assign_sides (the training split) reads the cells of the embedder's saved index and
        its near-duplicate search runs over them; with no index it trains its own."""
        from daemon.training import units as units_module
        from daemon.training.dataset import DatasetInfo, assign_sides

        monkeypatch.setattr(index_module, "FLAT_LIMIT", 100)
        monkeypatch.setattr(units_module, "EXACT_SEARCH_LIMIT", 50)
        rng = np.random.default_rng(34)
        x = _unit(rng, 300, 32)
        x[7] = x[3] + 0.01 * x[4]
        x[7] /= np.linalg.norm(x[7])
        groups = [GroupImages(f"p/g{i}", (f"file:p/{i}",), x[i:i + 1]) for i in range(300)]
        keys = [g.key for g in groups]
        plain = DatasetInfo(kind="ranker", embedder_id=EMBEDDER)
        assign_sides(settings, plain, groups, keys)
        assert plain.units is not None and plain.units.search["structure"] == "cells"
        cache, _ = _cache(settings, x)
        SimilarIndex.open(cache).save()
        info = DatasetInfo(kind="ranker", embedder_id=EMBEDDER)
        assign_sides(settings, info, groups, keys)
        assert info.units is not None and info.units.search["structure"] == "index cells"
        assert info.units.unit_of["p/g7"] == info.units.unit_of["p/g3"]
        assert info.units.unit_of == plain.units.unit_of

    def test_units_record_that_the_index_cells_were_searched(self) -> None:
        """build_units with the index's cells joins the same groups and says which cells."""
        rng = np.random.default_rng(33)
        x = _unit(rng, 300, 32)
        groups = [GroupImages(f"p/g{i}", (f"file:p/{i}",), x[i:i + 1]) for i in range(300)]
        groups.append(GroupImages("p/copy", ("file:p/copy",), x[5:6] * 1.0001))
        cells = index_module.train_cells(x)  # what the index trains on a cache of these
        units = build_units(groups, cosine=0.97, seed=0, test_fraction=0.2,
                            validation_fraction=0.1, exact_limit=100, cells=cells)
        assert units.search["structure"] == "index cells"
        assert units.unit_of["p/copy"] == units.unit_of["p/g5"]


class TestTheReportSaysHowNearDuplicatesWereFound:
    """The inspection report the data gate writes names the threshold and the search."""

    def _report(self, settings: Settings, cosine: float) -> str:
        from datetime import UTC, datetime

        from daemon.training.gate import data_gate

        rng = np.random.default_rng(35)
        x = _unit(rng, 300, 32)
        groups = [GroupImages(f"p/g{i}", (f"file:p/{i}",), x[i:i + 1]) for i in range(300)]
        groups.append(GroupImages("p/copy", ("file:p/copy",), x[5:6] + 0.001 * x[6:7]))
        groups.append(GroupImages("p/again", ("file:p/9",), x[9:10]))  # same file: one unit
        units = build_units(groups, cosine=cosine, seed=0, test_fraction=0.2,
                            validation_fraction=0.1, exact_limit=100,
                            cells=index_module.train_cells(x))
        store = StateStore(settings.state_db)
        try:
            gate = data_gate(settings, store, datetime(2026, 12, 1, tzinfo=UTC), coverage={},
                             units=units)
        finally:
            store.close()
        assert gate.report is not None and gate.markdown is not None
        assert json.loads(gate.report.read_text())["near_duplicate_search"] == units.search
        return gate.markdown.read_text()

    def test_threshold_and_cells_are_named_beside_the_units(self, settings: Settings) -> None:
        md = self._report(settings, 0.97)
        assert "## Duplicate and near-duplicate units (2)" in md
        assert ("Near-identical: embedding cosine >= 0.97 (the threshold `trainingd similar` "
                "marks); 302 vectors searched over the index cells") in md

    def test_a_search_that_is_off_says_so(self, settings: Settings) -> None:
        """Above 1 (off, or a random-init embedder) the report says nothing was searched."""
        md = self._report(settings, 2.0)
        assert "## Duplicate and near-duplicate units (1)" in md
        assert "Near-identical embeddings were not searched (the threshold is above 1" in md


class TestAnnIndex:
    """The index itself: exact while small, a PQ scan with an exact re-rank above the limit."""

    @staticmethod
    def _exact(x: np.ndarray, q: np.ndarray, k: int) -> list[set[int]]:
        return [set(np.argsort(-(x @ v), kind="stable")[:k].tolist()) for v in q]

    def test_small_index_answers_exactly_best_first(self) -> None:
        """Below the limit every query is an exact scan: the keys and cosines of brute force."""
        rng = np.random.default_rng(21)
        x = _unit(rng, 300, 24)
        idx = AnnIndex(24)
        idx.add(np.arange(300), x)
        nb = idx.search(x[:5], 7)
        assert idx.structure == "exact"
        for i in range(5):
            want = np.argsort(-(x @ x[i]), kind="stable")[:7]
            assert nb.keys[i].tolist() == want.tolist()
            assert np.allclose(nb.sims[i], x[want] @ x[i], atol=1e-6)
        wide = idx.search(x[:1], 500)  # more than the index holds: every key once
        assert sorted(wide.keys[0].tolist()) == list(range(300))

    def test_above_the_limit_the_scan_keeps_recall_and_exact_cosines(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Past FLAT_LIMIT the codes are trained and used; recall@10 against exact search
        stays >= 0.95 and every returned cosine is the exact one; codebooks trained on few
        vectors are retrained once the index has grown RETRAIN_GROWTH times."""
        monkeypatch.setattr(index_module, "FLAT_LIMIT", 800)
        monkeypatch.setattr(index_module, "RERANK", 100)
        monkeypatch.setattr(index_module, "PER_NEIGHBOUR", 10)
        rng = np.random.default_rng(22)
        x = _unit(rng, 4000, 64)
        idx = AnnIndex(64)
        idx.add(np.arange(700), x[:700])
        assert idx.structure == "exact" and idx.trained_on == 0
        idx.add(np.arange(700, 1000), x[700:1000])
        assert idx.structure == "pq-scan+rerank" and idx.trained_on == 1000
        idx.add(np.arange(1000, 4000), x[1000:])
        assert idx.trained_on == 4000  # retrained at 4x the vectors it was trained on
        q = x[rng.choice(4000, 50, replace=False)] + 0.05 * _unit(rng, 50, 64)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        nb = idx.search(q, 10)
        truth = self._exact(x, q, 10)
        recall = sum(len(t & set(k.tolist())) for t, k in zip(truth, nb.keys, strict=True)) / 500
        assert recall >= 0.95
        for i in range(len(q)):
            assert np.allclose(nb.sims[i], x[nb.keys[i]] @ q[i], atol=1e-6)
            assert (np.diff(nb.sims[i]) <= 1e-7).all()

    def test_arrays_round_trip_and_torn_codes_are_refused(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """from_arrays(arrays()) answers as the original; codes that do not match the vectors,
        or bytes that are not an index, raise ValueError (the caller rebuilds)."""
        monkeypatch.setattr(index_module, "FLAT_LIMIT", 800)
        rng = np.random.default_rng(23)
        x = _unit(rng, 1200, 32)
        idx = AnnIndex(32)
        idx.add(np.arange(1200), x)
        a = idx.arrays()
        back = AnnIndex.from_arrays(a)
        assert back.structure == idx.structure == "pq-scan+rerank" and len(back) == 1200
        assert back.search(x[:3], 5).keys.tolist() == idx.search(x[:3], 5).keys.tolist()
        with pytest.raises(ValueError, match="not a faiss index"):
            AnnIndex.from_arrays(replace(a, codes=a.codes[:40]))
        with pytest.raises(ValueError, match="do not describe"):
            AnnIndex.from_arrays(replace(a, vectors=a.vectors[:1100]))

    def test_sub_quantisers_divide_the_dimension(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """256 sub-quantisers for the CLIP widths; an odd width has none and stays exact."""
        assert [index_module.subspaces(d) for d in (512, 768, 1024, 64, 10, 9)] == \
            [256, 256, 256, 32, 2, 0]
        monkeypatch.setattr(index_module, "FLAT_LIMIT", 50)
        idx = AnnIndex(9)
        idx.add(np.arange(100), _unit(np.random.default_rng(24), 100, 9))
        assert idx.structure == "exact" and idx.search(idx.vectors[:1], 1).keys[0, 0] == 0


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

    def test_a_scanned_index_is_saved_with_its_codes_and_reopened(
            self, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
        """Above the limit the file carries the trained codes: reopened, it scans the same
        codes (no retraining) and answers as before."""
        monkeypatch.setattr(index_module, "FLAT_LIMIT", 100)
        rng = np.random.default_rng(12)
        cache, shas = _cache(settings, _unit(rng, 300, 16))
        first = SimilarIndex.open(cache)
        assert first.ann is not None and first.ann.structure == "pq-scan+rerank"
        first.save()
        with capture_logs() as logs:
            again = SimilarIndex.open(cache)
        assert "similar.index_rebuilt" not in [e["event"] for e in logs]
        assert again.ann is not None and again.ann.trained_on == first.ann.trained_on
        q = cache.load(shas[7])
        assert again.neighbours(q, 5) == first.neighbours(q, 5)
        assert again.neighbours(q, 1)[0][0] == shas[7]

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

    def test_a_damaged_cached_vector_is_left_out_and_logged(self, settings: Settings) -> None:
        """Catching up from the cache, a torn or non-unit vector file is logged and left out;
        the rest are indexed (``trainingd embed --verify`` repairs the file)."""
        rng = np.random.default_rng(14)
        cache, shas = _cache(settings, _unit(rng, 40, 16))
        cache.vector_path(shas[3]).write_bytes(b"\x93NUMPY torn")
        damaged = cache.vector_path(shas[8])
        damaged.write_bytes(damaged.read_bytes()[:-64] + b"\x00" * 64)  # no longer unit length
        with capture_logs() as logs:
            idx = SimilarIndex.open(cache)
        assert len(idx) == 38 and shas[3] not in idx.key_of and shas[8] not in idx.key_of
        assert sorted(e["sha256"] for e in logs if e["event"] == "similar.vector_unreadable") \
            == sorted([shas[3], shas[8]])

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
        # one threshold: the near copy is marked as the split would join it, the rest not
        assert doc["near_duplicate_cosine"] == settings.training.near_duplicate_cosine
        assert [n["near_duplicate"] for n in doc["neighbours"]] == [True, False, False]
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
