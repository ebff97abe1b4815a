"""Leak-proof units and the three sides: train, validation, test.

A *unit* is the union (union-find) of every group, across all projects, that shares anything
that makes two groups the same evidence:

* an image content hash (the embedding ledger's SHA-256 of the file's bytes; where the ledger
  has none, the file name within its project, and the hash of the vector's bytes), so a group
  copied into a second project's DB, or the same files reviewed again under a new group_id,
  land in one unit;
* a near-duplicate image: cosine of the two embeddings >= ``training.near_duplicate_cosine``
  (default 0.97), found by :func:`near_duplicate_pairs` with the similarity room's range
  search (:mod:`daemon.similar.pairs`; one threshold for the split, the report and
  ``trainingd similar``).

A unit's side is a stable hash of ``(seed, unit id)`` where the unit id is its smallest member
key (``"project/group_id"``), so a unit never moves while data grows *unless two units merge*:
the merged unit takes the side of the member with the smallest key (the older unit keeps its
side when its key sorts first).  Every group whose own key would have put it on another side is
listed as ``moved_by_merge`` so the outcome can flag it, and champions are compared only on test
groups they never trained on (see :mod:`daemon.training.registry`), so a merge can never leak.

Sides (``u`` = the unit's hash read as a fraction in [0, 1))::

    test        u < test_fraction            (or any member's project is in holdout_projects)
    validation  u < test_fraction + validation_fraction
    train       otherwise

The test side is what the old ``holdout`` was (same fraction key), so growing the validation
side never moves a test unit.  Pure functions plus numpy; no I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from daemon.similar.pairs import PairSearch, range_pairs

Side = Literal["train", "validation", "test"]
SIDES: tuple[Side, ...] = ("train", "validation", "test")
SPLIT_RULE = ("unit = union of groups sharing an image content hash or a near-duplicate "
              "embedding; u = sha256(f'{seed}:{smallest member key}') as a fraction; "
              "test if u < test_fraction or a member's project is in holdout_projects, "
              "validation if u < test_fraction + validation_fraction, else train")
EXACT_SEARCH_LIMIT = 20_000  # vectors: above this the search uses the ANN index (see below)
LSH_BITS = 20  # the former LSH search's shape, kept for lsh_miss_bound's callers (train_bench)
LSH_TABLES = 32


def group_key(project: str, group_id: str) -> str:
    """The key a group is known by across projects: ``project/group_id``."""
    return f"{project}/{group_id}"


def key_project(key: str) -> str:
    return key.split("/", 1)[0]


def key_digest(key: str) -> str:
    """A short, stable digest of a group key (what model files record)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def unit_fraction(unit_id: str, seed: int) -> float:
    """A stable number in [0, 1) for one unit."""
    digest = hashlib.sha256(f"{seed}:{unit_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def side_of(unit_id: str, *, seed: int, test_fraction: float, validation_fraction: float,
            forced_test: bool = False) -> Side:
    """The side of a unit from its id alone (plus ``forced_test`` for held-out projects)."""
    if forced_test:
        return "test"
    u = unit_fraction(unit_id, seed)
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


# -- near-duplicate search ------------------------------------------------------------------------

def _pairs_in_block(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, threshold: float,
                    upper_only: bool) -> list[np.ndarray]:
    sims = x[rows] @ x[cols].T
    i, j = np.nonzero(sims >= threshold)
    a, b = rows[i], cols[j]
    keep = a < b if upper_only else a != b
    return [np.stack([a[keep], b[keep]], axis=1)] if keep.any() else []


def _exact_pairs(x: np.ndarray, threshold: float, block: int) -> list[np.ndarray]:
    n = len(x)
    out: list[np.ndarray] = []
    for s in range(0, n, block):
        rows = np.arange(s, min(n, s + block))
        cols = np.arange(s, n)
        out += _pairs_in_block(x, rows, cols, threshold, upper_only=True)
    return out


def lsh_miss_bound(threshold: float, bits: int = LSH_BITS, tables: int = LSH_TABLES) -> float:
    """Upper bound of the chance that a pair at cosine >= ``threshold`` shares no bucket.

    Sign random projections agree on one bit with probability ``1 - angle / pi``."""
    agree = 1 - math.acos(min(1.0, max(-1.0, threshold))) / math.pi
    return float((1 - agree**bits) ** tables)


