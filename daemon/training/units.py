"""Leak-proof units and the three sides: train, validation, test.

A *unit* is the union (union-find) of every group, across all projects, that shares anything
that makes two groups the same evidence:

* an image content hash (the embedding ledger's SHA-256 of the file's bytes; where the ledger
  has none, the file name within its project, and the hash of the vector's bytes), so a group
  copied into a second project's DB, or the same files reviewed again under a new group_id,
  land in one unit;
* a near-duplicate image: cosine of the two embeddings >= ``training.near_duplicate_cosine``
  (default 0.97), found by :func:`near_duplicate_pairs`.

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

Side = Literal["train", "validation", "test"]
SIDES: tuple[Side, ...] = ("train", "validation", "test")
SPLIT_RULE = ("unit = union of groups sharing an image content hash or a near-duplicate "
              "embedding; u = sha256(f'{seed}:{smallest member key}') as a fraction; "
              "test if u < test_fraction or a member's project is in holdout_projects, "
              "validation if u < test_fraction + validation_fraction, else train")
EXACT_SEARCH_LIMIT = 20_000  # vectors: above this the search is LSH-bucketed (see below)
LSH_BITS = 20  # ~200k/2**20 random neighbours per bucket: few candidates per table
LSH_TABLES = 32  # so a pair at 0.97 is still missed with probability <= 1e-3
LARGE_BUCKET = 256  # members: above this a bucket is checked with a Gram matrix


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


def _lsh_codes(x: np.ndarray, seed: int, rows_per_chunk: int = 8192) -> np.ndarray:
    """``(n, LSH_TABLES)`` bucket codes: one matmul per row chunk hashes every table at once."""
    n, dim = x.shape
    rng = np.random.default_rng(seed)
    planes = rng.standard_normal((dim, LSH_TABLES * LSH_BITS)).astype(np.float32)
    weights = (1 << np.arange(LSH_BITS, dtype=np.int64))
    codes = np.empty((n, LSH_TABLES), dtype=np.int64)
    for s in range(0, n, rows_per_chunk):
        signs = (x[s:s + rows_per_chunk] @ planes) > 0
        codes[s:s + rows_per_chunk] = signs.reshape(-1, LSH_TABLES, LSH_BITS) @ weights
    return codes


def _bucket_pairs(order: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Every within-bucket pair of the sorted ``order`` as ``min*n + max`` keys, vectorised."""
    sizes = ends - starts
    pos = np.repeat(starts, sizes) + (np.arange(int(sizes.sum())) -
                                      np.repeat(np.cumsum(sizes) - sizes, sizes))
    after = np.repeat(ends, sizes) - pos - 1  # partners later in the same bucket
    a_pos = np.repeat(pos, after)
    b_pos = a_pos + 1 + (np.arange(int(after.sum())) - np.repeat(np.cumsum(after) - after, after))
    a, b = order[a_pos], order[b_pos]
    n = len(order)
    keys: np.ndarray = np.minimum(a, b) * n + np.maximum(a, b)
    return keys


def _check_keys(x: np.ndarray, keys: np.ndarray, threshold: float,
                chunk: int = 1 << 18) -> list[np.ndarray]:
    """Exact cosine of candidate pairs (row-wise dot products, in chunks); keeps the true ones."""
    n = len(x)
    out: list[np.ndarray] = []
    for s in range(0, len(keys), chunk):
        k = keys[s:s + chunk]
        a, b = k // n, k % n
        sims = np.einsum("ij,ij->i", x[a], x[b])
        hit = sims >= threshold
        if hit.any():
            out.append(np.stack([a[hit], b[hit]], axis=1))
    return out


def _lsh_pairs(x: np.ndarray, threshold: float, block: int, seed: int) -> list[np.ndarray]:
    """Candidates from ``LSH_TABLES`` sign-projection tables, each checked exactly.

    Buckets up to ``LARGE_BUCKET`` members (nearly all of them) enumerate their pairs in one
    vectorised step and all tables' candidates are deduplicated before one batched check;
    larger buckets (clustered data) are checked with a bucket-local Gram matrix instead of
    materialising their quadratic pair list."""
    n = len(x)
    codes = _lsh_codes(x, seed)
    out: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    pending_size = 0
    for t in range(LSH_TABLES):
        order = np.argsort(codes[:, t], kind="stable")
        sorted_codes = codes[order, t]
        starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
        ends = np.r_[starts[1:], n]
        sizes = ends - starts
        small = (sizes >= 2) & (sizes <= LARGE_BUCKET)
        if small.any():
            keys = _bucket_pairs(order, starts[small], ends[small])
            pending.append(keys)
            pending_size += len(keys)
        for s, e in zip(starts[sizes > LARGE_BUCKET], ends[sizes > LARGE_BUCKET], strict=True):
            members = np.sort(order[s:e])
            for b in range(0, len(members), block):
                out += _pairs_in_block(x, members[b:b + block], members[b:], threshold,
                                       upper_only=True)
        if pending_size > 1 << 23 or (t == LSH_TABLES - 1 and pending):
            out += _check_keys(x, np.unique(np.concatenate(pending)), threshold)
            pending, pending_size = [], 0
    return out


def near_duplicate_pairs(vectors: np.ndarray, threshold: float, *, block: int = 2048,
                         exact_limit: int = EXACT_SEARCH_LIMIT, seed: int = 0) -> np.ndarray:
    """``(k, 2)`` index pairs ``i < j`` whose cosine is >= ``threshold``.

    Rows are L2-normalised here.  Up to ``exact_limit`` vectors: blocked brute force (exact).
    Above: sign-random-projection LSH (``LSH_TABLES`` tables of ``LSH_BITS`` bits), every
    candidate checked exactly, so no false pair is ever returned; a true pair is missed with
    probability <= :func:`lsh_miss_bound` (9e-4 at 0.97).  Content-hash duplicates are joined
    separately and never depend on this search."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or len(x) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    found = _exact_pairs(x, threshold, block) if len(x) <= exact_limit \
        else _lsh_pairs(x, threshold, block, seed)
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(found).astype(np.int64)
    return np.unique(pairs, axis=0)


# -- units ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class GroupImages:
    """What unit building knows of one group: its key and each image's content keys/vector."""

    key: str  # group_key(project, group_id)
    contents: tuple[str, ...]  # content keys (sha256, "file:project/name", "vec:<hash>")
    vectors: np.ndarray | None = None  # (images, dim) float32, or None when not loaded


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

    def summary(self) -> dict[str, Any]:
        counts = {s: 0 for s in SIDES}
        for u in self.unit_of.values():
            counts[self.side[u]] += 1
        shared = self.shared_units()
        return {"groups": len(self.unit_of), "units": len(self.members),
                "groups_by_side": counts, "multi_group_units": len(shared),
                "groups_in_multi_group_units": sum(len(m) for m in shared.values()),
                "near_duplicate_pairs": self.near_duplicate_pairs,
                "moved_by_merge": len(self.moved_by_merge), "search": self.search}

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
                exact_limit: int = EXACT_SEARCH_LIMIT) -> Units:
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
            pairs = near_duplicate_pairs(x, cosine, exact_limit=exact_limit, seed=seed)
            search["method"] = "exact" if len(x) <= exact_limit else "lsh"
            if len(x) > exact_limit:
                search["miss_bound"] = lsh_miss_bound(cosine)
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
