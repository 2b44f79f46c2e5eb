"""The Hugging Face ``Trainer`` with a domain sampler and a weighting controller.

:class:`DomainMixTrainer` is a ``transformers.Trainer`` that

- builds its training loader on a :class:`~domainmix.sampling.DomainBatchSampler` and hands it to
  Accelerate without re-sharding (:func:`domainmix.integrations.accelerate.prepare_loader`; the
  Trainer's own ``accelerator.prepare`` would deal the sampler's per-rank batches out a second time);
- computes each training batch's loss in the plain loop's order (``docs/design.md``, "One step"): the
  forward under ``controller.record()``, ``controller.step(per_example, domain_ids)``
  (``controller.observe`` with gradient accumulation, see below), then ``weighted_loss`` with the
  multipliers α over the shares of the batch in hand (``sampler.sampling_of(n)``: Accelerate's
  ``DataLoaderShard`` pulls a batch ahead, so the sampler's last batch is the next one);
- writes the controller's state and the sampler's state at the consumed batch to
  ``STATE_FILE`` in every ``checkpoint-N`` folder, and restores both on
  ``train(resume_from_checkpoint=...)``. The Trainer's own data skipping on resume is switched off
  (``ignore_data_skip=True``): it would replay batches through the sampler, which resumes by itself.
  The random state (dropout masks) is restored right before the first forward after the resume: the
  Trainer's own restore happens before its loader iterator draws from it, or not at all mid-epoch;
- adds α, q and the last window's achieved shares per domain (``domainmix/alpha/<name>``,
  ``domainmix/q/<name>``, ``domainmix/achieved/<name>``) to every log entry.

With gradient accumulation (``gradient_accumulation_steps`` A > 1) each micro-batch goes to
``controller.observe`` and the controller steps once per optimizer step, after it
(``docs/design.md``, "Gradient accumulation"): every micro-batch of an optimizer step has the same α,
``update_every`` and ``warmup_steps`` count optimizer steps, and the weights a window yields apply from
the next optimizer step. The loss of each micro-batch is divided by the accumulation steps
(``loss_is_scaled_for_ga = False``),
so the accumulated gradient is the mean of the micro-batches' gradients, as in the plain loop. With
gradient accumulation, a resume inside an epoch whose length is not a multiple of the accumulation
steps is refused: the Trainer (its data skipping off) would miss the epoch's last optimizer step.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from domainmix._atomic import atomic_write_bytes
from domainmix.controller import WeightingController
from domainmix.integrations._logging import weight_scalars
from domainmix.integrations.accelerate import prepare_loader
from domainmix.losses import weighted_loss
from domainmix.sampling import DomainBatchSampler

__all__ = ["STATE_FILE", "DomainMixTrainer", "causal_lm_per_example_loss"]

STATE_FILE = "domainmix_state.pt"
PerExampleLoss = Callable[[Any, dict[str, Any]], Tensor]


def causal_lm_per_example_loss(outputs: Any, inputs: dict[str, Any]) -> Tensor:
    """(B,) mean next-token cross-entropy of each sequence, over its tokens whose label is not -100.

    A sequence with no such token (a prompt that fills the whole window, in supervised fine-tuning)
    gets loss 0 and still counts as an example: it pulls its domain's mean loss down and dilutes the
    weighted loss. Drop such rows when building the dataset or in the collator.

    Args:
        outputs: the model's output, with ``logits`` (B, T, V).
        inputs: the batch, with ``labels`` (B, T) (the Trainer's convention: shifted inside the loss).
    """
    logits, labels = outputs["logits"][:, :-1], inputs["labels"][:, 1:]
    token = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    mask = (labels != -100).to(token.dtype)
    per_example: Tensor = (token * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return per_example


class DomainMixTrainer(Trainer):
    """A ``Trainer`` whose batches follow a ``DomainBatchSampler`` and whose loss a controller weights.

    Args:
        *args: passed to ``transformers.Trainer``.
        sampler: the training batch sampler; build it after ``TrainingArguments`` (which starts the
            process group), with ``batch_size`` = ``per_device_train_batch_size``.
        controller: the ``WeightingController`` (usually built with ``sampler=sampler``).
        per_example_loss: ``(outputs, inputs) -> (B,)`` loss per example; default
            :func:`causal_lm_per_example_loss`.
        domain_key: the batch key of the integer domain ids (default ``"domain_id"``); it is removed from
            the inputs before the model's forward. The training set is collated as it is: it must hold
            only the collator's inputs and this key.
        **kwargs: passed to ``transformers.Trainer``.

    Raises:
        ValueError: when the sampler's batch size, rank or world size disagree with the arguments', or
            when they ask for another sampler (``train_sampling_strategy``, ``group_by_length``). The
            loader is the sampler's: ``dataloader_drop_last`` and ``remove_unused_columns`` do not
            apply to it (the sampler decides every batch; the dataset holds only the collator's inputs
            and ``domain_key``).
    """

    # compute_loss returns a mean over the micro-batch, not a sum over the accumulated items: the
    # Trainer must divide it by the accumulation steps. transformers >= 5 reads this attribute; older
    # versions decide from model_accepts_loss_kwargs, set to False in __init__ for the same effect.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        sampler: DomainBatchSampler,
        controller: WeightingController,
        per_example_loss: PerExampleLoss = causal_lm_per_example_loss,
        domain_key: str = "domain_id",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        expected = (self.args.per_device_train_batch_size, self.args.process_index, self.args.world_size)
        if (sampler.batch_size, sampler.rank, sampler.world_size) != expected:
            raise ValueError(
                f"DomainMixTrainer: the sampler has batch_size={sampler.batch_size}, rank {sampler.rank} "
                f"of {sampler.world_size}; the arguments ask for per_device_train_batch_size={expected[0]}, "
                f"rank {expected[1]} of {expected[2]}. Build the sampler after TrainingArguments, with its "
                "batch size."
            )
        # A sampler choice of the arguments (transformers >= 5: train_sampling_strategy; before it:
        # group_by_length) would be silently replaced by the domain sampler: refuse it instead.
        strategy = getattr(self.args, "train_sampling_strategy", "random")
        if strategy != "random" or getattr(self.args, "group_by_length", False):
            chosen = (
                "group_by_length=True" if strategy == "random" else f"train_sampling_strategy={strategy!r}"
            )
            raise ValueError(
                f"DomainMixTrainer: {chosen} asks for another training sampler; the DomainBatchSampler "
                "plans every batch. Leave the Trainer's sampler choice at its default."
            )
        self.args.ignore_data_skip = True  # the sampler resumes itself; skipping would replay batches
        self.model_accepts_loss_kwargs = False  # see loss_is_scaled_for_ga
        self.sampler, self.controller = sampler, controller
        self._per_example_loss, self._domain_key = per_example_loss, domain_key
        self._consumed = 0
        self._rng_pending: str | None = None  # a checkpoint whose RNG state is still to be loaded
        self.add_callback(_DomainCallback(self))

    def get_train_dataloader(self) -> Any:
        """The training loader on the domain sampler, on the device, not re-sharded."""
        args = self.args
        if self.train_dataset is None:
            raise ValueError("DomainMixTrainer: training requires a train_dataset.")
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.sampler,
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor,
            # Its own generator: creating an iterator then leaves the global random state (dropout) alone.
            generator=torch.Generator().manual_seed(args.seed),
        )
        return prepare_loader(self.accelerator, loader)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """Training: the plain loop's step (record, controller step, weighted loss); else the Trainer's."""
        ids = inputs.pop(self._domain_key, None)
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if ids is None:
            raise ValueError(
                f"DomainMixTrainer: the training batch has no {self._domain_key!r} entry (keys: "
                f"{sorted(inputs)}); the collated batch must carry each example's integer domain id."
            )
        if self._rng_pending is not None:
            # The Trainer restores the random state at the epoch start, before its loader iterator draws
            # from it, or not at all (after ignore_data_skip); restore it where the checkpoint left off.
            self._load_rng_state(self._rng_pending)
            self._rng_pending = None
        self._consumed += 1
        with self.controller.record():
            outputs = model(**inputs)
            per_example = self._per_example_loss(outputs, inputs)
        if self.args.gradient_accumulation_steps > 1:
            self.controller.observe(per_example, ids)  # the step ends after the optimizer's (on_step_end)
        else:
            self.controller.step(per_example, ids)
        # Accelerate's DataLoaderShard pulls a batch ahead: divide by the shares of the batch in hand
        in_hand = self.sampler.sampling_of(self._consumed - 1)
        loss = weighted_loss(per_example, ids, self.controller.loss_multipliers(in_hand))
        return (loss, outputs) if return_outputs else loss

    def train(  # type: ignore[override]  # the Trainer's other arguments pass through **kwargs
        self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; with ``resume_from_checkpoint``, the controller and sampler resume too.

        Raises:
            ValueError: when the checkpoint folder has no ``STATE_FILE``, when ``True`` finds no
                checkpoint in ``output_dir`` (as ``transformers.Trainer`` does), or when the resume falls
                inside an epoch whose length is not a multiple of the gradient accumulation steps.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._last_complete_checkpoint()
        if isinstance(resume_from_checkpoint, str):
            path = Path(resume_from_checkpoint) / STATE_FILE
            if not path.is_file():
                raise ValueError(
                    f"DomainMixTrainer.train: {path} does not exist; the checkpoint was not written by a "
                    "DomainMixTrainer, so the weights and the sampler cannot resume."
                )
            state = torch.load(path, weights_only=True)
            self._check_partial_epoch(state["sampler"])
            self.controller.load_state_dict(state["controller"])
            self.sampler.load_state_dict(state["sampler"])
            self._consumed = int(state["sampler"][self.sampler.TOTAL_KEY])
            self._rng_pending = str(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)

    def _last_complete_checkpoint(self) -> str:
        """The newest ``checkpoint-N`` of ``output_dir`` that holds ``STATE_FILE``.

        The state file is written after the Trainer's own files (``on_save``), so a run stopped between
        the two leaves a newest checkpoint without it: the one before is then the last complete one.
        """
        output = str(self.args.output_dir)
        if get_last_checkpoint(output) is None:  # type: ignore[no-untyped-call]
            # starting afresh could overwrite the checkpoints the caller meant to resume
            raise ValueError(
                f"DomainMixTrainer.train: no valid checkpoint found in output directory ({output}); "
                "resume_from_checkpoint=True needs one."
            )
        steps = sorted(
            (int(d.name.rsplit("-", 1)[1]), d)
            for d in Path(output).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
            if d.is_dir() and d.name.rsplit("-", 1)[1].isdigit()
        )
        complete = [d for _, d in steps if (d / STATE_FILE).is_file()]
        if not complete:
            raise ValueError(
                f"DomainMixTrainer.train: no checkpoint in {output} holds {STATE_FILE}; they were not "
                "written by a DomainMixTrainer, so the weights and the sampler cannot resume."
            )
        if complete[-1] != steps[-1][1]:
            warnings.warn(
                f"DomainMixTrainer.train: {steps[-1][1]} has no {STATE_FILE} (the run stopped while saving "
                f"it); resuming from {complete[-1]}, the last complete checkpoint.",
                RuntimeWarning,
                stacklevel=3,
            )
        return str(complete[-1])

    def _check_partial_epoch(self, sampler_state: dict[str, Any]) -> None:
        """Refuse a resume the Trainer would accumulate wrongly (see the module docstring).

        With its data skipping off, the Trainer counts the resumed epoch's batches from 0 and closes an
        accumulation group at every ``gradient_accumulation_steps`` batches or at the epoch's
        ``len(loader)``-th; the resumed epoch is shorter, so a last, partial group never closes and
        its gradient leaks into the next epoch's first step.
        """
        accumulation = self.args.gradient_accumulation_steps
        if accumulation <= 1:
            return
        try:
            length = len(self.sampler)
        except TypeError:  # no epochs (cycle_forever without num_batches): nothing to close
            return
        in_epoch = int(sampler_state[self.sampler.BATCH_KEY])
        if length % accumulation and in_epoch % length:
            raise ValueError(
                f"DomainMixTrainer.train: the checkpoint is {in_epoch} batches into an epoch of {length}, "
                f"which is not a multiple of gradient_accumulation_steps={accumulation}; the Trainer "
                "would miss the epoch's last optimizer step after this resume. Resume from a checkpoint "
                "at an epoch end, or make the epoch length (the sampler's num_batches) a multiple of "
                "the accumulation steps."
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log entry, with α, q and the achieved shares per domain."""
        logs = {**logs, **weight_scalars(self.controller)}
        super().log(logs, start_time)

    def domain_state(self) -> dict[str, Any]:
        """The controller's state and the sampler's at the consumed batch (what a checkpoint holds)."""
        return {
            "controller": self.controller.state_dict(),
            "sampler": self.sampler.state_dict(consumed=self._consumed),
        }


class _DomainCallback(TrainerCallback):
    """Ends the controller's step after an accumulated optimizer step; saves the domain state.

    The state goes into each checkpoint folder, from the main process only.
    """

    def __init__(self, trainer: DomainMixTrainer) -> None:
        self._trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.gradient_accumulation_steps > 1:  # the micro-batches were observed: the optimizer step ends
            self._trainer.controller.step()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        buffer = io.BytesIO()
        torch.save(self._trainer.domain_state(), buffer)
        atomic_write_bytes(folder / STATE_FILE, buffer.getvalue())
