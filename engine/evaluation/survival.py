"""How much of the fine-tune survives quantization, per expert tensor and per format.

gpt-oss ships with MXFP4 experts: its expert weights sit on the FP4 grid. A BF16 fine-tune at a small learning rate
moves most of them by less than half a grid step, and PTQ rounds them back to the grid point they came from: the
fine-tune is undone where it lives. QAT trains through the rounding, so what it learns lands on other grid points.
No tool we know of shows this; the results table only shows its consequence (the PTQ drop).

For a quantized model with master expert weights W (the SFT weights for PTQ, the QAT-trained ones for QAT),
effective (fake-quantized) weights Q = q(W), and the base model's expert weights B quantized the same way, q(B):

  changed         elements the fine-tune moved away from the base: W != B
  erased share    of those, the share whose served value is the base's own: Q == q(B)
  surviving delta ||(W - B) where not erased|| / ||W - B||: the share of the fine-tune's change (by norm) that
                  lives in weights still served at a value other than the base's (0 = all erased, 1 = none).
                  Bounded and robust by design: ratios of served to trained change, ||Q - q(B)|| / ||W - B|| or
                  its projection on W - B, read 63 and 12 on a fine-tune 94% erased (tests/test_survival.py's
                  small-step case), because where a nudge moves a block's maximum, MXFP4's power-of-two scale
                  doubles and the whole block jumps by grid steps much larger than the fine-tune.

q is the model's own weight quantizer (same format, block size and calibrated scales), applied the way the
model applies it (engine.fp4.modelopt_glue.apply_weight_quantizer).
"""

from __future__ import annotations

import torch

from engine.fp4 import modelopt_glue


@torch.no_grad()
def survival_stats(master: torch.Tensor, base: torch.Tensor, effective: torch.Tensor,
                   base_effective: torch.Tensor) -> dict:
    """Counts and norms for one tensor (kept separate so layers and the whole model add up exactly)."""
    w, b = master.float(), base.float()
    changed = w != b
    erased = changed & (effective.float() == base_effective.float())
    return {
        "changed": int(changed.sum()), "erased": int(erased.sum()),
        "delta_sq": float((w - b).pow(2).sum()),
        "surviving_sq": float((w - b)[changed & ~erased].pow(2).sum()),
    }


def summarise(stats: dict[str, dict]) -> dict:
    """{'erased_share', 'surviving_delta', 'per_tensor': {name: {...}}} from survival_stats per tensor."""
    def ratios(s: dict) -> dict:
        return {"erased_share": s["erased"] / s["changed"] if s["changed"] else 0.0,
                "surviving_delta": (s["surviving_sq"] / s["delta_sq"]) ** 0.5 if s["delta_sq"] else 0.0,
                "changed": s["changed"]}

    total = {k: sum(s[k] for s in stats.values()) for k in ("changed", "erased", "delta_sq", "surviving_sq")}
    return {**ratios(total), "per_tensor": {name: ratios(s) for name, s in stats.items()}}


@torch.no_grad()
def fine_tune_survival(model, base: dict[str, torch.Tensor]) -> dict | None:
    """The diagnostic for a quantized model against the base model's expert weights (name -> (E, in, out) tensor),
    or None when the model has no enabled expert weight quantizer or the base lacks its tensors."""
    stats = {}
    for item in modelopt_glue.expert_weights(model):
        q = item.quantizer
        if q is None or not q.is_enabled or item.name not in base:
            continue
        w = item.weight.detach()
        b = base[item.name].to(w.device, w.dtype)
        quantize = modelopt_glue.apply_weight_quantizer
        stats[item.name] = survival_stats(w, b, quantize(q, w), quantize(q, b))
    return summarise(stats) if stats else None

