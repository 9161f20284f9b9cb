"""Long fuzz sweep: seeded random graphs (tests/fuzz) through magnitude pruning, dead-unit
elimination and SNP, with a summary of failures and refusals by kind.

Seed s gives two graphs of the same draws: one with planted all-zero channels (magnitude asked for exactly
them, dead-units, SNP at 0.7) and one with planted zero, constant and dead channels (dead-units, SNP). A
failure is a broken property (inexact where exactness is promised, ONNX full check, interface, onnxruntime,
non-finite outputs, missed target) or an exception other than a GraphoptError (kind: where it was raised);
a refusal is a GraphoptError, allowed and counted. tests/test_fuzz.py checks the same properties on a
fixed derandomised hypothesis budget in CI.

    python bench/fuzz.py                                  # 10,000 seeds
    python bench/fuzz.py --examples 2000 --start 10000    # other seeds
    python bench/fuzz.py --time-limit 900                 # as many seeds as fit in 15 minutes
    python bench/fuzz.py --seed 193                       # one seed: its graphs as ONNX text and outcomes
    python bench/fuzz.py --save-failures out/fuzz         # each kind's first failing graph as .onnx
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz.builder import DEAD_UNITS, MAGNITUDE, Example, Planting, SeededChooser  # noqa: E402
from tests.fuzz.checks import Outcome, check_dead_units, check_magnitude, check_snp, describe  # noqa: E402
from tests.fuzz.graphs import build  # noqa: E402

Check = Callable[[Example], Outcome]
PLANS: list[tuple[str, Planting, tuple[Check, ...]]] = [
    ("zeros", MAGNITUDE, (check_magnitude, check_dead_units, check_snp)),
    ("zeros+constants+dead", DEAD_UNITS, (check_dead_units, check_snp)),
]


class Tally:
    def __init__(self) -> None:
        self.runs: Counter[tuple[str, str]] = Counter()
        self.pruned: Counter[tuple[str, str]] = Counter()
        self.refusals: Counter[tuple[str, str, str]] = Counter()
        self.failures: Counter[tuple[str, str, str]] = Counter()
        self.first: dict[tuple[str, str, str], tuple[int, str, Example]] = {}

    def add(self, seed: int, plan: str, example: Example, outcome: Outcome) -> None:
        key = (plan, outcome.method)
        self.runs[key] += 1
        if outcome.report is not None and outcome.report["macs_ratio"] < 1.0:
            self.pruned[key] += 1
        if outcome.refusal is not None:
            self.refusals[(*key, outcome.refusal.split(":")[0])] += 1
            self.first.setdefault((*key, "refusal " + outcome.refusal.split(":")[0]), (seed, outcome.refusal, example))
        if outcome.failure is not None:
            kind = (*key, outcome.failure[0])
            self.failures[kind] += 1
            self.first.setdefault(kind, (seed, outcome.failure[1], example))


def sweep(seeds: range, time_limit: float | None) -> tuple[Tally, int, float]:
    tally, start, done = Tally(), time.perf_counter(), 0
    for seed in seeds:
        if time_limit is not None and time.perf_counter() - start > time_limit:
            break
        for plan, planting, checks in PLANS:
            example = build(SeededChooser(seed), planting)
            for check in checks:
                tally.add(seed, plan, example, check(example))
        done += 1
        if done % 250 == 0:
            print(f"  {done} seeds, {len(tally.failures)} failure kinds, {time.perf_counter() - start:.0f} s",
                  flush=True)
    return tally, done, time.perf_counter() - start


def summary(tally: Tally, seeds: int, seconds: float) -> None:
    print(f"\n{seeds} seeds ({2 * seeds} graphs, {sum(tally.runs.values())} optimisations) in {seconds:.0f} s")
    print("\n| graphs | method | runs | MACs reduced | refused | failed |\n|---|---|---|---|---|---|")
    for key, runs in tally.runs.items():
        refused = sum(n for (plan, method, _), n in tally.refusals.items() if (plan, method) == key)
        failed = sum(n for (plan, method, _), n in tally.failures.items() if (plan, method) == key)
        print(f"| {key[0]} | {key[1]} | {runs} | {tally.pruned[key]} | {refused} | {failed} |")
    for title, counter, prefix in (("failures", tally.failures, ""), ("refusals", tally.refusals, "refusal ")):
        print(f"\n{title} by kind:" if counter else f"\nno {title}")
        if counter:
            print("| count | graphs | method | kind | first seed | detail |\n|---|---|---|---|---|---|")
        for (plan, method, kind), count in counter.most_common():
            seed, detail, _ = tally.first[(plan, method, prefix + kind)]
            print(f"| {count} | {plan} | {method} | {kind} | {seed} | {detail[:140]} |")


def save_failures(tally: Tally, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for number, ((plan, method, kind), count) in enumerate(tally.failures.most_common()):
        seed, detail, example = tally.first[(plan, method, kind)]
        stem = folder / f"{number:02d}_{method}_seed{seed}"
        onnx.save_model(example.model, f"{stem}.onnx")
        Path(f"{stem}.txt").write_text(f"{method}: {kind}: {detail}\n{describe(example)}\n")
    print(f"\nfirst failing graph of each kind saved under {folder}")


def show_seed(seed: int) -> None:
    for plan, planting, checks in PLANS:
        example = build(SeededChooser(seed), planting)
        print(f"--- seed {seed}, planted {plan}\n{describe(example)}")
        for check in checks:
            outcome = check(example)
            state = outcome.failure or outcome.refusal or f"ok, MACs ratio {outcome.report['macs_ratio']:.4f}"
            print(f"{outcome.method}: {state}")


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10_000, help="number of seeds (default 10,000)")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--time-limit", type=float, default=None, help="stop starting seeds after this many seconds")
    parser.add_argument("--seed", type=int, default=None, help="show one seed's graphs and outcomes")
    parser.add_argument("--save-failures", type=Path, default=None, metavar="DIR")
    args = parser.parse_args()
    if args.seed is not None:
        show_seed(args.seed)
        return
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"numpy {np.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}")
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    tally, seeds, seconds = sweep(range(args.start, args.start + args.examples), args.time_limit)
    summary(tally, seeds, seconds)
    if args.save_failures is not None and tally.failures:
        save_failures(tally, args.save_failures)


if __name__ == "__main__":
    main()
