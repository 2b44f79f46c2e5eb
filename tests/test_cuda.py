"""The CUDA paths, on a machine with a GPU (skipped elsewhere): the same numbers as on the CPU.

One step of a DoGE-style controller (gradient-product tap with a target batch, bfloat16 autocast off
and on) and a DoReMi-style one (reference losses from a CPU cache) on CUDA tensors, against the same
step on the CPU; the statistics' window stays on the GPU between steps and its checkpoint is on the CPU.
"""

from __future__ import annotations

import pytest
import torch

import domainmix.strategies as S
from domainmix import WeightingController, weighted_loss
from domainmix.experiments.gpt import GPT, GPTConfig, per_token_loss
from domainmix.stats import GradientProductProbe, GradientProductTap, ReferenceLossProbe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NAMES = ["a", "b", "c"]


def run_steps(device: str, autocast: bool, steps: int = 3) -> tuple[WeightingController, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)).to(device)
    cache = torch.rand(24, 16) * 4  # reference losses per window, kept on the CPU as a cache would be
    target = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1)).to(device)

    def target_losses() -> torch.Tensor:
        return per_token_loss(model(target[:, :-1]), target[:, 1:])

    products = GradientProductProbe(
        lambda: GradientProductTap(model.blocks[-1], model.ln), target=target_losses
    )
    reference = ReferenceLossProbe(lambda step: cache[step.indices.cpu()])
    strategy = S.combine(loss=S.doge(1e-3, target="out_of_domain", mu=0.05), sampling=S.uniform())
    controller = WeightingController(strategy, NAMES, update_every=2, probes=[products, reference])
    losses = []
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        index = torch.randint(0, 24, (6,), generator=g)
        seq = torch.randint(0, 64, (6, 17), generator=g).to(device)
        ids = torch.tensor([0, 0, 1, 1, 2, 2])  # on the CPU while the losses are on the GPU
        context = (
            torch.autocast("cuda", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        )
        with context, controller.record():
            per_token = per_token_loss(model(seq[:, :-1]), seq[:, 1:])
        controller.step(per_token, ids, indices=index)
        loss = weighted_loss(per_token, ids, controller.loss_multipliers())
        loss.backward()
        losses.append(loss.detach().float().cpu())
    return controller, losses


def test_a_cuda_step_gives_the_cpu_numbers() -> None:
    on_gpu, gpu_losses = run_steps("cuda", autocast=False)
    on_cpu, cpu_losses = run_steps("cpu", autocast=False)
    torch.testing.assert_close(torch.stack(gpu_losses), torch.stack(cpu_losses), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(on_gpu.weights.mixture, on_cpu.weights.mixture, rtol=1e-4, atol=1e-7)


def test_the_window_stays_on_the_gpu_and_its_checkpoint_on_the_cpu() -> None:
    controller, _ = run_steps("cuda", autocast=True, steps=3)  # 3 steps: the second window is open
    window = controller._collector._window  # a per-step host copy would leave these on the CPU
    assert window["train.sum"].device.type == "cuda" and window["grad_dot.sum"].device.type == "cuda"
    state = controller.state_dict()
    collector = state[controller.COLLECTOR_KEY]
    assert all(v.device.type == "cpu" for v in collector["window"].values())
    assert torch.isfinite(controller.weights.mixture).all()