def near_duplicate_pairs(vectors: np.ndarray, threshold: float, *, block: int = 2048,
                         exact_limit: int = EXACT_SEARCH_LIMIT, seed: int = 0,
                         cells: np.ndarray | None = None, stats: PairSearch | None = None
                         ) -> np.ndarray:
    """``(k, 2)`` index pairs ``i < j`` whose cosine is >= ``threshold``.

    Rows are L2-normalised here.  Up to ``exact_limit`` vectors: blocked brute force (exact).
    Above: the similarity room's range search over k-means cells
    (:func:`daemon.similar.pairs.range_pairs`: every vector compared exactly with the vectors
    of its nearest cells, one matrix product per cell), over ``cells`` when the caller has the
    similarity index's (:func:`daemon.similar.persist.saved_cells`).  One threshold for the
    split, the report and ``trainingd similar``.
    No false pair is ever returned; the measured recall is in Documents/SIMILARITY.md.
    Content-hash duplicates are joined separately and never depend on this search.  ``seed``
    is kept for callers of the former LSH search (the cells' k-means is seeded)."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or len(x) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    if len(x) > exact_limit:
        return range_pairs(x, threshold, cells=cells, stats=stats)
    found = _exact_pairs(x, threshold, block)
    if stats is not None:
        stats.vectors, stats.method = len(x), "exact"
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(found).astype(np.int64)
    out: np.ndarray = np.unique(pairs, axis=0)
    if stats is not None:
        stats.pairs = len(out)
    return out


# -- units ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class GroupImages:
    """What unit building knows of one group: its key and each image's content keys/vector."""

    key: str  # group_key(project, group_id)
    contents: tuple[str, ...]  # content keys (sha256, "file:project/name", "vec:<hash>")
    vectors: np.ndarray | None = None  # (images, dim) float32, or None when not loaded


@dataclass(frozen=True)
class UnitsSummary:
    """The dataset metadata's ``units`` figures: how groups were joined and where they sit."""

    groups: int
    units: int
    groups_by_side: dict[Side, int]
    multi_group_units: int
    groups_in_multi_group_units: int
    near_duplicate_pairs: int
    moved_by_merge: int
    search: dict[str, Any]  # how near duplicates were searched (the pair search's description)

    def to_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, "units": self.units,
                "groups_by_side": self.groups_by_side,
                "multi_group_units": self.multi_group_units,
                "groups_in_multi_group_units": self.groups_in_multi_group_units,
                "near_duplicate_pairs": self.near_duplicate_pairs,
                "moved_by_merge": self.moved_by_merge, "search": self.search}


