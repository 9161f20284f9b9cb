"""Channel counts onnxruntime runs fastest: the multiple each group's kept count is rounded to.

`--round-to auto` (the default of every channel-pruning method) rounds each group to the block its
execution provider computes in; `--round-to N` forces N for every group, `--round-to 1` keeps exact counts.
What the blocks are, measured with onnxruntime 1.32 on CPU (`python bench/alignment.py`, table in README):

- Convolutions on x86 run in the NCHWc layout, blocked by 16 channels with AVX-512 and by 8 with AVX2: a
  convolution's time steps with its output channels rounded up to the block, so kept channels between two
  blocks cost MACs and buy no speed.
- A convolution (depthwise above all) whose channel count is not a multiple of 4 leaves the blocked layout
  and gets reorders around it: a depthwise 3x3 with 81, 90, 94 or 95 channels ran about 2x slower than with
  84, 92 or 96 (a multiple of 4 is padded to the block and runs at its speed).
- Below one block no cut pays: with 16 channels around it (56x56, 14x14 and 8x8 maps alike), a convolution
  with 8 or 12 channels ran 5-33% slower than with 16, and with 20-28 as slow as with 32.
- MatMul/Gemm: MLAS packs the weight in panels of 16 columns; time is nearly linear in the width, so the
  block costs little there and keeps widths on the packing boundary.
- CUDA: multiples of 8 (fp16 tensor cores).

So every group of at least one block rounds to the block (a 24-channel group keeps 16 or 24); a group
smaller than one block cannot reach the blocked layout and rounds to 4 (or its size).

Rounding never costs the target: under `auto`, when the block-rounded counts miss a MAC or latency target
by more than `TARGET_TOLERANCE` (coarse steps on a small model cut too far, or cannot cut enough), the groups
under two blocks (whose only cut is to one block) round to 4 first, then every multiple is capped at 8, 4, 2
and finally 1, the budget solved again each time; the coarsest that reaches the target is kept
(`coarsest_meeting`). A forced `--round-to N` is kept as given.

A group whose channels go in whole runs (GroupNorm's groups: `Group.granule`) always rounds to a multiple of
its run: the least common multiple of the run and the block where that leaves at least two steps, else the
run itself; relaxing never goes below the run.
"""

from __future__ import annotations

import functools
import math
import platform
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from graphopt.analysis.state import Group
from graphopt.passes.channels.budget import CostModel
from graphopt.errors import OptionError

# the rounding of groups smaller than one block
MIN_BLOCK = 4
CUDA_BLOCK = 8
# a MAC or latency target counts as reached within 2% (relative) of it
TARGET_TOLERANCE = 0.02
# the caps tried, in order, when block-rounded counts miss the target
FINER_CAPS = (8, 4, 2, 1)

Solution = TypeVar("Solution")


def parse_round_to(text: str) -> str | int:
    """'auto' or a positive integer, as `--round-to` takes it."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise OptionError(f"--round-to expects 'auto' or a positive integer, got '{text}'") from None
    if value < 1:
        raise OptionError(f"--round-to must be >= 1, got {value}")
    return value


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


@functools.lru_cache(maxsize=1)
def cpu_block() -> int:
    """The NCHWc block of this CPU: 16 with AVX-512, 8 with AVX2, else the minimum of 4."""
    flags = _cpu_flags()
    if "avx512f" in flags:
        return 16
    if "avx2" in flags or platform.machine().lower() in ("x86_64", "amd64") and not flags:
        return 8
    return MIN_BLOCK


def provider_block(device: str) -> int:
    """The block of the execution provider the model is meant for."""
    return CUDA_BLOCK if device == "cuda" else cpu_block()


def group_block(group: Group, block: int) -> int:
    """The multiple `group` rounds to: the provider's block, or 4 where the group is smaller than one block."""
    return block if group.size >= block else min(MIN_BLOCK, group.size)


def with_run(multiple: int, run: int, size: int) -> int:
    """`multiple` made a multiple of a group's `run` (its granule): their least common multiple where the
    group's `size` holds two of it, else the run."""
    if run <= 1:
        return multiple
    merged = math.lcm(multiple, run)
    return merged if 2 * merged <= size else run


