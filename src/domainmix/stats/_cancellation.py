"""DoGE's cancellation-effect scores: which parameter tensors to keep for the generalization estimate."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from domainmix._state import check_state_keys
from domainmix._validation import Interval, check_param, param_error


class CancellationScores:
    r"""Per-tensor cancellation scores c_p = Σ_t ‖∇_p(t)‖ / ‖w_p(t) − w_p(t−1)‖, for DoGE's subset.

    A tensor whose gradients cancel from step to step moves little for the gradient it receives: its
    score grows, and its per-domain gradient inner products are mostly noise. DoGE's optional parameter
    selection trains a proxy for a while with this tracker, then computes the generalization estimate
    only on the tensors with the *smallest* scores (:meth:`select` with ``count > 0``; ``count < 0``
    keeps the largest), as the reference code's ``--cc_selection --cc_ns 10 --cc_steps 1000``.

    Call :meth:`update` once per step, after ``optimizer.step()`` and before the gradients are zeroed.
    A tensor without a gradient at a step adds nothing, and one that never had a gradient (frozen) is
    never selected; one with a gradient that did not move scores +inf (it is never among the smallest).
    A step whose gradients are not finite, or in which no tensor moved, is an optimizer step that did
    not happen (mixed precision's ``GradScaler`` skips those): it adds nothing either.

    Args:
        named_parameters: ``model.named_parameters()`` or any (name, tensor) pairs to score.

    References:
        Fan, Pagliardini, Jaggi (2024), "DoGE: Domain Reweighting with Generalization Estimation";
        reference code ``DoGETrainer.train_cancellation``.
    """

    STEPS_KEY = "steps"
    SCORES_KEY = "scores"
    PREVIOUS_KEY = "previous"
    SCORED_KEY = "scored"

    def __init__(self, named_parameters: Iterable[tuple[str, Tensor]]) -> None:
        self._params = dict(named_parameters)
        if not self._params:
            raise param_error(
                "CancellationScores", "named_parameters", "at least one (name, tensor) pair", []
            )
        self._previous = {n: p.detach().clone() for n, p in self._params.items()}
        self._scores = dict.fromkeys(self._params, 0.0)
        self._scored: set[str] = set()  # the tensors that had a gradient at some scored step
        self._steps = 0

    @property
    def steps(self) -> int:
        """Updates so far."""
        return self._steps

    def scores(self) -> dict[str, float]:
        """c_p per tensor name (0 for a tensor that never had a gradient)."""
        return dict(self._scores)

    @torch.no_grad()
    def update(self) -> None:
        """Add this step's ‖∇_p‖ / ‖Δw_p‖ for every tensor, then remember the new weights."""
        seen = {
            name: (float(p.grad.norm()), float((p.detach() - self._previous[name]).norm()))
            for name, p in self._params.items()
            if p.grad is not None
        }
        happened = any(moved > 0 for _, moved in seen.values())
        if happened and all(math.isfinite(grad) for grad, _ in seen.values()):
            for name, (grad, moved) in seen.items():
                self._scores[name] += grad / moved if moved > 0 else (0.0 if grad == 0 else math.inf)
            self._scored.update(seen)
        for name, p in self._params.items():
            self._previous[name].copy_(p.detach())
        self._steps += 1

    def select(self, count: int) -> list[str]:
        """The ``count`` names with the smallest scores (``count < 0``: the ``-count`` largest), in order.

        Only tensors that had a gradient at a scored step are ranked.
        """
        scored = [n for n in self._scores if n in self._scored]
        check_param("CancellationScores.select", "count", count, Interval(int, -len(scored), len(scored)))
        if count == 0:
            raise param_error("CancellationScores.select", "count", "a non-zero int", count)
        ranked = sorted(scored, key=lambda n: self._scores[n], reverse=count < 0)
        return ranked[: abs(count)]

    def state_dict(self) -> dict[str, Any]:
        """Scores, the last seen weights and the step count (for an exact resume)."""
        return {
            self.STEPS_KEY: self._steps,
            self.SCORES_KEY: dict(self._scores),
            self.PREVIOUS_KEY: {n: t.clone() for n, t in self._previous.items()},
            self.SCORED_KEY: sorted(self._scored),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` taken from a tracker over the same tensor names."""
        check_state_keys(
            "CancellationScores", state_dict, (self.STEPS_KEY, self.SCORES_KEY, self.PREVIOUS_KEY)
        )
        previous = state_dict[self.PREVIOUS_KEY]
        if set(state_dict[self.SCORES_KEY]) != set(self._params) or set(previous) != set(self._previous):
            raise ValueError("CancellationScores.load_state_dict: the state holds other tensor names.")
        shapes = {n: tuple(torch.as_tensor(t).shape) for n, t in previous.items()}
        wrong = sorted(n for n, shape in shapes.items() if shape != tuple(self._previous[n].shape))
        if wrong:  # checked before anything is assigned: a refused state leaves the tracker as it was
            raise ValueError(f"CancellationScores.load_state_dict: tensors {wrong} have other shapes.")
        scores = {n: float(state_dict[self.SCORES_KEY][n]) for n in self._params}
        # a state saved before "scored" was kept: the tensors with a score (a frozen one has none)
        scored = set(state_dict.get(self.SCORED_KEY, [n for n, c in scores.items() if c != 0]))
        if not scored <= set(self._params):
            raise ValueError("CancellationScores.load_state_dict: the state scores other tensor names.")
        self._steps, self._scores, self._scored = int(state_dict[self.STEPS_KEY]), scores, scored
        for n, t in previous.items():
            self._previous[n].copy_(torch.as_tensor(t))
