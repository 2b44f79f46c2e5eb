"""The weights a framework logs: α, q and the last window's achieved shares, one scalar per domain."""

from __future__ import annotations

from domainmix.controller import WeightingController

__all__ = ["weight_scalars"]


def weight_scalars(controller: WeightingController) -> dict[str, float]:
    """Scalars ``domainmix/alpha/<name>``, ``domainmix/q/<name>`` and ``domainmix/achieved/<name>``.

    The achieved shares appear once a window has closed.
    """
    weights = controller.weights
    series = {"alpha": weights.mixture, "q": weights.sampling}
    if controller.achieved is not None:
        series["achieved"] = controller.achieved
    return {
        f"domainmix/{key}/{name}": float(value)
        for key, values in series.items()
        for name, value in zip(weights.names, values, strict=True)
    }
