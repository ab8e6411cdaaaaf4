"""A Countdown-like task small enough for a CPU: three digits, a target, and a required reasoning segment.

Prompt:    "3,7,9>30"                       (numbers, then the target)
Response:  "<block>;<block>;...|<answer>"   then <eos>
A block writes one attempt as two steps, "3*7=21,21+9=30"; the answer is "(a o b) o c". The horizon is the
number of blocks the reasoning segment must hold: the supervised examples write a solution and then check it
by writing it again, so a longer horizon means more sampled tokens per response, most of them near-certain,
each a chance to draw a never-valid token. (Wrong attempts before the solution would be more realistic, but a
GRU this small forgets the prompt across them: accuracy fell from 17 % to 2 % in a probe.)

Reward (outcome only, like the Countdown reference): 1 iff the response ends with <eos> within the length
limit, the reasoning segment has exactly the horizon's number of well-formed blocks (their arithmetic is not
checked), and the answer uses each given number exactly once and evaluates exactly to the target.
"""

from __future__ import annotations

import ast
import itertools
import random
import re
from dataclasses import dataclass
from fractions import Fraction

OPS = "+-*/"
DIGITS = range(1, 10)
TARGETS = range(1, 100)
_BLOCK = r"\d+[-+*/]\d+=\d+,\d+[-+*/]\d+=\d+"
_ANSWER_CHARS = re.compile(r"^[0-9+\-*/()]+$")


@dataclass(frozen=True)
class Horizon:
    """Length setting: ``blocks`` reasoning blocks required, responses cut at ``max_response_len`` tokens."""

    name: str
    blocks: int
    max_response_len: int


# Longest block is 15 characters ("9*9=81,81*9=729"), the answer 9, plus separators and <eos>: the limits leave
# about 30 % slack over the longest well-formed response. Typical lengths: 22 and 47 tokens.
HORIZONS = {
    "short": Horizon("short", blocks=1, max_response_len=36),
    "long": Horizon("long", blocks=3, max_response_len=72),
}


@dataclass(frozen=True)
class Instance:
    nums: tuple[int, int, int]
    target: int

    def prompt(self) -> str:
        return ",".join(map(str, self.nums)) + ">" + str(self.target)


def _apply(x: int, op: str, y: int) -> int | None:
    """Integer result of one step, or None where the task forbids it (negative or inexact division)."""
    if op == "+":
        return x + y
    if op == "-":
        return x - y if x >= y else None
    if op == "*":
        return x * y
    return x // y if x % y == 0 else None


def attempts(nums: tuple[int, int, int]) -> list[tuple[str, str, int]]:
    """Every allowed two-step attempt on ``nums``: (block text, answer text, result)."""
    out = []
    for a, b, c in set(itertools.permutations(nums)):
        for o1, o2 in itertools.product(OPS, repeat=2):
            x = _apply(a, o1, b)
            y = None if x is None else _apply(x, o2, c)
            if y is not None:
                out.append((f"{a}{o1}{b}={x},{x}{o2}{c}={y}", f"({a}{o1}{b}){o2}{c}", y))
    return sorted(out)


def all_instances() -> list[Instance]:
    """Every (multiset of three digits, reachable target in 1..99) pair, in a fixed order."""
    found = []
    for nums in itertools.combinations_with_replacement(DIGITS, 3):
        reachable = sorted({y for _, _, y in attempts(nums) if y in TARGETS})
        found.extend(Instance(nums, t) for t in reachable)
    return found


def split(n_test: int = 256, seed: int = 0) -> tuple[list[Instance], list[Instance]]:
    """(train, test): a fixed shuffle of all instances, the first ``n_test`` held out. Independent of run seeds."""
    pool = all_instances()
    if not 0 < n_test < len(pool) // 2:
        raise ValueError(f"n_test must be in 1..{len(pool) // 2 - 1} (there are {len(pool)} instances), got {n_test}")
    random.Random(seed).shuffle(pool)
    return pool[n_test:], pool[:n_test]


def demonstration(inst: Instance, horizon: Horizon, rng: random.Random) -> str:
    """A supervised response: a random solution's block written ``horizon.blocks`` times, then its answer."""
    block, answer, _ = rng.choice([t for t in attempts(inst.nums) if t[2] == inst.target])
    return ";".join([block] * horizon.blocks) + "|" + answer


def _evaluate(expr: str) -> tuple[Fraction, list[int]] | None:
    """Exact value and the integer literals of an arithmetic expression, or None if it is not one."""
    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return None
    literals: list[int] = []
    binops = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__, ast.Div: Fraction.__truediv__}

    def walk(node) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in binops:
            return binops[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError("not + - * / over integers")

    try:
        return walk(tree), literals
    except (ValueError, ZeroDivisionError):
        return None


def score(inst: Instance, text: str, finished: bool, horizon: Horizon) -> float:
    """Outcome reward of a decoded response (text before <eos>); ``finished``: <eos> was produced in time."""
    if not finished or text.count("|") != 1:
        return 0.0
    think, answer = text.split("|")
    if not re.fullmatch(rf"{_BLOCK}(;{_BLOCK}){{{horizon.blocks - 1}}}", think):
        return 0.0
    if not _ANSWER_CHARS.match(answer):
        return 0.0
    result = _evaluate(answer)
    if result is None:
        return 0.0
    value, literals = result
    return float(value == inst.target and sorted(literals) == sorted(inst.nums))
