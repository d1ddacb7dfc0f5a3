"""LoRA (peft) for SFT and QAT, including adapters on the MoE expert weights, and the merge before saving.

Targets: the attention projections (`target_modules="all-linear"`, as NVIDIA's sft_lora.yaml) and, with
`lora_target_experts`, the 3-D expert weights through peft's `target_parameters` (`mlp.experts.gate_up_proj` /
`down_proj`, optionally only in `lora_expert_layers`). peft wraps the experts module in one `lora.ParamWrapper` per
targeted parameter; the adapter of an (E, in, out) weight is E rank-r factor pairs, delta = scaling * B A.

What a quantized expert computes with (QAT). The QAT model is the PTQ model with adapters added afterwards (so QAT
starts from exactly the calibrated quantizers the PTQ baseline was evaluated with). modelopt's LoRA support for
parameters (`_QuantParamWrapper`, modelopt/torch/quantization/plugins/peft.py) applies when adapters exist *before*
`mtq.quantize`; here they come after, so `prepare_for_qat` converts the expert wrappers with modelopt's own registry.
Its forward is
    W_used = fake_quant(W + delta),   delta = peft's get_delta_weight (B A * scaling),   W frozen
i.e. the adapter moves the weight *inside* the quantizer, and the straight-through gradient of fake_quant reaches
A and B. (The alternative, fake_quant(W) + delta, trains a model that no FP4 checkpoint can hold.) The merge is
peft's `merge_and_unload`: W <- W + get_delta_weight(), the same tensors added with the same floating-point op as in
the forward, so the merged weight is bit for bit the pre-quantization weight of the last QAT forward, and
fake_quant(merged W), what the exporter encodes (modelopt_glue.effective_expert_weights), is exactly W_used.
modelopt's wrapper quantizes per forward on the eager experts path, so our fast experts path (engine/fp4/fast_experts.py)
is switched off for experts that carry adapters; experts without adapters keep it.
(SFT has no quantizer: peft's own ParamWrapper folds W + BA with one baddbmm in the forward while the merge adds an
einsum; the two agree to float rounding, and PTQ starts from the merged weights.)

Merging needs the whole model in one process: LoRA runs use strategy single or ddp (engine/recipe/configs.py).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.fp4 import modelopt_glue
from engine.recipe.configs import TrainConfig


def expert_targets(cfg: TrainConfig) -> list[str] | None:
    """peft `target_parameters` for the expert weights (matched as name suffixes), or None without expert LoRA."""
    if not cfg.lora_target_experts:
        return None
    if cfg.lora_expert_layers is None:
        return [f"mlp.experts.{w}" for w in modelopt_glue.EXPERT_WEIGHTS]
    return [f"layers.{i}.mlp.experts.{w}" for i in cfg.lora_expert_layers for w in modelopt_glue.EXPERT_WEIGHTS]


def lora_config(cfg: TrainConfig, model: nn.Module | None = None):
    """peft LoraConfig from our TrainConfig. ParamWrapper needs lora_dropout 0 (dropout cannot be factored out of W)."""
    from peft import LoraConfig

    targets = expert_targets(cfg)
    if targets and model is not None:
        check_layers(cfg, model)
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      target_parameters=targets, task_type="CAUSAL_LM")


def check_layers(cfg: TrainConfig, model: nn.Module) -> None:
    layers = getattr(model.config, "num_hidden_layers", None)
    wanted = cfg.lora_expert_layers or []
    if layers is not None and any(i >= layers for i in wanted):
        raise ValueError(f"lora_expert_layers {wanted} names layers the model lacks (it has {layers}: 0..{layers - 1})")


def expert_wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, peft ParamWrapper) for every adapter on an expert weight."""
    from peft.tuners.lora.layer import ParamWrapper

    return [(n, m) for n, m in model.named_modules() if isinstance(m, ParamWrapper)]


