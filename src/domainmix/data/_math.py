"""The generated ``math`` domain: arithmetic and school algebra, one worked problem per line.

Every problem occurs once in the whole stream: the generator remembers the problems it has written and
draws again on a repeat, so however the builder splits the documents, no test problem is also a training
problem (version 1 repeated them: 38 % of the test lines were training lines). Document ``i`` depends on
``(seed, i)`` and the documents before it (its own ``random.Random``, seeded with a string, which Python
hashes with SHA-512, so the text is the same on every platform and Python version), so a bigger corpus
extends a smaller one instead of reshuffling it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from fractions import Fraction

__all__ = [
    "GENERATOR_VERSION",
    "MAX_REDRAWS",
    "PROBLEMS_PER_DOCUMENT",
    "MathExhaustedError",
    "math_document",
    "math_documents",
]

PROBLEMS_PER_DOCUMENT = 40
# Bump when the templates or the drawing change: the same seed then gives other text. 2: no repeats.
GENERATOR_VERSION = 2
# Draws in a row that may repeat earlier problems before the stream gives up. The templates hold about
# 2 million distinct problems; a 3 MB domain uses about 100,000 of them, where a draw repeats with
# probability < 0.1, so 1,000 repeats in a row means the space is used up, not bad luck.
MAX_REDRAWS = 1000


class MathExhaustedError(RuntimeError):
    """The generator has no new problems left for a stream this long."""


def math_documents(seed: int) -> Iterator[tuple[str, str]]:
    """Endless ``(doc_id, text)`` pairs: ``("000000", ...)``, ``("000001", ...)``, ..., no problem twice.

    Raises:
        MathExhaustedError: (while iterating) the templates ran out of distinct problems.
    """
    seen: set[str] = set()
    index = 0
    while True:
        yield f"{index:06d}", _document(seed, index, seen)
        index += 1


def math_document(seed: int, index: int) -> str:
    """Document ``index`` of the stream for ``seed``.

    The documents before it are generated too: they decide which problems are already taken.
    """
    for number, (_, text) in enumerate(math_documents(seed)):
        if number == index:
            return text
    raise AssertionError("unreachable: the stream is endless")  # pragma: no cover


def _document(seed: int, index: int, seen: set[str]) -> str:
    rng = random.Random(f"domainmix-math-v{GENERATOR_VERSION}:{seed}:{index}")
    lines: list[str] = []
    repeats = 0
    while len(lines) < PROBLEMS_PER_DOCUMENT:
        line = rng.choice(_TEMPLATES)(rng)
        if line in seen:
            repeats += 1
            if repeats > MAX_REDRAWS:
                raise MathExhaustedError(
                    f"The math generator found no new problem in {MAX_REDRAWS} draws after {len(seen):,} "
                    "problems; build a smaller math domain (max_bytes_per_domain)."
                )
            continue
        repeats = 0
        seen.add(line)
        lines.append(line + "\n")
    return "".join(lines)


def _arithmetic(rng: random.Random) -> str:
    op = rng.choice("+-*")
    a, b = rng.randint(2, 999), rng.randint(2, 999 if op != "*" else 99)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"Compute {a} {op} {b} = {value}."


def _division(rng: random.Random) -> str:
    b = rng.randint(2, 30)
    q, r = rng.randint(2, 99), rng.randint(0, b - 1)
    a = b * q + r
    return f"Divide {a} by {b}: {a} = {b} * {q} + {r}."


def _two_steps(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 60), rng.randint(2, 60), rng.randint(2, 12)
    if rng.random() < 0.5:
        return f"Compute ({a} + {b}) * {c} = {a + b} * {c} = {(a + b) * c}."
    return f"Compute {a} * {c} - {b} = {a * c} - {b} = {a * c - b}."


def _power(rng: random.Random) -> str:
    base = rng.randint(2, 12)
    exponent = rng.randint(2, 10 if base <= 3 else 4)
    return f"Compute {base}^{exponent} = {base**exponent}."


def _gcd_lcm(rng: random.Random) -> str:
    k = rng.randint(2, 12)
    a, b = k * rng.randint(2, 20), k * rng.randint(2, 20)
    if rng.random() < 0.5:
        return f"gcd({a}, {b}) = {math.gcd(a, b)}."
    return f"lcm({a}, {b}) = {math.lcm(a, b)}."


def _fraction(rng: random.Random) -> str:
    x = Fraction(rng.randint(1, 9), rng.randint(2, 12))
    y = Fraction(rng.randint(1, 9), rng.randint(2, 12))
    op = rng.choice("+-*")
    value = {"+": x + y, "-": x - y, "*": x * y}[op]
    return f"Compute {_frac(x)} {op} {_frac(y)} = {_frac(value)}."


def _linear_equation(rng: random.Random) -> str:
    a = rng.choice([n for n in range(-9, 10) if n != 0])
    x, b = rng.randint(-20, 20), rng.randint(-30, 30)
    return f"Solve {_poly([a, b])} = {a * x + b}. x = {x}."


def _expansion(rng: random.Random) -> str:
    p, q = rng.randint(-9, 9), rng.randint(-9, 9)
    return f"Expand ({_poly([1, p])})({_poly([1, q])}) = {_poly([1, p + q, p * q])}."


def _evaluate(rng: random.Random) -> str:
    coefficients = [rng.randint(1, 5), rng.randint(-9, 9), rng.randint(-9, 9)]
    x = rng.randint(-5, 5)
    value = sum(c * x ** (2 - i) for i, c in enumerate(coefficients))
    return f"If x = {x}, then {_poly(coefficients)} = {value}."


_TEMPLATES: tuple[Callable[[random.Random], str], ...] = (
    _arithmetic,
    _arithmetic,
    _division,
    _two_steps,
    _power,
    _gcd_lcm,
    _fraction,
    _fraction,
    _linear_equation,
    _linear_equation,
    _expansion,
    _evaluate,
)


def _frac(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _poly(coefficients: list[int]) -> str:
    """Highest degree first: ``[2, -3, 1]`` -> ``2x^2 - 3x + 1``; zero terms are left out."""
    degree = len(coefficients) - 1
    parts: list[str] = []
    for i, c in enumerate(coefficients):
        power = degree - i
        if c == 0:
            continue
        magnitude = abs(c)
        variable = "" if power == 0 else ("x" if power == 1 else f"x^{power}")
        body = f"{'' if magnitude == 1 and variable else magnitude}{variable}"
        if not parts:
            parts.append(f"-{body}" if c < 0 else body)
        else:
            parts.append(f"{'-' if c < 0 else '+'} {body}")
    return " ".join(parts) if parts else "0"
