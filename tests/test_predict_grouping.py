"""The upstream's grouping rule, ported (daemon/predict/grouping.py): the documented examples,
the edge cases (gaps, repeats, 1 -> 3 jumps, out-of-order stages, unknown stages, lookahead),
and parity with a second, literal restatement of the upstream on thousands of file names built
from the data contract's naming patterns."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest

from daemon.predict.grouping import group_names, group_sorted, sort_names, stage_number

STAGE_NAMES = {1.0: "stage1_generated", 1.5: "stage1.5_face_swapped", 2.0: "stage2_upscaled",
               3.0: "stage3_enhanced"}


def name(ts: str, stage: float, ext: str = "png") -> str:
    return f"{ts}_{STAGE_NAMES[stage]}.{ext}"


def stages(groups: list[list[str]]) -> list[list[float]]:
    return [[stage_number(n) for n in g] for g in groups]


# -- a literal restatement of the upstream (find_consecutive_stage_groups and the sort before
# it), kept in the test so the port and this reading of the upstream must agree ----------------

def _upstream_stage(fname: str) -> float:
    low = fname.lower()
    if "stage1_generated" in low:
        detected = "stage1_generated"
    elif "stage1.5_face_swapped" in low:
        detected = "stage1.5_face_swapped"
    elif "stage2_upscaled" in low:
        detected = "stage2_upscaled"
    elif "stage3_enhanced" in low:
        detected = "stage3_enhanced"
    else:
        detected = "unknown"
    if "stage1_generated" in detected:
        return 1.0
    if "stage1.5" in detected:
        return 1.5
    if "stage2" in detected:
        return 2.0
    if "stage3" in detected:
        return 3.0
    return 0.0


def _upstream_sort(files: list[str]) -> list[str]:
    import re

    def key(f: str) -> tuple[str, float, str]:
        m = re.match(r"^(\d{8}_\d{6})", f)
        return (m.group(1) if m else "99999999_999999", _upstream_stage(f), f)

    return sorted(files, key=key)


def _upstream_groups(files: list[str], min_group_size: int = 2, lookahead: int = 50
                     ) -> list[list[str]]:
    def boundary(prev_stage: float, item: str) -> bool:
        return _upstream_stage(item) <= prev_stage  # time_gap_minutes=None: no time boundary

    groups: list[list[str]] = []
    n, i = len(files), 0
    while i < n:
        g = [files[i]]
        prev_s = _upstream_stage(files[i])
        i += 1
        while i < n:
            candidates = []
            k = i
            steps = 0
            while k < n and steps < lookahead and not boundary(prev_s, files[k]):
                s = _upstream_stage(files[k])
                if s > prev_s:
                    candidates.append((s, k))
                k += 1
                steps += 1
            if not candidates:
                break
            min_s = min(candidates, key=lambda t: t[0])[0]
            chosen_k = next(k for s, k in candidates if s == min_s)
            g.append(files[chosen_k])
            prev_s = min_s
            i = chosen_k + 1
        if len(g) >= min_group_size:
            groups.append(g)
    return groups


class TestDocumentedExamples:
    """The examples in the upstream's docstring and in the data contract."""

    def test_waits_for_stage2_instead_of_jumping_to_stage3(self) -> None:
        """Upstream docstring: 1, 3, 2 in one series groups as 1 -> 2 (no 1 -> 3 "stealing")."""
        files = [name("20250705_214520", 1), name("20250705_214521", 3),
                 name("20250705_214522", 2)]
        assert stages(group_sorted(files)) == [[1.0, 2.0]]
        assert group_sorted(files) == _upstream_groups(files)

    def test_same_timestamp_sorts_by_stage_and_groups_all_three(self) -> None:
        """The docstring's files with one timestamp sort 1, 2, 3 and form one group of three."""
        files = [name("20250705_214520", s) for s in (1, 3, 2)]
        assert stages(group_names(files)) == [[1.0, 2.0, 3.0]]

    def test_full_chain_of_four(self) -> None:
        """A group is 2-4 images of increasing stage (data contract): 1, 1.5, 2, 3."""
        files = [name(f"20250705_2145{20 + i}", s) for i, s in enumerate((1, 1.5, 2, 3))]
        assert stages(group_names(files)) == [[1.0, 1.5, 2.0, 3.0]]