def prepare_for_qat(model: nn.Module, log=print) -> int:
    """Make adapters on fake-quantized experts train through the quantizer: fake_quant(W + delta) (see the module doc).

    Converts each ParamWrapper over a modelopt experts module into modelopt's `_QuantParamWrapper` and switches the
    fast experts path off for those experts. Returns how many wrappers were converted.
    """
    from modelopt.torch.opt.dynamic import DynamicModule
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    from engine.fp4 import fast_experts

    converted = 0
    for name, wrapper in expert_wrappers(model):
        experts = wrapper.get_base_layer()
        if not hasattr(experts, f"{wrapper.parameter_name}_weight_quantizer"):
            continue
        if isinstance(wrapper, DynamicModule):  # already converted (modelopt quantized it with the adapter on)
            continue
        QuantModuleRegistry.convert(wrapper)
        fast_experts.disable(experts)
        converted += 1
    if converted:
        log(f"LoRA on {converted} quantized expert weights: trained as fake_quant(W + BA) on modelopt's experts path")
    return converted


def add_adapters(model: nn.Module, cfg: TrainConfig, log=print):
    """Inject the adapters into `model` in place and return peft's LoraModel (keep it: it merges them later).

    QAT uses this instead of TRL's PeftModel: modelopt keeps its state on the quantized model and, asked about a
    PeftModel (when saving checkpoints, at QATSFTTrainer's start), finds it three times through PeftModel's and
    LoraModel's attribute forwarding and stops ("Model has multiple modelopt states!"). Injected in place the model
    stays the root; this is what modelopt's own QATTrainer does with `lora_config` (`model.add_adapter`, which needs
    peft >= 0.22 with transformers 5.24; peft's LoraModel is the same injection). Only the adapters are trainable.
    """
    from peft import LoraModel

    tuner = LoraModel(model, lora_config(cfg, model), "default")
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad-carrying input
    if modelopt_glue.is_quantized(model):
        prepare_for_qat(model, log)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"LoRA r={cfg.lora_r}: {trainable:,} trainable parameters of {sum(p.numel() for p in model.parameters()):,}")
    return tuner


def merge(model: nn.Module) -> nn.Module:
    """The base model with every adapter merged (W <- W + BA * scaling) and the peft wrappers removed.
    `model`: a PeftModel (SFT, via TRL) or the LoraModel that `add_adapters` returned (QAT)."""
    from peft import LoraModel, PeftModel

    if isinstance(model, (PeftModel, LoraModel)):
        return model.merge_and_unload()
    raise TypeError(f"no adapters to merge in a {type(model).__name__}")


@torch.no_grad()
def quantized_weights_with_adapters(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """What the adapted quantized experts compute with, fake_quant(W + delta), keyed like the merged model's weights
    (`model.layers.i.mlp.experts.gate_up_proj`). For tests and checks: compare with the merged model's export."""
    out = {}
    for name, wrapper in expert_wrappers(model):
        experts = wrapper.get_base_layer()
        quantizer = getattr(experts, f"{wrapper.parameter_name}_weight_quantizer", None)
        weight = _raw_parameter(experts, wrapper.parameter_name) + wrapper.get_delta_weight(adapter)
        if quantizer is not None and quantizer.is_enabled:
            weight = quantizer(weight.transpose(-1, -2).contiguous()).transpose(-1, -2).contiguous()
        out[_merged_name(name, wrapper.parameter_name)] = weight
    return out


def _raw_parameter(module: nn.Module, name: str) -> torch.Tensor:
    """The stored weight itself, not modelopt's dynamic attribute (which fake-quantizes it inside a forward)."""
    param = module._parameters.get(name)
    return param if param is not None else dict(module.named_parameters(recurse=False))[name]


def _merged_name(wrapper_name: str, parameter: str) -> str:
    """'base_model.model.model.layers.1.mlp.experts.base_layer' -> 'model.layers.1.mlp.experts.<parameter>'."""
    parts = [p for p in wrapper_name.split(".") if p != "base_layer"]
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    return ".".join(parts + [parameter])
