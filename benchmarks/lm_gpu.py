"""The language-model comparison at a larger size on one GPU: both settings, several seeds, one command.

Recipe: on a machine with one CUDA GPU, from the repository root,

    domainmix data build-corpus --out runs/corpus --bpe 4096     # on a machine with the registries
    python benchmarks/lm_gpu.py --corpus runs/corpus --out runs/lm-gpu --json

runs ``domainmix run lm --compare --seeds 0,1,2`` twice with the GPU configuration below (bfloat16
autocast): the universal setting and the out-of-domain setting with ``drama`` held out. As each setting
ends it writes, under ``--out``, the setting's runs with their ``paired.json``, its summary
(``experiments/lm_report.py``) as ``<setting>.json`` and the whole ``summary.json``; it prints (or, with
``--json``, writes as JSON) each setting's wall time and paired differences to uniform.
``--device cpu --smoke`` runs the same code path at a toy size on the CPU (the test suite does).

The GPU configuration: block 256, batch 64 windows (16,384 tokens) per step, a 4 × 256 reference and
proxies and a 6 × 384 base (about 12.2 M parameters with the 4,096-token vocabulary), 500 steps per
stage with 25 warm-up steps (each base sees about 8.2 M tokens, 1.6 epochs of the training splits),
every training and evaluation window. On one H100 (2026-11-27) both settings took 360 s; the results
are ``docs/results/lm-gpu-h100*.json`` and the tables in docs/language-models.md. The first size,
32 windows × 1,000 steps (the same tokens), took about 12 minutes, with every stage bound by the host at
12-15 ms a step whatever the model size: half the steps of twice the windows halved the time.

Usage: python benchmarks/lm_gpu.py [--corpus DIR] [--out DIR] [--device cuda|auto|cpu] [--seeds 0,1,2]
       [--target drama] [--smoke] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from domainmix._atomic import atomic_write_json
from domainmix.experiments import lm, lm_report
from domainmix.experiments.config import LmConfig

GPU = {
    "block_size": 256, "batch_size": 64, "proxy_steps": 500, "base_steps": 500, "proxy_layers": 4,
    "proxy_width": 256, "base_layers": 6, "base_width": 384, "lr": 1e-3, "warmup_steps": 25,
    "train_windows": 0, "eval_windows": 0, "amp": True,
}  # fmt: skip
SMOKE = {
    "block_size": 32, "batch_size": 12, "proxy_steps": 6, "base_steps": 6, "proxy_layers": 1,
    "proxy_width": 32, "base_layers": 1, "base_width": 32, "train_windows": 16, "eval_windows": 4,
    "tokenizer": "bytes",
}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both settings, each over the seeds; wall time and paired differences per setting."""
    base = replace(LmConfig(), corpus=str(args.corpus), device=args.device, **(SMOKE if args.smoke else GPU))
    seeds = [int(s) for s in args.seeds.split(",")]
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if lm.device_for(base).type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "config": asdict(base),
        "seeds": seeds,
        "settings": {},
    }
    for label, target in (("universal", ""), (f"out_of_domain_{args.target}", args.target)):
        cfg = replace(base, target_domain=target)
        start = time.perf_counter()
        result = lm.compare_seeds(cfg, Path(args.out) / label, seeds)
        out["settings"][label] = {
            "wall_seconds": time.perf_counter() - start,
            "log_perplexity_minus_uniform": result["log_perplexity_minus_uniform"],
        }
        # Written as each setting ends, so a run cut short keeps its finished settings.
        summary = lm_report.summarize(Path(args.out) / label, f"python benchmarks/lm_gpu.py ({label})")
        atomic_write_json(Path(args.out) / f"{label}.json", summary, indent=1, allow_nan=False)
        atomic_write_json(Path(args.out) / "summary.json", out, indent=1, allow_nan=False)
        print(lm.format_paired(result), file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("runs/corpus"))
    parser.add_argument("--out", type=Path, default=Path("runs/lm-gpu"))
    parser.add_argument("--device", choices=["cuda", "auto", "cpu"], default="cuda")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--target", default="drama", help="the held-out domain of the out-of-domain setting")
    parser.add_argument("--smoke", action="store_true", help="toy sizes (for a CPU check of the code path)")
    parser.add_argument("--json", action="store_true", help="write the summary as JSON to stdout")
    args = parser.parse_args(argv)
    summary = run(args)
    text = json.dumps(summary, indent=1, allow_nan=False)
    print(text if args.json else json.dumps(summary["settings"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