@dataclass
class Units:
    """The partition of groups into units, each unit's side, and why groups were joined."""

    unit_of: dict[str, str]  # group key -> unit id (its smallest member key)
    side: dict[str, Side]  # unit id -> side
    members: dict[str, list[str]]  # unit id -> sorted group keys
    links: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # unit id -> joins
    moved_by_merge: list[str] = field(default_factory=list)  # groups off their own side
    near_duplicate_pairs: int = 0
    search: dict[str, Any] = field(default_factory=dict)

    def side_of_group(self, key: str) -> Side:
        return self.side[self.unit_of[key]]

    def groups_on(self, side: Side) -> set[str]:
        return {k for k, u in self.unit_of.items() if self.side[u] == side}

    def shared_units(self) -> dict[str, list[str]]:
        """Units with more than one group (duplicates and near duplicates)."""
        return {u: m for u, m in self.members.items() if len(m) > 1}

    def summary(self) -> UnitsSummary:
        counts = {s: 0 for s in SIDES}
        for u in self.unit_of.values():
            counts[self.side[u]] += 1
        shared = self.shared_units()
        return UnitsSummary(len(self.unit_of), len(self.members), counts, len(shared),
                            sum(len(m) for m in shared.values()), self.near_duplicate_pairs,
                            len(self.moved_by_merge), self.search)

    def report_rows(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Multi-group units for the inspection report: members, side and what joined them."""
        rows = []
        for u, m in sorted(self.shared_units().items()):
            kinds = sorted({str(link["kind"]) for link in self.links.get(u, [])})
            rows.append({"unit": u, "side": self.side[u], "groups": m, "joined_by": kinds,
                         "links": self.links.get(u, [])[:20]})
            if len(rows) >= limit:
                break
        return rows


def build_units(groups: Sequence[GroupImages], *, cosine: float, seed: int,
                test_fraction: float, validation_fraction: float,
                holdout_projects: Collection[str] = (),
                exact_limit: int | None = None, cells: np.ndarray | None = None
                ) -> Units:
    """Join groups into units and give each unit its side (see the module docstring)."""
    keys = sorted({g.key for g in groups})
    index = {k: i for i, k in enumerate(keys)}
    uf = _UnionFind(len(keys))
    link_list: list[tuple[int, int, dict[str, Any]]] = []
    owner: dict[str, int] = {}
    vec_rows: list[np.ndarray] = []
    vec_group: list[int] = []
    for g in groups:
        gi = index[g.key]
        for content in dict.fromkeys(g.contents):
            first = owner.setdefault(content, gi)
            if first != gi and uf.find(first) != uf.find(gi):
                link_list.append((first, gi, {"kind": "same_content", "content": content}))
                uf.union(first, gi)
            elif first != gi:
                link_list.append((first, gi, {"kind": "same_content", "content": content}))
        if g.vectors is not None and len(g.vectors):
            vec_rows.append(np.asarray(g.vectors, dtype=np.float32).reshape(len(g.vectors), -1))
            vec_group.extend([gi] * len(g.vectors))
    near = 0
    search: dict[str, Any] = {"threshold": cosine, "vectors": len(vec_group)}
    if vec_rows and cosine <= 1.0:
        dims = {v.shape[1] for v in vec_rows}
        if len(dims) == 1:
            x = np.concatenate(vec_rows)
            # identical vectors (the same bytes reviewed twice) are joined without the search
            st = PairSearch()
            limit = EXACT_SEARCH_LIMIT if exact_limit is None else exact_limit
            pairs = near_duplicate_pairs(x, cosine, exact_limit=limit, seed=seed,
                                         cells=cells, stats=st)
            search.update(method=st.method, structure=st.structure, cells=st.cells,
                          probes=st.probes)
            vg = np.asarray(vec_group, dtype=np.int64)
            for a, b in pairs:
                ga, gb = int(vg[a]), int(vg[b])
                if ga == gb:
                    continue
                near += 1
                sim = float(np.dot(x[a], x[b]) / max(1e-12, float(np.linalg.norm(x[a]) *
                                                                  np.linalg.norm(x[b]))))
                link_list.append((ga, gb, {"kind": "near_duplicate", "cosine": round(sim, 5)}))
                uf.union(ga, gb)
        else:
            search["skipped"] = f"mixed embedding dims {sorted(dims)}"
    members: dict[str, list[str]] = {}
    unit_of: dict[str, str] = {}
    root_id: dict[int, str] = {}
    for i, k in enumerate(keys):  # keys ascending: the first seen of a root is its smallest
        r = uf.find(i)
        uid = root_id.setdefault(r, k)
        unit_of[k] = uid
        members.setdefault(uid, []).append(k)
    held = set(holdout_projects)
    side: dict[str, Side] = {}
    for uid, m in members.items():
        side[uid] = side_of(uid, seed=seed, test_fraction=test_fraction,
                            validation_fraction=validation_fraction,
                            forced_test=any(key_project(k) in held for k in m))
    links: dict[str, list[dict[str, Any]]] = {}
    for a, b, info in link_list:
        uid = unit_of[keys[a]]
        links.setdefault(uid, []).append({"a": keys[a], "b": keys[b], **info})
    moved = [k for k, u in unit_of.items() if k != u and side_of(
        k, seed=seed, test_fraction=test_fraction, validation_fraction=validation_fraction,
        forced_test=key_project(k) in held) != side[u]]
    return Units(unit_of=unit_of, side=side, members=members, links=links,
                 moved_by_merge=sorted(moved), near_duplicate_pairs=near, search=search)


def content_keys(project: str, names: Iterable[str], shas: Mapping[str, str],
                 vectors: Mapping[str, np.ndarray] | None = None) -> tuple[str, ...]:
    """The content keys of a group's images: the ledger's SHA-256 where known, always the file
    name within its project, and the hash of the vector bytes where a vector is loaded."""
    out: list[str] = []
    for name in names:
        if name in shas:
            out.append(f"sha:{shas[name]}")
        out.append(f"file:{project}/{name}")
        if vectors is not None and name in vectors:
            raw = np.ascontiguousarray(np.asarray(vectors[name], dtype=np.float32))
            out.append(f"vec:{hashlib.sha256(raw.tobytes()).hexdigest()[:32]}")
    return tuple(out)
