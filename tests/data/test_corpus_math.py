"""The generated math domain: deterministic, no problem twice, and every answer right."""

from __future__ import annotations

import re
from fractions import Fraction

from domainmix.data._math import PROBLEMS_PER_DOCUMENT, math_document, math_documents


def _value(expression: str, x: int | None = None) -> Fraction:
    """Evaluate the generator's notation exactly: ``3x^2 - 9x + 7``, ``(x + 3)(x - 2)``, ``7/12``."""
    code = expression.replace("^", "**").replace(")(", ")*(")
    code = re.sub(r"(\d)x", r"\1*x", code)
    code = re.sub(r"\d+", lambda m: f"F({m.group()})", code)
    return eval(code, {"F": Fraction, "x": Fraction(x) if x is not None else None})


def _check(line: str) -> str:
    if m := re.fullmatch(r"Compute (.+)\.", line):
        sides = [_value(side) for side in m.group(1).split(" = ")]
        assert len(set(sides)) == 1, line
        return "compute"
    if m := re.fullmatch(r"Divide (\d+) by (\d+): \1 = \2 \* (\d+) \+ (\d+)\.", line):
        a, b, q, r = map(int, m.groups())
        assert a == b * q + r and 0 <= r < b, line
        return "divide"
    if m := re.fullmatch(r"(gcd|lcm)\((\d+), (\d+)\) = (\d+)\.", line):
        import math

        assert getattr(math, m.group(1))(int(m.group(2)), int(m.group(3))) == int(m.group(4)), line
        return m.group(1)
    if m := re.fullmatch(r"Solve (.+) = (-?\d+)\. x = (-?\d+)\.", line):
        assert _value(m.group(1), int(m.group(3))) == int(m.group(2)), line
        return "solve"
    if m := re.fullmatch(r"Expand (.+) = (.+)\.", line):
        assert all(_value(m.group(1), x) == _value(m.group(2), x) for x in range(-3, 4)), line
        return "expand"
    if m := re.fullmatch(r"If x = (-?\d+), then (.+) = (-?\d+)\.", line):
        assert _value(m.group(2), int(m.group(1))) == int(m.group(3)), line
        return "evaluate"
    raise AssertionError(f"unrecognised problem: {line!r}")


def test_every_generated_answer_is_correct() -> None:
    kinds = set()
    for index in range(30):
        lines = math_document(7, index).splitlines()
        assert len(lines) == PROBLEMS_PER_DOCUMENT
        kinds.update(_check(line) for line in lines)
    assert kinds == {"compute", "divide", "gcd", "lcm", "solve", "expand", "evaluate"}


def test_documents_depend_on_seed_and_position() -> None:
    stream = math_documents(3)
    first = [next(stream) for _ in range(5)]
    assert [doc_id for doc_id, _ in first] == ["000000", "000001", "000002", "000003", "000004"]
    assert first[4][1] == math_document(3, 4)
    assert math_document(3, 4) != math_document(4, 4)
    # Pinned: a change to the templates must bump GENERATOR_VERSION.
    assert math_document(0, 0).splitlines()[0] == "lcm(8, 18) = 72."