def group_multiples(round_to: str | int, groups: list[Group], device: str = "cpu") -> dict[int, int]:
    """The multiple each group's kept count is rounded to under `round_to` ('auto' or N)."""
    if round_to == "auto":
        block = provider_block(device)
        return {group.root: with_run(group_block(group, block), group.granule, group.size) for group in groups}
    step = parse_round_to(str(round_to))
    assert isinstance(step, int)
    return {group.root: with_run(step, group.granule, group.size) for group in groups}


def pass_multiples(option: str | int | None, groups: list[Group], device: str | None) -> dict[int, int]:
    """`group_multiples` from a pass's options (no `round_to` given: exact counts)."""
    return group_multiples(1 if option is None else option, groups, device or "cpu")


def sizes_of(groups: list[Group]) -> dict[int, int]:
    """Each group's channel count, by root: what `coarsest_meeting` relaxes the small groups by."""
    return {group.root: group.size for group in groups}


def runs_of(groups: list[Group]) -> dict[int, int]:
    """Each group's run (granule) where it has one above 1, by root: the floor `coarsest_meeting` keeps."""
    return {group.root: group.granule for group in groups if group.granule > 1}


def finer_multiples(multiples: dict[int, int], sizes: dict[int, int] | None = None,
                    runs: dict[int, int] | None = None) -> Iterator[dict[int, int]]:
    """`multiples`; then, with the groups' `sizes`, the same with groups under two of their multiples
    rounding to `MIN_BLOCK`; then that capped at each of `FINER_CAPS` (each distinct step once, down to
    exact counts); a group with a run (`runs`, with its size) never goes below a multiple of it."""
    runs = runs or {}

    def floored(step: dict[int, int]) -> dict[int, int]:
        return {root: with_run(m, runs[root], (sizes or {}).get(root, 0)) if root in runs else m
                for root, m in step.items()}

    last = dict(multiples)
    yield last
    small = {root: min(multiple, MIN_BLOCK) for root, multiple in multiples.items()
             if sizes is not None and root in sizes and sizes[root] < 2 * multiple}
    capped = {**multiples, **small}  # what the caps apply to
    if small and floored(capped) != last:
        last = floored(capped)
        yield last
    for cap in FINER_CAPS:
        step = floored({root: min(multiple, cap) for root, multiple in capped.items()})
        if step != last:
            yield step
            last = step


def coarsest_meeting(option: str | int | None, multiples: dict[int, int], solve: Callable[[dict[int, int]], Solution],
                     ratio: Callable[[Solution], float], target: float, sizes: dict[int, int] | None = None,
                     runs: dict[int, int] | None = None) -> tuple[Solution, dict[int, int]]:
    """The budget solved (`solve(multiples)`) under the coarsest multiples (`finer_multiples`, with the
    groups' `sizes` and `runs`) whose cost `ratio` lies within `TARGET_TOLERANCE` of `target` (relative, either side:
    coarse minimum counts can also stay above it), with those multiples; when none does, the closest
    solution. Only `--round-to auto` is relaxed: a forced N is solved once, as given."""
    if option != "auto":
        return solve(multiples), multiples
    closest: tuple[Solution, dict[int, int], float] | None = None
    for step in finer_multiples(multiples, sizes, runs):
        solution = solve(step)
        reached = ratio(solution)
        miss = abs(reached - target) / target if target > 0 else reached
        if miss <= TARGET_TOLERANCE:
            return solution, step
        if closest is None or miss < closest[2]:
            closest = (solution, step, miss)
    assert closest is not None
    return closest[0], closest[1]


def cost_ratio(model: CostModel, counts: dict[int, int]) -> float:
    """The cost of `counts` as a fraction of the unpruned cost (1.0 for a model that costs nothing)."""
    return model.cost(counts) / model.total if model.total else 1.0


def multiple_stats(multiples: dict[int, int], blocks: dict[int, int]) -> dict[str, int | bool]:
    """What a pass reports of the multiples its counts were rounded to (largest and smallest over groups),
    and whether auto rounding had to relax them below `blocks` (the multiples it started from) to reach
    the target: counts off the provider's blocks can run slower than the original."""
    if not multiples:
        return {}
    return {"channel_multiple_max": max(multiples.values()), "channel_multiple_min": min(multiples.values()),
            "rounding_relaxed": multiples != blocks}
