"""Keep leaks out of the corpus: line normalisation, docstring stripping, near-duplicate documents.

Three rules, each in ``docs/algorithms.md`` §4.1:

- **Lines** are compared normalised: stripped, runs of whitespace collapsed to one space, case-folded;
  lines shorter than :data:`MIN_LINE_CHARS` after that are ignored (``return None``, ``}``, ``Exeunt.``
  recur in any text of their kind and say nothing about copied documents).
- **Docstrings** leave the ``code`` domain (:func:`strip_docstrings`), because the ``docs`` domain is made
  of them: the same text in both would let a model that trained on one be tested on the other.
- **Near-duplicate documents** are dropped within a domain (:class:`NearDuplicateFilter`): a document
  whose normalised text equals a kept one, or whose long lines are mostly lines of documents kept before
  it, adds no new text and would leak whichever split its pieces reach.
"""

from __future__ import annotations

import ast
import hashlib
import warnings
from collections.abc import Iterable, Iterator

__all__ = [
    "MIN_LINE_CHARS",
    "NEAR_DUPLICATE_CONTAINMENT",
    "NearDuplicateFilter",
    "line_keys",
    "normalize_line",
    "parse_python",
    "strip_docstrings",
]

MIN_LINE_CHARS = 20
# A document is a near duplicate when more than this share of its distinct long lines already occurs in
# the documents kept before it. Measured on the licence texts (docs/algorithms.md §4.1): their shares
# have no gap, and at 0.5 the legal test split kept 14 % training lines, at 0.3 8 %, the rest being
# shared clauses (BSD conditions, warranty disclaimers) rather than copied licences.
NEAR_DUPLICATE_CONTAINMENT = 0.3


def normalize_line(line: str) -> str:
    """``line`` stripped, inner whitespace runs collapsed to one space, case-folded."""
    return " ".join(line.split()).casefold()


def line_keys(text: str) -> Iterator[str]:
    """The normalised lines of ``text`` that have at least :data:`MIN_LINE_CHARS` characters, in order."""
    for line in text.split("\n"):
        key = normalize_line(line)
        if len(key) >= MIN_LINE_CHARS:
            yield key


class NearDuplicateFilter:
    """Decide, document by document in a fixed order, which ones add new text.

    A document is dropped when its whole normalised text (every line, short ones included) equals that of
    a kept document, or when more than ``containment`` of its distinct long lines (see :func:`line_keys`)
    occur in the kept documents. Comparing with the union of kept lines, not one document at a time, also
    catches a document stitched from several others, and costs one set look-up per line.

    Args:
        containment: the largest share of already-seen long lines a kept document may have, in [0, 1).
    """

    def __init__(self, containment: float = NEAR_DUPLICATE_CONTAINMENT) -> None:
        self.containment = containment
        self.dropped = 0
        self._texts: set[bytes] = set()
        self._lines: set[str] = set()

    def keep(self, text: str) -> bool:
        """Whether ``text`` is kept; a kept document's lines count against every later one."""
        normalised = "\n".join(normalize_line(line) for line in text.split("\n")).strip("\n")
        digest = hashlib.sha256(normalised.encode("utf-8")).digest()
        lines = set(line_keys(text))
        seen = len(lines & self._lines)
        if digest in self._texts or (lines and seen > self.containment * len(lines)):
            self.dropped += 1
            return False
        self._texts.add(digest)
        self._lines |= lines
        return True

    def filter(self, texts: Iterable[str]) -> Iterator[str]:
        """The kept texts of ``texts``, lazily, in order."""
        return (text for text in texts if self.keep(text))


def _docstring_nodes(tree: ast.Module) -> Iterator[tuple[ast.Expr, bool]]:
    """Every docstring statement, and whether it is the only statement of its body.

    A docstring is what :func:`ast.get_docstring` reads (and ``docs`` extracts): a string constant as the
    first statement of a module, class or function.
    """
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, kinds) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                yield first, len(node.body) == 1 and not isinstance(node, ast.Module)


def parse_python(source: str) -> ast.Module | None:
    """``ast.parse(source)``, or ``None`` when it does not parse; syntax warnings silenced."""
    with warnings.catch_warnings():  # old escape sequences in some stdlib files warn on parse
        warnings.simplefilter("ignore", SyntaxWarning)
        try:
            return ast.parse(source)
        except (SyntaxError, ValueError):  # ValueError: a null byte in the source
            return None


def strip_docstrings(source: str) -> str | None:
    """``source`` without its module, class and function docstrings, still valid Python.

    A docstring's lines are removed; a class or function whose body was only a docstring gets ``pass`` in
    its place, so the code still parses; a statement after ``;`` on the docstring's line stays. Every other
    byte (comments, blank lines, other strings) is kept.

    Args:
        source: Python source text with Unix line ends.

    Returns:
        The stripped source, or ``None`` when ``source`` does not parse under the running interpreter (its
        docstrings cannot be located, so it cannot join the ``code`` domain without them) or, as a guard,
        when the stripped text would not parse.
    """
    tree = parse_python(source)
    if tree is None:
        return None
    lines = [line.encode("utf-8") for line in source.split("\n")]  # ast offsets count UTF-8 bytes
    spans = sorted(
        ((node.lineno - 1, node.col_offset, node.end_lineno or node.lineno, node.end_col_offset, only)
         for node, only in _docstring_nodes(tree)),
        reverse=True,
    )  # fmt: skip
    for start, start_col, end_line, end_col, only in spans:  # last first: earlier offsets stay valid
        end = end_line - 1
        prefix, suffix = lines[start][:start_col], lines[end][end_col or 0 :]
        rest = suffix.lstrip()
        if rest.startswith(b";"):  # `"""doc"""; x = 1`: the next statement takes the docstring's place
            suffix = rest[1:].lstrip()
        elif rest and not rest.startswith(b"#"):
            return None  # a continuation or other layout not worth guessing: refuse the file, never break it
        body = b"pass" if only else b""  # a comment left after it is no statement
        joined = prefix + body + (b" " + suffix if body and suffix else suffix)
        lines[start : end + 1] = [joined] if joined.strip() else []
    stripped = b"\n".join(lines).decode("utf-8")
    return stripped if parse_python(stripped) is not None else None
