"""``domainmix run lm``: learn domain weights with a small proxy GPT, then train a base GPT with them.

Stages (each writes into ``--out``):

* ``reference``: a proxy-sized model trained with size-proportional sampling; its per-token losses on
  every training window are cached to ``reference_losses.npy`` (float16), so DoReMi's proxy step reads
  them instead of running a second model (the proxy step then costs what plain training costs).
* ``proxy --strategy doremi|doge``: the proxy samples domains uniformly and the strategy moves α, which
  reweights the loss (α/q); writes ``weights.json`` with the final and the time-averaged α by name.
  DoReMi needs ``--reference DIR`` (a reference stage's output).
* ``base --weights FILE|uniform|proportional``: a larger model samples domains with those weights and
  is evaluated per domain; writes ``metrics.json`` (validation and test perplexity per domain, their
  average and worst, tokens seen, wall time).
* ``base --weights dids|dids-flat|dids-inverted``: DIDS moves the base model's sampling weights online
  (``experiments/lm_dids.py``); ``dids`` and ``dids-inverted`` regroup the domains by gradient clusters
  on the reference stage's model (``--reference DIR``, its ``reference_model.pt``).
* ``--compare``: everything above, then a table of the base runs (uniform, proportional, DoReMi, DoGE on
  the same token budget, and the DIDS rows with ``compare_dids=true``) in ``comparison.json``.
  ``--reuse`` keeps every stage already in ``--out`` that was run with the same settings
  (:func:`finished_stage`): a comparison stopped part-way goes on, and new rows join finished ones.

Data: a corpus from ``domainmix data build-corpus`` (``--corpus DIR``), tokenized with its BPE
(``tokenizer="bpe"``, the default) or as bytes, cut into non-overlapping windows of ``block_size + 1``
tokens; a window is one example of its domain. Training draws from ``train_windows`` evenly spaced
windows per domain (the reference's loss cache covers them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from domainmix import DomainWeights, WeightingController, domain_losses, strategies, weighted_loss
from domainmix._atomic import atomic_path, atomic_write_json
from domainmix._validation import ConfigError
from domainmix.experiments.config import LmConfig, load_config, parse_overrides, parse_seeds
from domainmix.experiments.gpt import GPT, GPTConfig, per_token_loss
from domainmix.experiments.lm_report import plot_trajectories
from domainmix.experiments.methods import (
    ONLINE_METHODS,
    PROXY_METHODS,
    MethodContext,
    build_proxy,
    describe,
)
from domainmix.experiments.paired import paired_to_uniform
from domainmix.sampling import DomainBatchSampler
from domainmix.stats import (
    CancellationScores,
    GradientProductProbe,
    GradientProductTap,
    Probe,
    ReferenceLossProbe,
    StepLosses,
    statistics,
)

if TYPE_CHECKING:
    from domainmix.data import Corpus

TRAJECTORY_EVERY = 10  # steps between the recorded mixtures of the weights' trajectory
# Steps between reads of the non-finite-loss flag: reading it every step would make the host wait for
# the GPU every step. A stage whose loss went non-finite raises at the next read (nothing is written).
FINITE_CHECK_EVERY = 50


@dataclass
class Windows:
    """Token windows of one split: ``tokens[i]`` is window i (block_size + 1 tokens) of ``domain[i]``."""

    names: tuple[str, ...]
    tokens: torch.Tensor  # (N, block_size + 1): uint8 bytes or int32 BPE ids
    domain: torch.Tensor  # (N,) int64
    ranges: dict[str, range]
    sizes: dict[str, int]  # windows in each domain's whole split (the pool may hold fewer)


def load_windows(
    cfg: LmConfig, split: str, limit: int | None = None, domains: tuple[str, ...] | None = None
) -> Windows:
    """Cut each domain's ``split`` into windows (at most ``limit`` per domain, evenly spaced).

    ``domains`` selects and orders the domains (default: every domain of the corpus).
    """
    from domainmix.data import load_corpus

    names = load_corpus(cfg.corpus, verify=False).domains if domains is None else domains
    width = cfg.block_size + 1
    tokenizer = tokenizer_file(cfg)
    parts, ranges, sizes, start = [], {}, {}, 0
    for name in names:
        data = _tokens(cfg.corpus, name, split, None if tokenizer is None else str(tokenizer))
        n = len(data) // width
        if n == 0:
            raise ValueError(f"Domain {name!r} has fewer than {width} tokens in its {split} split.")
        rows = torch.from_numpy(data[: n * width].reshape(n, width).copy())
        if limit is not None and n > limit:
            rows = rows[torch.linspace(0, n - 1, limit).long()]
        parts.append(rows)
        ranges[name] = range(start, start + len(rows))
        sizes[name] = n
        start += len(rows)
    domain = torch.cat([torch.full((len(p),), i) for i, p in enumerate(parts)])
    return Windows(tuple(names), torch.cat(parts), domain, ranges, sizes)


TOKEN_CACHE = ".tokens"  # the folder, inside the corpus folder, of the encoded splits (see _encoded)
_TOKEN_FORMAT = "domainmix-bpe-ids-1"  # in the key with the tokenizers version: a new encoding, new files


@lru_cache(maxsize=64)  # every stage and seed of --compare reads the same splits: verify and encode once
def _tokens(corpus_dir: str, domain: str, split: str, tokenizer: str | None) -> np.ndarray:
    """One domain's split as tokens (the corpus's hashes checked), encoded once per process."""
    from domainmix.data import load_corpus

    corpus = load_corpus(corpus_dir)
    if domain not in corpus.domains:
        raise ValueError(
            f"The corpus {corpus_dir} has no domain {domain!r}; its domains: {list(corpus.domains)}."
        )
    if tokenizer is None:  # byte level: the file's bytes, nothing to encode
        return corpus.tokens(domain, split)
    return _encoded(corpus, domain, split, Path(tokenizer))


def _encoded(corpus: Corpus, domain: str, split: str, tokenizer: Path) -> np.ndarray:
    """BPE ids of one split, read from ``<corpus>/.tokens/`` when the same tokenizer encoded it before.

    Encoding is most of a stage's start (the default corpus: about 17 s on two cores; ``tokenizers``
    encodes one string on one thread), and every ``run lm`` process paid it. The file's name holds the
    SHA-256 of the split (the manifest's, which ``load_corpus`` checked) and of the tokenizer file, the
    ``tokenizers`` version and a format tag, so an edited split, another tokenizer or another encoder
    never reads ids encoded by something else. A corpus folder that cannot be written to is only slower
    (a warning says why).
    """
    from tokenizers import Tokenizer, __version__

    split_sha = corpus.manifest["domains"][domain]["splits"][split]["sha256"]
    spec = tokenizer.read_bytes()  # hashed and encoded with: a rewrite in between cannot mix the two
    fields = (_TOKEN_FORMAT, __version__, split_sha, hashlib.sha256(spec).hexdigest())
    key = hashlib.sha256(":".join(fields).encode()).hexdigest()[:24]
    path = corpus.root / TOKEN_CACHE / f"{domain}.{split}.{key}.npy"
    if path.is_file():
        try:
            ids = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # unreadable (an empty file: EOFError): encode again
            ids = None
        if ids is not None and ids.dtype == np.int32 and ids.ndim == 1:
            return ids
    ids = corpus.tokens(domain, split, Tokenizer.from_str(spec.decode("utf-8")))
    try:
        path.parent.mkdir(exist_ok=True)
        with atomic_path(path) as temporary, open(temporary, "wb") as handle:
            np.save(handle, ids, allow_pickle=False)
    except OSError as error:
        warnings.warn(
            f"run lm: could not keep the encoded {domain}/{split} in {path.parent}: {error}", stacklevel=2
        )
    return ids


def corpus_digest(cfg: LmConfig) -> str:
    """sha256 of what the stages read: the corpus's manifest and split files, and the tokenizer file.

    Recorded with every stage: ``--reuse`` keeps a stage only when the corpus it was trained on is the
    one at ``cfg.corpus`` now (the path alone says nothing of what lies there).
    """
    root = Path(cfg.corpus)
    files = [root / "manifest.json", *sorted(root.glob("*/*.txt"))]
    tokenizer = tokenizer_file(cfg)
    if tokenizer is not None:
        files.append(tokenizer)
    return _digest(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files), str(root))


@lru_cache(maxsize=8)
def _digest(files: tuple[tuple[str, int, int], ...], root: str) -> str:
    """The digest of ``files`` by their names under ``root`` and contents (cached by size and mtime)."""
    h = hashlib.sha256()
    for name, _, _ in files:
        h.update(os.path.relpath(name, root).encode() + b"\0")
        h.update(Path(name).read_bytes())
    return h.hexdigest()


def tokenizer_file(cfg: LmConfig) -> Path | None:
    """The BPE file of ``cfg`` (None for byte-level tokens).

    Raises:
        FileNotFoundError: naming the command that makes it, when the corpus has none.
    """
    if cfg.tokenizer == "bytes":
        return None
    from domainmix.data._tokenize import bpe_path

    path = bpe_path(cfg.corpus, cfg.bpe_vocab)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer='bpe' needs {path}: make it with `domainmix data train-bpe {cfg.corpus} "
            f"--vocab-size {cfg.bpe_vocab}` (or build the corpus with --bpe {cfg.bpe_vocab}), or set "
            "tokenizer=bytes."
        )
    return path


def vocab_size(cfg: LmConfig) -> int:
    """256 for bytes, else the BPE's vocabulary."""
    path = tokenizer_file(cfg)
    if path is None:
        return 256
    from domainmix.data import load_tokenizer

    return int(load_tokenizer(path).get_vocab_size())


def model_for(cfg: LmConfig, stage: str) -> GPT:
    """A fresh GPT of the stage's size (the base model is the larger one)."""
    layers, width = (
        (cfg.base_layers, cfg.base_width) if stage == "base" else (cfg.proxy_layers, cfg.proxy_width)
    )
    shape = GPTConfig(
        vocab_size=vocab_size(cfg), block_size=cfg.block_size, n_layer=layers, n_head=4, n_embd=width
    )
    return GPT(shape)


def training_domains(cfg: LmConfig) -> tuple[str, ...]:
    """Every domain of the corpus but the held-out ``target_domain`` (if any)."""
    from domainmix.data import load_corpus

    # The manifest's names only: the split files are verified where they are read (load_windows).
    domains = load_corpus(cfg.corpus, verify=False).domains
    if cfg.target_domain and cfg.target_domain not in domains:
        raise ValueError(
            f"target_domain {cfg.target_domain!r} is not a domain of {cfg.corpus}; "
            f"choose one of {list(domains)}."
        )
    return tuple(d for d in domains if d != cfg.target_domain)


def training_pool(cfg: LmConfig) -> Windows:
    """The training windows every stage draws from (``train_windows`` per training domain)."""
    return load_windows(cfg, "train", cfg.train_windows or None, training_domains(cfg))


def target_pool(cfg: LmConfig) -> Windows:
    """DoGE's target data: the held-out domain's training windows, or the training pool itself.

    With ``target_domain`` set, the out-of-domain target batches come from that domain's training
    split (its test split is for evaluation only); otherwise the universal target is a uniform mix of
    the training domains.
    """
    if cfg.target_domain:
        return load_windows(cfg, "train", cfg.train_windows or None, (cfg.target_domain,))
    return training_pool(cfg)


def device_for(cfg: LmConfig) -> torch.device:
    """The device of ``cfg.device`` (``auto``: CUDA when available).

    Raises:
        ValueError: for ``cuda`` when torch sees no CUDA device.
    """
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use device=cpu or device=auto.")
    return torch.device(cfg.device)


def precision(cfg: LmConfig, device: torch.device) -> AbstractContextManager[Any]:
    """bfloat16 autocast for the forwards on CUDA when ``cfg.amp``; nothing on the CPU."""
    if device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def window_losses(
    model: GPT, windows: Windows, chunk_size: int, cfg: LmConfig
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(window indices, their (n, block_size) float32 per-token losses on the CPU) over all ``windows``."""
    device = next(model.parameters()).device
    with torch.no_grad():
        for chunk in torch.arange(len(windows.domain)).split(chunk_size):
            seq = windows.tokens[chunk].long().to(device)
            with precision(cfg, device):
                per_token = per_token_loss(model(seq[:, :-1]), seq[:, 1:])
            yield chunk, per_token.float().cpu()


def evaluate(model: GPT, windows: Windows, cfg: LmConfig) -> dict[str, float]:
    """Per-domain perplexity exp(mean per-token loss) over ``windows``."""
    model.eval()
    losses = torch.zeros(len(windows.names), dtype=torch.float64)
    counts = torch.zeros_like(losses)
    for chunk, per_token in window_losses(model, windows, 64, cfg):
        reduced = domain_losses(per_token, windows.domain[chunk], len(losses))
        losses += reduced.sum
        counts += reduced.count
    model.train()
    return {name: math.exp(float(s / c)) for name, s, c in zip(windows.names, losses, counts, strict=True)}


class ScoreLog:
    """Every step's per-domain values of the statistics a strategy reads, from the controller's log.

    DoReMi's λ_i (``excess_loss``, the clipped excess loss its mirror step follows) and DoGE's W_i
    (``target_grad_dot``) with ``grad_sq_norm``: what the weights' trajectory is explained by. The
    training stream's own statistics (``loss``, ``count``) and matrices are left out.
    """

    def __init__(self, strategy: strategies.Strategy, names: tuple[str, ...]) -> None:
        table = statistics()
        self.names = names
        self.fields = sorted(
            n for n in strategy.requires if table[n].shape == ("k",) and table[n].source != "train"
        )
        self.steps: list[int] = []
        self.values: dict[str, dict[str, list[float]]] = {f: {n: [] for n in names} for f in self.fields}

    def record(self, entry: dict[str, Any]) -> None:
        """The controller's ``log`` callable: keep this update's values (a skipped window has none)."""
        if entry["skipped"] or not self.fields:
            return
        self.steps.append(int(entry["step"]))
        for field in self.fields:
            for name, value in zip(self.names, entry["stats"][field], strict=True):
                self.values[field][name].append(value)

    def as_dict(self) -> dict[str, Any]:
        """``{"step": [...], statistic: {domain: [...]}}``."""
        return {"step": self.steps, **self.values}


def domain_balance(domain: torch.Tensor, k: int) -> torch.Tensor:
    """(n,) row weights under which every domain present in a batch counts equally.

    Row r of domain d gets n / (k' · n_d), with k' the domains present and n_d domain d's rows, so the
    batch's mean loss is (1/k') Σ_d (mean loss of domain d): a uniform mix of the domains, whatever the
    sampler's rounding (a stratified batch of 32 windows over 6 domains has 6 of the first two domains
    and 5 of the others, every step).
    """
    counts = torch.bincount(domain, minlength=k).to(torch.float32)
    present = int((counts > 0).sum())
    return len(domain) / (present * counts[domain])


def probes_for(
    model: GPT, cfg: LmConfig, reference: np.ndarray | None, doge_tensors: list[str] | None
) -> tuple[list[Probe], GradientProductProbe]:
    """What a stage can observe: the cached reference losses (if any) and DoGE's gradient products.

    The products come from a :class:`GradientProductTap` on ``doge_tensors`` by name, by default the
    last block and the final LayerNorm (never the tied embedding); the tap is made only if the
    controller chooses the probe. Their target batch, drawn every step by a sampler of its own from
    :func:`target_pool`, is a uniform mix of the training domains (DoGE's universal mode, as the
    reference code runs it) or a batch of the held-out ``target_domain`` (out-of-domain mode); like the
    tap, that stream is made at the first target batch, so stages without DoGE never load it.
    """
    mix: tuple[Windows, Iterator[list[int]]] | None = None

    def make_tap() -> GradientProductTap:
        if doge_tensors is None:
            return GradientProductTap(model.blocks[-1], model.ln)
        params = dict(model.named_parameters())
        return GradientProductTap(model.blocks, model.ln, only=[params[n] for n in doge_tensors])

    def mix_losses() -> torch.Tensor:
        nonlocal mix
        if mix is None:
            windows = target_pool(cfg)
            sampler = DomainBatchSampler(
                windows.ranges,
                cfg.doge_target_batch or cfg.batch_size,
                dict.fromkeys(windows.names, 1.0),
                min_count=1,
                seed=cfg.seed + 1,  # a stream of its own: not the training batches
            )
            mix = (windows, iter(sampler))
        windows, batches = mix
        index = torch.as_tensor(next(batches))
        device = next(model.parameters()).device
        seq = windows.tokens[index].long().to(device)
        rows = domain_balance(windows.domain[index], len(windows.names)).to(device)
        return per_token_loss(model(seq[:, :-1]), seq[:, 1:]) * rows[:, None]

    products = GradientProductProbe(make_tap, max_norm=cfg.doge_max_norm, target=mix_losses)
    probes: list[Probe] = [products]
    if reference is not None:
        cache = reference

        def reference_losses(step: StepLosses) -> torch.Tensor:
            assert step.indices is not None  # the loop passes the batch's window indices
            return torch.from_numpy(cache[step.indices.numpy()].astype(np.float32))

        probes.append(ReferenceLossProbe(reference_losses))
    return probes, products


@dataclass
class Online:
    """What a strategy that moves the base model's sampling online adds to :func:`train` (DIDS).

    Attributes:
        probes: ``probes(model)``: the probes of its statistics, made on the model being trained.
        update_every: steps per round (the controller's window).
        initial: the starting weights by domain name (mixture and sampling alike).
        log: receives the controller's record of every round (after ``train``'s own score log).
        mode: the sampler's mode; ``low_discrepancy`` realises small weights of many groups without the
            rounding of a stratified batch (the loss multipliers α/q are then 1: plain resampling).
    """

    probes: Callable[[GPT], list[Probe]]
    update_every: int
    initial: dict[str, float]
    log: Callable[[dict[str, Any]], None]
    mode: str = "low_discrepancy"


def train(
    cfg: LmConfig,
    stage: str,
    strategy: strategies.Strategy,
    train_windows: Windows,
    steps: int,
    *,
    reference: np.ndarray | None = None,
    doge_tensors: list[str] | None = None,
    score_cancellation: bool = False,
    horizon: int | None = None,
    online: Online | None = None,
    sampler_mode: str = "stratified",
) -> tuple[GPT, WeightingController, dict[str, Any]]:
    """The training loop shared by every stage; the strategy and the statistics it reads differ.

    The controller chooses among :func:`probes_for`'s probes what the strategy reads (the reference
    losses for DoReMi, the gradient products for DoGE); the names of the tapped tensors go into the
    returned info as ``doge_subset``. ``score_cancellation`` tracks :class:`CancellationScores` of
    every block and final-LayerNorm tensor (the candidates of DoGE's parameter selection) into
    ``info["cancellation"]``. The learning rate decays over ``horizon`` steps (default ``steps``; a
    pre-run takes the first steps of a longer run). ``online`` adds an online strategy's probes,
    rounds, starting weights and sampler mode (:class:`Online`); otherwise ``sampler_mode`` is the
    sampler's mode (``stratified`` with every domain in every batch, or ``low_discrepancy``).
    ``info["achieved"]`` is each domain's share of the windows drawn.
    """
    torch.manual_seed(cfg.seed)
    names = train_windows.names
    device = device_for(cfg)
    model = model_for(cfg, stage).to(device)
    if online is None:  # stratified: every domain in every batch (min_count=1), as the proxies need
        sampler = DomainBatchSampler(
            train_windows.ranges,
            cfg.batch_size,
            min_count=1 if sampler_mode == "stratified" else 0,
            mode=sampler_mode,
            seed=cfg.seed,
        )
    else:
        sampler = DomainBatchSampler(
            train_windows.ranges, cfg.batch_size, online.initial, mode=online.mode, seed=cfg.seed
        )
    probes, products = probes_for(model, cfg, reference, doge_tensors)
    score_log = ScoreLog(strategy, names)
    sinks = [score_log.record]
    if online is not None:
        probes += online.probes(model)
        sinks.append(online.log)

    def log(entry: dict[str, Any]) -> None:
        for sink in sinks:
            sink(entry)

    controller = WeightingController(
        strategy,
        names if online is None else DomainWeights.create(names, [online.initial[n] for n in names]),
        update_every=1 if online is None else online.update_every,
        sampler=sampler,
        probes=probes,
        log=log,
    )
    # fused: one kernel for the whole update on CUDA (the step is launch-bound at these sizes)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=0.01, fused=device.type == "cuda"
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: lr_factor(t, horizon or steps, cfg.warmup_steps)
    )
    scores = CancellationScores(selection_candidates(model)) if score_cancellation else None
    start, tokens = time.perf_counter(), 0
    seen = torch.zeros(len(names), dtype=torch.int64)  # windows drawn per domain: the achieved mixture
    first_bad = torch.zeros((), dtype=torch.int64, device=device)  # first step with a non-finite loss
    trajectory: dict[str, Any] = {"step": [], "mixture": {n: [] for n in names}}
    bar = tqdm(total=steps, desc=stage, unit="step", file=sys.stderr, disable=None)  # off when not a TTY
    for step, batch in zip(range(steps), sampler, strict=False):
        index = torch.as_tensor(batch)
        seq, ids = train_windows.tokens[index].long().to(device), train_windows.domain[index].to(device)
        with precision(cfg, device), controller.record():  # the probes' target forward is inside too
            per_token = per_token_loss(model(seq[:, :-1]), seq[:, 1:])
        # α_t from this step's statistics weights this step's update (both reference codes).
        controller.step(per_token, ids, indices=index)
        loss = weighted_loss(per_token, ids, controller.loss_multipliers())
        first_bad = torch.where((first_bad == 0) & ~torch.isfinite(loss.detach()), step + 1, first_bad)
        if (step + 1) % FINITE_CHECK_EVERY == 0 or step + 1 == steps:
            if bad := int(first_bad):
                raise RuntimeError(f"{stage}: the training loss is not finite at step {bad} (of {steps}).")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if scores is not None:
            scores.update()
        schedule.step()
        tokens += seq[:, 1:].numel()
        seen += torch.bincount(train_windows.domain[index], minlength=len(names))
        bar.update()
        if (step + 1) % TRAJECTORY_EVERY == 0 or step + 1 == steps:
            trajectory["step"].append(step + 1)
            for name, value in zip(names, controller.weights.mixture.tolist(), strict=True):
                trajectory["mixture"][name].append(value)
    bar.close()
    info: dict[str, Any] = {}
    if products.tap is not None:
        chosen = {id(p) for p in products.tap.parameters()}
        info["doge_subset"] = [n for n, p in model.named_parameters() if id(p) in chosen]
    info.update(tokens_seen=tokens, train_seconds=time.perf_counter() - start, trajectory=trajectory)
    info["achieved"] = dict(zip(names, (seen / seen.sum().clamp_min(1)).tolist(), strict=True))
    if score_log.fields:
        info["scores"] = score_log.as_dict()
    if scores is not None:
        info["cancellation"] = scores
    return model, controller, info


def selection_candidates(model: GPT) -> list[tuple[str, torch.nn.Parameter]]:
    """The tensors DoGE's parameter selection chooses from: every block's and the final LayerNorm's.

    The reference code scores every tensor; the embeddings are left out here because the tied one mixes
    the input and output roles and :class:`GradientProductTap` takes Linear/LayerNorm layers only.
    """
    return [(n, p) for n, p in model.named_parameters() if n.startswith(("blocks.", "ln."))]


def lr_factor(t: int, steps: int, warmup: int) -> float:
    """The multiplier of ``lr`` at step t of ``steps``: linear warm-up, then cosine to 0.

    Shared by AdamW and DoGE's η_t, so DoGE's mirror step follows the proxy's own learning rate.
    """
    ramp = min(1.0, (t + 1) / warmup) if warmup > 0 else 1.0
    return ramp * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))


def stage_reference(cfg: LmConfig, out: Path) -> dict[str, Any]:
    """Train the reference model (size-proportional sampling) and cache its per-token training losses."""
    windows = training_pool(cfg)
    sizes = windows.sizes  # the domains' real sizes, not the pool's
    strategy = strategies.fixed(sizes, sizes)
    model, _, info = train(cfg, "reference", strategy, windows, cfg.proxy_steps)
    del info["trajectory"]  # fixed weights
    model.eval()
    start = time.perf_counter()
    cache = np.zeros((len(windows.domain), cfg.block_size), dtype=np.float16)
    for chunk, per_token in window_losses(model, windows, 128, cfg):
        cache[chunk.numpy()] = per_token.numpy().astype(np.float16)
    info["cache_seconds"] = time.perf_counter() - start  # one forward over the whole pool
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "reference_losses.npy") as tmp:
        np.save(tmp, cache)
    save_model(model, out / REFERENCE_MODEL)  # DIDS's gradient features come from it
    result = {"stage": "reference", "config": asdict(cfg), "corpus_digest": corpus_digest(cfg)}
    result.update(weights=sizes, **info)
    atomic_write_json(out / "reference.json", result, indent=1, allow_nan=False)
    return result


REFERENCE_MODEL = "reference_model.pt"


def save_model(model: GPT, path: Path) -> None:
    """Write the model's shape and weights (CPU tensors) to ``path``, atomically."""
    state = {"shape": asdict(model.cfg), "weights": {k: v.cpu() for k, v in model.state_dict().items()}}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_model(path: Path, device: torch.device | str = "cpu") -> GPT:
    """The model :func:`save_model` wrote, on ``device`` in eval mode.

    Raises:
        FileNotFoundError: naming the stage that writes it.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the reference stage (`--stage reference`) first.")
    state = torch.load(path, map_location=device, weights_only=True)
    model = GPT(GPTConfig(**state["shape"])).to(device)
    model.load_state_dict(state["weights"])
    return model.eval()


def stage_proxy(cfg: LmConfig, out: Path, strategy_name: str, reference_dir: Path | None) -> dict[str, Any]:
    """Train the proxy with a method of ``methods.PROXY_METHODS`` (DoReMi, DoGE); write its weights."""
    windows = training_pool(cfg)
    strategy = build_proxy(
        strategy_name,
        cfg,
        MethodContext(
            tuple(windows.sizes[n] for n in windows.names),
            learning_rate=lambda step: cfg.lr * lr_factor(step, cfg.proxy_steps, cfg.warmup_steps),
        ),
    )
    reference = None
    if "excess_loss" in strategy.requires:
        if reference_dir is None or not (reference_dir / "reference_losses.npy").exists():
            raise ValueError(
                f"--strategy {strategy_name} needs --reference DIR with a reference stage's "
                "reference_losses.npy."
            )
        reference = np.load(reference_dir / "reference_losses.npy", mmap_mode="r")
        if reference.shape != (len(windows.domain), cfg.block_size):
            raise ValueError(
                "The cached reference losses were made from another corpus, block_size or train_windows."
            )
    selection = None
    reads_products = any(statistics()[n].source == "gradient_products" for n in strategy.requires)
    if reads_products and cfg.doge_selection != 0:
        # "Train a fresh proxy normally" (reference code): the first steps of the proxy's own schedule.
        start = time.perf_counter()
        _, _, pre = train(
            cfg,
            "proxy",
            strategies.uniform(),
            windows,
            cfg.doge_selection_steps,
            score_cancellation=True,
            horizon=cfg.proxy_steps,
        )
        scores = pre["cancellation"]
        selection = {
            "count": cfg.doge_selection,
            "steps": scores.steps,
            "seconds": time.perf_counter() - start,  # the pre-run and its scoring
            "selected": scores.select(cfg.doge_selection),
            # +inf (a gradient but no move) is not JSON: written as null
            "scores": {n: v if math.isfinite(v) else None for n, v in scores.scores().items()},
        }
    _, controller, info = train(
        cfg,
        "proxy",
        strategy,
        windows,
        cfg.proxy_steps,
        reference=reference,
        doge_tensors=None if selection is None else selection["selected"],
    )
    averaged = controller.averaged_weights() or controller.weights  # None: the method never ran
    names = windows.names
    result = {
        "stage": "proxy",
        "strategy": strategy_name,
        "final": dict(zip(names, controller.weights.mixture.tolist(), strict=True)),
        "averaged": dict(zip(names, averaged.mixture.tolist(), strict=True)),
        "doge_subset": info.pop("doge_subset", None),
        "doge_selection": selection,
        "config": asdict(cfg),
        "corpus_digest": corpus_digest(cfg),
        **info,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "weights.json", result, indent=1, allow_nan=False)
    plot_trajectories({strategy_name: result}, out / "weights.png")
    return result


def stage_base(
    cfg: LmConfig,
    out: Path,
    weights: str,
    reference_dir: Path | None = None,
    partition_cache: Path | None = None,
) -> dict[str, Any]:
    """Train the base model by sampling with ``weights``; evaluate every domain.

    ``weights``: ``uniform``, ``proportional``, a proxy's ``weights.json``, or an online method of
    ``methods.ONLINE_METHODS`` (DIDS: ``experiments/lm_dids.py``; its repartition reads the reference
    stage's model from ``reference_dir`` and caches the partition at ``partition_cache``, by default
    ``out/partition.json``).
    """
    if weights in ONLINE_METHODS:
        from domainmix.experiments.lm_dids import train_dids

        cache = out / "partition.json" if partition_cache is None else partition_cache
        model, sampling, info = train_dids(cfg, weights, reference_dir, cache)
        return finish_base(cfg, out, weights, model, sampling, info)
    windows = training_pool(cfg)
    sizes = {n: float(v) for n, v in windows.sizes.items()}  # the domains' real sizes, not the pool's
    if weights == "uniform":
        alpha = dict.fromkeys(sizes, 1.0)
    elif weights == "proportional":
        alpha = sizes
    else:
        alpha = read_weights(Path(weights))
    # low_discrepancy: the batches realise the weights over the run (a stratified batch rounds B·q the
    # same way every step: uniform over 6 domains in 32 windows would give the first two 6/32 each).
    strategy = strategies.fixed(alpha, alpha)
    model, _, info = train(cfg, "base", strategy, windows, cfg.base_steps, sampler_mode="low_discrepancy")
    del info["trajectory"]  # fixed weights
    sampling = {n: v / sum(alpha.values()) for n, v in alpha.items()}
    return finish_base(cfg, out, weights, model, sampling, info)


def read_weights(path: Path) -> dict[str, float]:
    """The time-averaged weights of a proxy stage's ``weights.json``.

    Raises:
        ValueError: naming the path, when it cannot be read or is not such a file.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        message = f"--weights {path}: cannot read it as a proxy stage's weights.json ({error})"
        raise ValueError(message) from error
    averaged = data.get("averaged") if isinstance(data, dict) else None
    if not isinstance(averaged, dict) or not all(isinstance(v, (int, float)) for v in averaged.values()):
        raise ValueError(
            f"--weights {path}: not a proxy stage's weights.json (it needs an 'averaged' mapping from domain "
            "to weight)"
        )
    return {str(name): float(value) for name, value in averaged.items()}


def finish_base(
    cfg: LmConfig, out: Path, weights: str, model: GPT, sampling: dict[str, float], info: dict[str, Any]
) -> dict[str, Any]:
    """Evaluate a trained base model on every domain and write ``metrics.json``.

    ``sampling``: the share of each training domain in the batches (time-averaged for online methods).
    """
    # Every domain is evaluated, the held-out target domain (if any) included.
    validation = evaluate(model, load_windows(cfg, "validation", cfg.eval_windows or None), cfg)
    test = evaluate(model, load_windows(cfg, "test", cfg.eval_windows or None), cfg)
    trained = {n: v for n, v in test.items() if n != cfg.target_domain}
    log_test = {n: math.log(v) for n, v in test.items()}  # nats per token, token-weighted per domain
    trained_log = [log_test[n] for n in trained]
    result = {
        "stage": "base",
        "weights": weights,
        "target_domain": cfg.target_domain or None,
        "target_test_perplexity": test.get(cfg.target_domain) if cfg.target_domain else None,
        "target_test_log_perplexity": log_test.get(cfg.target_domain) if cfg.target_domain else None,
        "sampling": sampling,
        "validation_perplexity": validation,
        "test_perplexity": test,
        "average_test_perplexity": sum(trained.values()) / len(trained),
        "worst_test_perplexity": max(trained.values()),
        "test_log_perplexity": log_test,
        "average_test_log_perplexity": sum(trained_log) / len(trained_log),
        "worst_test_log_perplexity": max(trained_log),
        "parameters": model.num_parameters(),
        "config": asdict(cfg),
        "corpus_digest": corpus_digest(cfg),
        **info,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", result, indent=1, allow_nan=False)
    return result


# Settings that choose which stages a comparison runs, not what any stage computes.
_NOT_A_STAGE_SETTING = ("compare_dids",)


def finished_stage(record: Path, cfg: LmConfig, *companions: str) -> dict[str, Any] | None:
    """A stage's earlier result, if ``record`` (its JSON) exists with ``cfg``'s settings, else None.

    ``--compare --reuse`` runs only the stages this returns None for: a comparison stopped part-way
    goes on, and new rows (``compare_dids=true``) join finished ones. The stage's recorded ``config``
    must equal ``cfg`` in every setting but those of ``_NOT_A_STAGE_SETTING``, its recorded corpus
    digest must be that of the corpus now at ``cfg.corpus`` (:func:`corpus_digest`), and the
    ``companions`` (files next to ``record``) must exist.
    """
    if not record.is_file() or not all((record.parent / name).is_file() for name in companions):
        return None
    result: dict[str, Any] = json.loads(record.read_text(encoding="utf-8"))
    wanted, found = asdict(cfg), dict(result.get("config", {}))
    for key in _NOT_A_STAGE_SETTING:
        wanted.pop(key, None)
        found.pop(key, None)
    return result if found == wanted and result.get("corpus_digest") == corpus_digest(cfg) else None


def compare(cfg: LmConfig, out: Path, reuse: bool = False) -> dict[str, Any]:
    """Reference, every proxy method, and a base run per weighting on the same token budget; a table.

    ``reuse``: keep each stage :func:`finished_stage` finds in ``out`` instead of training it again.
    """

    def run(record: Path, stage: Callable[[], dict[str, Any]], *companions: str) -> dict[str, Any]:
        earlier = finished_stage(record, cfg, *companions) if reuse else None
        if earlier is not None:
            _log(f"reusing {record.parent.name} ({record})")
        return stage() if earlier is None else earlier

    done = run(
        out / "reference" / "reference.json",
        lambda: stage_reference(cfg, out / "reference"),
        "reference_losses.npy",
        REFERENCE_MODEL,
    )
    _log(f"reference: {done['train_seconds']:.0f} s, loss cache {done['cache_seconds']:.0f} s")
    proxies = {}
    for name in PROXY_METHODS:
        done = proxies[name] = run(
            out / f"proxy-{name}" / "weights.json",
            lambda name=name: stage_proxy(cfg, out / f"proxy-{name}", name, out / "reference"),
        )
        _log(f"proxy {name}: {done['train_seconds']:.0f} s, averaged α {_rounded(done['averaged'])}")
    rows = {}
    learned = {name: str(out / f"proxy-{name}" / "weights.json") for name in PROXY_METHODS}
    online = dict(zip(ONLINE_METHODS, ONLINE_METHODS, strict=True)) if cfg.compare_dids else {}
    runs = {"uniform": "uniform", "proportional": "proportional", **learned, **online}
    for label, weights in runs.items():
        # The DIDS rows share one partition (the reference model's gradient clusters) per seed.
        row = rows[label] = run(
            out / f"base-{label}" / "metrics.json",
            lambda label=label, weights=weights: stage_base(
                cfg, out / f"base-{label}", weights, out / "reference", out / "partition.json"
            ),
        )
        _log(
            f"base {label}: {row['train_seconds']:.0f} s, mean test ppl {row['average_test_perplexity']:.3f}"
        )
    table = {
        label: {
            "sampling": r["sampling"],
            "achieved": r["achieved"],
            "test_perplexity": r["test_perplexity"],
            "average": r["average_test_perplexity"],
            "worst": r["worst_test_perplexity"],
            "target": r["target_test_perplexity"],
            "log_average": r["average_test_log_perplexity"],
            "log_worst": r["worst_test_log_perplexity"],
            "log_target": r["target_test_log_perplexity"],
            "tokens_seen": r["tokens_seen"],
            "train_seconds": r["train_seconds"],
        }
        for label, r in rows.items()
    }
    atomic_write_json(out / "comparison.json", table, indent=1, allow_nan=False)
    plot_trajectories(proxies, out / "weights.png")
    return table


def compare_seeds(cfg: LmConfig, out: Path, seeds: Sequence[int], reuse: bool = False) -> dict[str, Any]:
    """:func:`compare` once per seed (into ``out/seed-N``), then paired differences to uniform.

    Each weighting's paired difference to uniform over the seeds comes with a 95 % Student-t interval
    (``experiments/paired.py``). A seed fixes the initialisation and the sampler streams of every
    stage, so the weightings of one seed are paired. The differences are of log-perplexities (the mean
    per-token loss in nats): the average and the worst over the training domains, and the held-out
    target domain's when there is one; negative means better than uniform.
    """
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs two or more distinct seeds for paired intervals; got {list(seeds)}.")
    tables = {seed: compare(replace(cfg, seed=seed), out / f"seed-{seed}", reuse) for seed in seeds}
    names = ("average", "worst") + (("target",) if cfg.target_domain else ())
    paired = paired_to_uniform(list(tables.values()), names)  # of stage_base's log-perplexities
    result = {"seeds": list(seeds), "log_perplexity_minus_uniform": paired, "tables": tables}
    atomic_write_json(out / "paired.json", result, indent=1, allow_nan=False)
    return result


def format_paired(result: dict[str, Any]) -> str:
    """Each weighting's paired difference to uniform; ``*`` marks an interval that excludes 0."""
    paired = result["log_perplexity_minus_uniform"]
    names = list(next(iter(paired.values())))
    head = f"{'vs uniform':<14}" + "".join(f"{n + ' (95% CI)':>30}" for n in names)
    lines = [f"log-perplexity difference to uniform over seeds {result['seeds']} (negative: better)", head]
    for label, row in paired.items():
        cells = "".join(
            f"{row[n]['mean']:>+10.4f} [{row[n]['low']:+.4f}, {row[n]['high']:+.4f}]"
            + ("*" if row[n]["distinguishable"] else " ")
            for n in names
        )
        lines.append(f"{label:<14}{cells}")
    return "\n".join(lines)


def format_comparison(table: dict[str, Any]) -> str:
    """Per-domain test perplexity per weighting, with the average and the worst domain."""
    names = list(next(iter(table.values()))["test_perplexity"])
    head = f"{'weights':<14}" + "".join(f"{n[:9]:>10}" for n in names) + f"{'average':>10}{'worst':>10}"
    lines = [head, "-" * len(head)]
    for label, row in table.items():
        cells = "".join(f"{row['test_perplexity'][n]:>10.3f}" for n in names)
        lines.append(f"{label:<14}{cells}{row['average']:>10.3f}{row['worst']:>10.3f}")
    lines.append("")
    lines.append("sampling weights:")
    for label, row in table.items():
        # the held-out target domain (out-of-domain setting) is never sampled
        lines.append(f"{label:<14}" + "".join(f"{row['sampling'].get(n, 0.0):>10.3f}" for n in names))
    return "\n".join(lines)


def _log(line: str) -> None:
    print(f"domainmix run lm: {line}", file=sys.stderr, flush=True)


def _rounded(weights: dict[str, float]) -> dict[str, float]:
    return {n: round(v, 3) for n, v in weights.items()}


def main(argv: list[str] | None = None) -> int:
    """``domainmix run lm``: one stage, or ``--compare`` for the whole table."""
    parser = argparse.ArgumentParser(prog="domainmix run lm", description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["reference", "proxy", "base"])
    parser.add_argument("--compare", action="store_true", help="run every stage and print the table")
    parser.add_argument(
        "--strategy", choices=list(PROXY_METHODS), help=f"proxy stage: the method ({describe(PROXY_METHODS)})"
    )
    parser.add_argument(
        "--reference",
        type=Path,
        help="proxy stage with doremi, base stage with dids or dids-inverted: a reference stage's --out",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="base stage: weights.json, 'uniform', 'proportional' or an online method "
        f"({describe(ONLINE_METHODS)})",
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default=None, help="YAML file of LmConfig settings")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (YAML value)"
    )
    parser.add_argument("--corpus", help="a folder from domainmix data build-corpus (default runs/corpus)")
    parser.add_argument("--proxy-steps", type=int, help="shortcut for --set proxy_steps=N")
    parser.add_argument("--base-steps", type=int, help="shortcut for --set base_steps=N")
    parser.add_argument("--seed", type=int, help="shortcut for --set seed=N")
    parser.add_argument(
        "--seeds", default=None, help="with --compare: comma-separated seeds, e.g. 0,1,2 (paired intervals)"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="with --compare: keep each stage already in --out that was run with the same settings",
    )
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], help="shortcut for --set device=...")
    args = parser.parse_args(argv)
    if args.compare == (args.stage is not None):
        parser.error("give exactly one of --stage and --compare")
    if (args.seeds is not None or args.reuse) and not args.compare:
        parser.error("--seeds and --reuse go with --compare")
    if args.threads < 1:
        parser.error(f"--threads must be an int >= 1; got {args.threads}")
    named = ("uniform", "proportional", *ONLINE_METHODS)
    if args.weights is not None and args.weights not in named and not Path(args.weights).is_file():
        parser.error(f"--weights must be a weights.json file or one of {list(named)}; got {args.weights!r}")
    torch.set_num_threads(args.threads)
    try:
        if args.weights is not None and args.weights not in named:
            read_weights(Path(args.weights))  # a wrong file fails now, not after the training pool is built
        overrides, errors = parse_overrides(args.set)
        for key in ("corpus", "proxy_steps", "base_steps", "seed", "device"):
            if getattr(args, key) is not None:
                overrides[key] = getattr(args, key)
        cfg = load_config(LmConfig, args.config, overrides, earlier=errors)
        if args.compare and args.seeds is not None:
            if "seed" in overrides:
                raise ConfigError(["--seed (or --set seed=...) and --seeds exclude each other."])
            seeds = parse_seeds(args.seeds)
            print(format_paired(compare_seeds(cfg, args.out, seeds, args.reuse)))
        elif args.compare:
            table = compare(cfg, args.out, args.reuse)
            print(format_comparison(table))
        elif args.stage == "reference":
            print(json.dumps({k: v for k, v in stage_reference(cfg, args.out).items() if k != "config"}))
        elif args.stage == "proxy":
            if args.strategy is None:
                parser.error("--stage proxy needs --strategy")
            result = stage_proxy(cfg, args.out, args.strategy, args.reference)
            print(json.dumps({"final": result["final"], "averaged": result["averaged"]}, indent=1))
        else:
            if args.weights is None:
                parser.error("--stage base needs --weights")
            result = stage_base(cfg, args.out, args.weights, args.reference)
            print(
                json.dumps({k: result[k] for k in ("test_perplexity", "average_test_perplexity")}, indent=1)
            )
    except (ValueError, FileNotFoundError) as error:  # ConfigError is a ValueError
        print(f"domainmix run lm: {error}", file=sys.stderr)
        return 2
    return 0
