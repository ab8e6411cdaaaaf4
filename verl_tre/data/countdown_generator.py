"""Seeded generator of unique, solvable Countdown instances, each with one verified solution.

Numbers are drawn uniformly from ``[min_number, max_number]`` (3 or 4 of them, like the reference dataset's
generator); the target is drawn uniformly among the integers in ``[min_target, max_target]`` the numbers can
reach with + - * / using each exactly once. Instances are unique as (multiset of numbers, target).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from verl_tre.data.countdown_solver import reachable
from verl_tre.utils.reward_score.countdown import evaluate_equation


@dataclass(frozen=True)
class CountdownInstance:
    """``numbers`` in prompt order, the integer ``target``, and an equation ``solution`` reaching it."""

    numbers: tuple[int, ...]
    target: int
    solution: str


def _verified(numbers: tuple[int, ...], target: int, solution: str) -> CountdownInstance:
    result = evaluate_equation(solution)
    if result is None or result[0] != target or Counter(result[1]) != Counter(numbers):
        raise AssertionError(f"solver produced a wrong solution {solution!r} for {numbers} -> {target}")
    return CountdownInstance(numbers, target, solution)


def generate_countdown(
    num_instances: int,
    *,
    seed: int = 0,
    num_numbers: Sequence[int] = (3, 4),
    min_number: int = 1,
    max_number: int = 100,
    min_target: int = 1,
    max_target: int = 100,
    progress: bool = True,
) -> list[CountdownInstance]:
    """``num_instances`` distinct solvable instances, the same list for the same arguments.

    Raises ValueError on inconsistent ranges, or when the ranges hold too few distinct solvable instances.
    """
    if num_instances < 0:
        raise ValueError(f"num_instances must be >= 0, got {num_instances}")
    if not num_numbers or min(num_numbers) < 2:
        raise ValueError(f"num_numbers must list counts >= 2 (e.g. (3, 4)), got {tuple(num_numbers)}")
    if not 0 <= min_number <= max_number or min_target > max_target:
        raise ValueError(
            f"need 0 <= min_number <= max_number and min_target <= max_target, got numbers "
            f"[{min_number}, {max_number}], targets [{min_target}, {max_target}]"
        )
    rng = random.Random(seed)
    seen: set[tuple[tuple[int, ...], int]] = set()
    instances: list[CountdownInstance] = []
    # Collisions are rare with the default ranges; tiny ranges can run out of distinct instances.
    max_draws = 50 * num_instances + 1000
    with tqdm(total=num_instances, desc="generating Countdown", unit="instance", disable=not progress) as bar:
        for _ in range(max_draws):
            if len(instances) == num_instances:
                break
            numbers = tuple(rng.randint(min_number, max_number) for _ in range(rng.choice(list(num_numbers))))
            values = reachable(numbers)
            targets = sorted(
                int(v) for v in values if v.denominator == 1 and min_target <= v <= max_target
            )
            targets = [t for t in targets if (tuple(sorted(numbers)), t) not in seen]
            if not targets:
                continue
            target = rng.choice(targets)
            seen.add((tuple(sorted(numbers)), target))
            instances.append(_verified(numbers, target, values[target]))
            bar.update()
    if len(instances) < num_instances:
        raise ValueError(
            f"found only {len(instances)} distinct solvable instances in {max_draws} draws; "
            "widen the number or target ranges, or ask for fewer instances"
        )
    return instances
