"""PyTorch Lightning: a callback that checkpoints, checks and logs a module's domain weighting.

The training step keeps the plain loop's order (``docs/design.md``, "One step"): inside
``training_step``, the forward under ``controller.record()``, then ``controller.step(per_example,
domain_ids)`` (``controller.observe`` with gradient accumulation, see below), then the loss
``weighted_loss(per_example, domain_ids, controller.loss_multipliers())``.
So every update of a step happens before any checkpoint of that step can be written (Lightning runs
``ModelCheckpoint`` after the other callbacks' ``on_train_batch_end``; a controller stepped in the
module's own ``on_train_batch_end`` would run after it, and a resume would diverge).

:class:`DomainMixCallback` does the rest:

- it checks that the module's sampler knows its rank: build the sampler and the controller in the
  module's ``setup()`` (the process group exists there, not in ``__init__``) and train with
  ``Trainer(use_distributed_sampler=False)`` on more than one process, since Lightning would otherwise
  try to replace the sampler;
- it saves the controller's state and the sampler's state at the batch the loop consumed
  (``state_dict(consumed=n)``, prefetching workers included) in Lightning's checkpoints, and restores
  both in ``on_load_checkpoint``, which runs after ``setup()`` and before the loader is iterated
  (Lightning's data fetcher pulls the first batch before ``on_train_start``);
- Lightning's data fetcher pulls one batch ahead, so before each batch it gives the controller the
  shares of the batch in hand (``controller.set_batch_sampling(sampler.sampling_of(n))``): the
  ``loss_multipliers()`` of ``training_step`` divide by the q that batch was drawn with;
- it logs α, q and the last window's achieved shares per domain (``domainmix/alpha/<name>``,
  ``domainmix/q/<name>``, ``domainmix/achieved/<name>``) with
  ``LightningModule.log_dict``, which reaches the logger every ``log_every_n_steps``;
- with ``Trainer(accumulate_grad_batches=A)``, A > 1, it ends the controller's step after each
  optimizer step (in its ``on_train_batch_end``, before ``ModelCheckpoint``): ``training_step`` then
  calls ``controller.observe(per_example, domain_ids)`` instead of ``step``, so the micro-batches of an
  optimizer step share α and ``update_every`` counts optimizer steps (``docs/design.md``, "Gradient
  accumulation"). A ``training_step`` that still calls ``step`` is refused at its first batch.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from domainmix.controller import WeightingController
from domainmix.integrations._logging import weight_scalars
from domainmix.integrations._sampler_states import with_sampler_states
from domainmix.sampling import DomainBatchSampler

__all__ = ["DomainMixCallback"]


class DomainMixCallback(Callback):
    """Checkpoint, check and log the ``WeightingController`` and ``DomainBatchSampler`` of a module.

    Args:
        controller: the name of the module attribute holding the ``WeightingController`` (default
            ``"controller"``).
        sampler: the name of the module attribute holding the ``DomainBatchSampler`` (default
            ``"sampler"``).
        log: log α, q and the achieved shares per domain with ``LightningModule.log_dict`` (default
            ``True``).

    Checkpoint keys: ``CHECKPOINT_KEY`` in Lightning's checkpoint dict, holding ``CONTROLLER_KEY`` and
    ``SAMPLER_KEY``.
    """

    CHECKPOINT_KEY = "domainmix"
    CONTROLLER_KEY = "controller"
    SAMPLER_KEY = "sampler"

    def __init__(self, controller: str = "controller", sampler: str = "sampler", *, log: bool = True) -> None:
        self._attrs = (controller, sampler)
        self._log = bool(log)
        self._consumed = 0  # global batches the loop has consumed, as the sampler counts them
        self._steps_before = 0  # the controller's step count when the batch began (accumulation check)

    def _parts(self, module: LightningModule) -> tuple[WeightingController, DomainBatchSampler]:
        controller, sampler = (getattr(module, name, None) for name in self._attrs)
        if not isinstance(controller, WeightingController) or not isinstance(sampler, DomainBatchSampler):
            raise ValueError(
                f"DomainMixCallback: the module needs a WeightingController in .{self._attrs[0]} and a "
                f"DomainBatchSampler in .{self._attrs[1]}; found {type(controller).__name__} and "
                f"{type(sampler).__name__}. Build both in the module's setup()."
            )
        return controller, sampler

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse a multi-process fit in which Lightning would replace the sampler."""
        connector = getattr(trainer, "_accelerator_connector", None)
        if stage == "fit" and trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "DomainMixCallback: train with Trainer(use_distributed_sampler=False): the "
                "DomainBatchSampler already gives each rank its share of one global plan, and Lightning "
                "would replace it."
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check the sampler's rank and world size, and start counting consumed batches."""
        _, sampler = self._parts(pl_module)
        if (sampler.rank, sampler.world_size) != (trainer.global_rank, trainer.world_size):
            raise ValueError(
                f"DomainMixCallback: the sampler is rank {sampler.rank} of {sampler.world_size}, the "
                f"trainer's process is rank {trainer.global_rank} of {trainer.world_size}. Build the "
                "sampler in the module's setup(), where the process group exists, not in __init__."
            )
        self._consumed = int(sampler.state_dict()[sampler.TOTAL_KEY])

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Give the controller the shares of the batch in hand, and note its step count.

        Lightning's fetcher pulls a batch ahead, so the sampler's last batch is the next one; the loss
        multipliers must divide by the shares of this one. With accumulation, ``training_step`` must not
        step the controller (checked at the batch's end).
        """
        controller, sampler = self._parts(pl_module)
        controller.set_batch_sampling(sampler.sampling_of(self._consumed))
        self._steps_before = controller.step_count

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count the consumed batch, end an accumulated optimizer step's controller step, log the weights.

        Both before ``ModelCheckpoint`` runs, so a checkpoint holds the step's state.
        """
        self._consumed += 1
        controller, _ = self._parts(pl_module)
        accumulation = trainer.accumulate_grad_batches
        if accumulation > 1:
            if controller.step_count != self._steps_before:
                raise ValueError(
                    f"DomainMixCallback: with accumulate_grad_batches={accumulation}, training_step must "
                    "call controller.observe(per_example, domain_ids), not controller.step: the callback "
                    "ends the step after each optimizer step, so that its micro-batches share α."
                )
            # Lightning's own rule: the optimizer steps every A batches and at the epoch's last batch
            progress = trainer.fit_loop.epoch_loop.batch_progress
            if (batch_idx + 1) % accumulation == 0 or progress.is_last_batch:
                controller.step()
        if self._log:  # Lightning passes them to its logger every log_every_n_steps
            pl_module.log_dict(weight_scalars(controller), on_step=True, on_epoch=False)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Store the controller's state and the sampler's at the consumed batch under ``CHECKPOINT_KEY``."""
        controller, sampler = self._parts(pl_module)
        checkpoint[self.CHECKPOINT_KEY] = {
            self.CONTROLLER_KEY: controller.state_dict(),
            self.SAMPLER_KEY: sampler.state_dict(consumed=self._consumed),
        }
        # A stateful train loader (torchdata's) has its sampler state saved by the fit loop too, taken
        # while Lightning's fetcher held a batch ahead; Lightning loads it after on_load_checkpoint, so it
        # must be the consumed batch's as well, or the resume would skip one batch.
        if "loops" in checkpoint:
            checkpoint["loops"] = with_sampler_states(checkpoint["loops"], sampler, lambda _: self._consumed)

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Restore the controller and the sampler (Lightning calls this after ``setup()``, before any batch).

        Raises:
            ValueError: when the checkpoint has no domainmix state.
        """
        if self.CHECKPOINT_KEY not in checkpoint:
            raise ValueError(
                f"DomainMixCallback: the checkpoint has no {self.CHECKPOINT_KEY!r} entry; it was not saved "
                "with a DomainMixCallback, so the weights and the sampler cannot resume."
            )
        controller, sampler = self._parts(pl_module)
        controller.load_state_dict(checkpoint[self.CHECKPOINT_KEY][self.CONTROLLER_KEY])
        sampler.load_state_dict(checkpoint[self.CHECKPOINT_KEY][self.SAMPLER_KEY])
        self._consumed = int(sampler.state_dict()[sampler.TOTAL_KEY])