class TestEdgeCases:
    """Gaps, repeats, jumps and unknown stages."""

    def test_gap_one_to_three_when_no_two_follows(self) -> None:
        """1 -> 3 is allowed when no 1.5 or 2 shows up before the series resets."""
        files = [name("20250705_100000", 1), name("20250705_100001", 3),
                 name("20250705_100002", 1), name("20250705_100003", 2)]
        assert stages(group_names(files)) == [[1.0, 3.0], [1.0, 2.0]]

    def test_repeat_stage_ends_the_run(self) -> None:
        """1, 2, 2, 3: the second 2 starts a new run, which takes the 3."""
        files = [name(f"20250705_10000{i}", s) for i, s in enumerate((1, 2, 2, 3))]
        assert stages(group_names(files)) == [[1.0, 2.0], [2.0, 3.0]]

    def test_single_images_form_no_group(self) -> None:
        """Lone stage-1 images (no later stage) are no group (min size 2)."""
        files = [name(f"20250705_10000{i}", 1) for i in range(3)]
        assert group_names(files) == []

    def test_out_of_order_timestamps_skip_the_passed_over_stage(self) -> None:
        """1 then 3 (earlier stamp than the 2) then 2: the 3 is passed over for good."""
        files = [name("20250705_100000", 1), name("20250705_100001", 3),
                 name("20250705_100002", 2), name("20250705_100003", 3)]
        assert stages(group_names(files)) == [[1.0, 2.0, 3.0]]

    def test_unknown_stage_and_no_timestamp(self) -> None:
        """Unknown stage is 0 (it can start a run and take the nearest stage above it, even
        from a name without a timestamp, which sorts last)."""
        files = ["20250705_100000_other.png", name("20250705_100001", 2), "x_stage1_generated.png",
                 "y_stage2_upscaled.png"]
        assert group_names(files) == _upstream_groups(_upstream_sort(files))
        assert group_names(files) == [["20250705_100000_other.png", "x_stage1_generated.png",
                                       "y_stage2_upscaled.png"]]

    def test_lookahead_limits_the_window(self) -> None:
        """The next stage is looked for at most ``lookahead`` files ahead."""
        files = [name("20250705_100000", 1)] + [name(f"20250705_1{i:05d}", 3)
                                                 for i in range(1, 4)]
        files = [files[0], *files[1:], name("20250705_200000", 2)]
        assert group_sorted(files, lookahead=2) == _upstream_groups(files, lookahead=2)
        assert group_sorted(files, lookahead=2) != group_sorted(files, lookahead=50)

    def test_case_and_extension_do_not_matter(self) -> None:
        """Stage labels match in any case; .jpg and .jpeg group with .png."""
        files = ["20250705_100000_STAGE1_GENERATED.JPG", "20250705_100001_stage2_upscaled.jpeg"]
        assert stages(group_names(files)) == [[1.0, 2.0]]


def contract_names(count: int, seed: int) -> list[str]:
    """File names from the data contract's patterns: YYYYMMDD_HHMMSS_<stage>.<ext>, each stage
    with its own stamp, runs with gaps, repeats, jumps, out-of-order stamps, unknown stages."""
    rng = random.Random(seed)
    t = datetime(2025, 7, 5, 21, 45, 20)
    out: list[str] = []
    order = [1.0, 1.5, 2.0, 3.0]
    while len(out) < count:
        chain = [s for s in order if rng.random() < 0.7] or [rng.choice(order)]
        if rng.random() < 0.1:
            chain.insert(rng.randrange(len(chain) + 1), rng.choice(order))  # a repeat
        if rng.random() < 0.15:
            rng.shuffle(chain)  # out of order
        for s in chain:
            t += timedelta(seconds=rng.choice((0, 0, 1, 2, 5, 60)))
            ext = rng.choice(("png", "png", "png", "jpg", "jpeg"))
            if rng.random() < 0.02:
                out.append(f"{t:%Y%m%d_%H%M%S}_unknown_variant.{ext}")
            out.append(f"{t:%Y%m%d_%H%M%S}_{STAGE_NAMES[s]}.{ext}")
        if rng.random() < 0.01:
            out.append(f"image_{len(out)}_stage2_upscaled.png")  # no timestamp
    rng.shuffle(out)  # listing order does not matter: both sort first
    return out[:count]


class TestParity:
    """trainingd's groups equal the upstream rule's groups on the same file list."""

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_parity_on_contract_names(self, seed: int) -> None:
        """On 2,500 contract-shaped names (gaps, repeats, out-of-order stages) both agree."""
        names = contract_names(2500, seed)
        ours = group_names(names)
        theirs = _upstream_groups(_upstream_sort(names))
        assert ours == theirs
        assert sort_names(names) == _upstream_sort(names)
        assert len(ours) > 300 and {len(g) for g in ours} >= {2, 3, 4}
