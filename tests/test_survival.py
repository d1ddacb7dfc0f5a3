"""The fine-tune survival diagnostic (engine/evaluation/survival.py) on hand-built cases and real quantizers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.evaluation.survival import fine_tune_survival, summarise, survival_stats  # noqa: E402
from engine.fp4 import modelopt_glue  # noqa: E402
from test_fp4 import tiny_gpt_oss  # noqa: E402


def test_hand_built_case():
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    master = torch.tensor([1.1, 2.0, 3.9, 4.0])  # the fine-tune moved elements 0 and 2
    served = torch.tensor([1.0, 2.0, 4.0, 4.0])  # quantization rounds element 0 back to the base, 2 onto 4.0
    stats = survival_stats(master, base, served, base)
    assert (stats["changed"], stats["erased"]) == (2, 1)
    result = summarise({"t": stats})
    assert result["erased_share"] == 0.5
    assert result["surviving_delta"] == pytest.approx(0.9 / (0.1 ** 2 + 0.9 ** 2) ** 0.5, rel=1e-5)
    assert result["per_tensor"]["t"]["erased_share"] == 0.5


def test_layers_add_up_exactly():
    a = survival_stats(torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]),
                       torch.tensor([1.0, 2.0]))
    b = survival_stats(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]),
                       torch.tensor([1.0, 1.0]))
    result = summarise({"a": a, "b": b})
    assert result["changed"] == 2 and result["erased_share"] == 0.5  # a's change erased, b's kept
    assert result["surviving_delta"] == pytest.approx((1.0 / (0.25 + 1.0)) ** 0.5)  # b's change survives


@pytest.fixture(scope="module")
def quantized_on_grid_base():
    """A tiny gpt-oss quantized to MXFP4 (our backend, CPU), whose expert weights are then set on the grid: the
    base as OpenAI releases gpt-oss. Returns (model, base expert weights)."""
    from engine.fp4 import torch_backend

    torch_backend.register()
    model = modelopt_glue.quantize(tiny_gpt_oss(), "mxfp4", None, torch_backend.BACKEND_NAME)
    base = {}
    for item in modelopt_glue.expert_weights(model):
        with torch.no_grad():
            item.weight.copy_(modelopt_glue.apply_weight_quantizer(item.quantizer, item.weight))
        base[item.name] = item.weight.detach().clone()
    return model, base


def _fine_tune(model, base, step: float, seed: int) -> None:
    """Move every expert weight by `step` times its own magnitude, in a random direction."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for item in modelopt_glue.expert_weights(model):
            b = base[item.name]
            noise = torch.randn(b.shape, generator=gen)
            item.weight.copy_(b + step * b.abs().mean() * noise)


def test_small_steps_from_an_on_grid_base_are_erased(quantized_on_grid_base):
    model, base = quantized_on_grid_base
    _fine_tune(model, base, step=1e-3, seed=1)  # far less than half a grid step: rounds back
    result = fine_tune_survival(model, base)
    assert result["changed"] > 0.99 * sum(b.numel() for b in base.values())
    assert result["erased_share"] > 0.9 and result["surviving_delta"] < 0.3, result


def test_large_steps_survive(quantized_on_grid_base):
    model, base = quantized_on_grid_base
    _fine_tune(model, base, step=1.0, seed=2)  # about a grid step or more: lands on other grid points
    result = fine_tune_survival(model, base)
    assert result["erased_share"] < 0.5 and result["surviving_delta"] > 0.7, result
    assert set(result["per_tensor"]) == set(base)


def test_an_unquantized_model_has_no_survival():
    model = tiny_gpt_oss()
    base = {item.name: item.weight.detach() for item in modelopt_glue.expert_weights(model)}
    assert fine_tune_survival(model, base) is None
