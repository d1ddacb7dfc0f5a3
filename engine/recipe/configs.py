"""Typed configs, one per stage, and the recipe that groups them.

These classes are the single source of truth: the recipe YAML keys, the CLI flags and the UI forms are all
generated from the fields below (their defaults, bounds and `description` help texts). Defaults follow NVIDIA
Model Optimizer's gpt-oss recipe (examples/gpt-oss: sft_full.yaml / sft_lora.yaml); the tiny CPU demo overrides
them in assets/recipes/demo.yaml.

Unknown keys are errors (`extra="forbid"`), so a typo in a recipe is caught before anything runs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# FP4 formats we offer, mapped to modelopt's config names (see engine/fp4/modelopt_glue.py).
FORMATS = ("mxfp4", "nvfp4", "nvfp4_w4a4")
Format = Literal["mxfp4", "nvfp4", "nvfp4_w4a4"]
FORMAT_LABELS = {
    "mxfp4": "MXFP4 weight-only (MXFP4_MLP_WEIGHT_ONLY_CFG)",
    "nvfp4": "NVFP4 weight-only (NVFP4_MLP_WEIGHT_ONLY_CFG)",
    "nvfp4_w4a4": "NVFP4 weights + activations (NVFP4_MLP_ONLY_CFG)",
}
EMBEDDED_MODEL = "embedded:tiny-gpt-oss"


class StageConfig(BaseModel):
    """Base for all configs: unknown keys are rejected, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StageConfig):
    source: str = Field(
        EMBEDDED_MODEL,
        description="Base model: 'embedded:tiny-gpt-oss' (a 1M-parameter gpt-oss pre-trained on first use and "
        "cached in the workspace), a local directory holding a gpt-oss checkpoint (OpenAI MXFP4 layout or BF16), "
        "or a Hugging Face hub id such as 'openai/gpt-oss-20b'.",
    )
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="Training dtype. 'auto' = bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are slow)."
    )
    trust_remote_code: bool = Field(
        False, description="Allow code from the model repository to run. Off unless you trust the source."
    )
    tiny_pretrain_steps: int = Field(
        600, ge=1, le=100_000,
        description="Embedded model only: optimizer steps of the deterministic base pre-training (cached).",
    )
    tiny_release: Literal["mxfp4", "bf16"] = Field(
        "mxfp4",
        description="Embedded model only: 'mxfp4' releases the base as gpt-oss is released (a short MXFP4 QAT "
        "phase after pre-training, stored as an OpenAI-layout MXFP4 checkpoint, so SFT starts from on-grid expert "
        "weights); 'bf16' keeps the plain BF16 pre-trained base.",
    )


class DataConfig(StageConfig):
    source: str = Field(
        "embedded:demo",
        description="Training data: 'embedded:demo' (both demo tasks), 'embedded:language' or 'embedded:refusal', "
        "a .jsonl / .parquet file in the `messages` chat format, or a Hugging Face dataset id.",
    )
    eval_source: str | None = Field(
        None, description="Optional separate evaluation file or dataset; default: split `eval_fraction` off `source`."
    )
    eval_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="Share of rows held out for evaluation when there is no eval split."
    )
    split_seed: int = Field(42, description="Seed of the deterministic train/eval split.")
    max_length: int = Field(4096, ge=16, le=131_072, description="Longest tokenized example kept (tokens).")


class TrainConfig(StageConfig):
    """Fields shared by SFT and QAT (both run TRL's SFTTrainer)."""

    enabled: bool = Field(True, description="Run this stage.")
    learning_rate: float = Field(2e-5, gt=0.0, le=1.0, description="Peak learning rate.")
    max_steps: int = Field(
        -1, ge=-1, description="Optimizer steps; -1 = train for `num_train_epochs` instead. Must not be 0."
    )
    num_train_epochs: float = Field(1.0, gt=0.0, le=1000.0, description="Epochs when max_steps is -1.")
    per_device_train_batch_size: int = Field(2, ge=1, le=4096, description="Examples per device per micro-batch.")
    gradient_accumulation_steps: int = Field(2, ge=1, le=4096, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Share of steps spent warming up the lr.")
    lr_scheduler_type: Literal["cosine_with_min_lr", "cosine", "linear", "constant"] = Field(
        "cosine_with_min_lr", description="Learning-rate schedule."
    )
    min_lr_rate: float = Field(
        0.1, ge=0.0, le=1.0, description="cosine_with_min_lr only: final lr as a fraction of the peak."
    )
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    gradient_checkpointing: bool = Field(True, description="Trade compute for memory (recompute activations).")
    logging_steps: int = Field(1, ge=1, description="Log loss/lr/grad-norm every N steps.")
    eval_steps: int = Field(8, ge=1, description="Evaluate the eval loss every N steps.")
    eval_examples: int = Field(
        256, ge=1, description="Eval-split rows used for the periodic eval loss while training (the evaluate stage uses all)."
    )
    save_steps: int = Field(50, ge=1, description="Write a resumable checkpoint every N steps.")
    seed: int = Field(42, description="Training seed.")
    lora: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights; merged before export.")
    lora_r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, le=4096, description="LoRA alpha.")
    lora_target_experts: bool = Field(
        False,
        description="LoRA also on the MoE expert weights (peft target_parameters on mlp.experts.gate_up_proj and "
        "down_proj), besides the attention projections. In QAT the adapter is added before the fake quantizer: "
        "the model computes with fake_quant(W + BA), which is what the merged export holds.",
    )
    lora_expert_layers: list[int] | None = Field(
        None,
        description="With lora_target_experts: the layers whose experts get adapters (e.g. [7, 15, 23], one layer "
        "per third as in OpenAI's fine-tuning notebook); none = every layer. Indices 0..1023.",
    )

    @field_validator("lora_expert_layers")
    @classmethod
    def _layers_valid(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("list at least one layer, or leave it empty (none) for every layer")
        if any(i < 0 or i > 1023 for i in v) or len(set(v)) != len(v):
            raise ValueError("layer indices must be unique and within 0..1023")
        return sorted(v)

    @field_validator("max_steps")
    @classmethod
    def _no_zero_steps(cls, v: int) -> int:
        if v == 0:
            raise ValueError("max_steps = 0 would train nothing; use -1 for epoch-based training or a positive number")
        return v


class SFTConfig(TrainConfig):
    """Supervised fine-tuning in BF16 (NVIDIA recipe: full lr 2e-5, LoRA lr 2e-4). The default lr is the full one
    whether or not `lora` is on: a LoRA recipe sets its own."""


class QATConfig(TrainConfig):
    """Quantization-aware training: keep training the fake-quantized SFT model at a smaller lr."""

    learning_rate: float = Field(
        1e-5, gt=0.0, le=1.0, description="Peak learning rate (NVIDIA's QAT value 1e-5: half the full-SFT default 2e-5)."
    )
    lr_scheduler_type: Literal["cosine_with_min_lr", "cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule."
    )


class QuantConfig(StageConfig):
    """Post-training quantization (the PTQ baseline) and the formats QAT trains for."""

    formats: list[Format] = Field(
        default_factory=lambda: ["mxfp4", "nvfp4"],
        description="FP4 formats to quantize to: mxfp4 (MXFP4 weight-only), nvfp4 (NVFP4 weight-only), "
        "nvfp4_w4a4 (NVFP4 weights and MLP inputs; needs Blackwell to serve).",
    )
    calib_size: int = Field(128, ge=1, le=100_000, description="Training examples used to calibrate amax values.")
    block_size: int | None = Field(
        None, ge=8, le=256,
        description="Override the block size along the input dim (default: modelopt's config: 32; 16 for W4A4). "
        "Must divide the expert weights' input dims.",
    )

    @field_validator("formats")
    @classmethod
    def _formats_unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each format may appear once")
        return v


class EvalConfig(StageConfig):
    max_examples_per_task: int = Field(
        600, ge=1, le=1_000_000, description="Eval examples per task used for the pass rate (the eval loss uses all)."
    )
    max_new_tokens: int = Field(96, ge=1, le=32_768, description="Generation budget per answer (greedy decoding).")
    batch_size: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = Field(
        "auto",
        description="Prompts generated together (and rows per eval-loss forward). 'auto': 64 prompts / 32 loss rows "
        "on CPU (as before), on CUDA as many as half the free GPU memory holds (KV cache, attention scores, MLP "
        "activations per row, from the model's config): a tiny model takes all its rows in one batch, since each "
        "decode step of a small model costs a kernel-launch round trip whatever the batch.",
    )


class ExportConfig(StageConfig):
    enabled: bool = Field(True, description="Write a real FP4 checkpoint for each QAT format.")


class HardwareConfig(StageConfig):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where stages run; 'auto' picks CUDA if present.")
    gpus: list[int] | None = Field(None, description="GPU indices for this run (default: GPU 0).")
    fp4_backend: Literal["auto", "modelopt", "torch"] = Field(
        "auto",
        description="Fake-quant path: 'modelopt' (its CUDA kernels and expert wrapper), 'torch' (our backend, "
        "bit-exact to modelopt's reference QTensors, inside modelopt's expert wrapper), 'auto' (our backend and our "
        "fast experts path: each expert weight quantized once per forward, grouped matmuls; same numbers).",
    )
    attention: Literal["auto", "eager", "flex"] = Field(
        "auto",
        description="Attention kernel for SFT and QAT: 'flex' (PyTorch flex_attention, compiled on CUDA: gpt-oss's "
        "sinks, 128-token sliding window and GQA in one fused kernel that never builds the [batch, heads, T, T] "
        "scores: long contexts fit), 'eager' (transformers' reference; memory grows with T squared), 'auto' (flex "
        "on CUDA when data.max_length is 1024 or more, else eager: below that its compile, tens of seconds per "
        "process, costs more than it saves; eager on CPU). On CPU 'flex' runs flex's unfused reference (as slow as "
        "eager; for checks only).",
    )
    chunked_loss: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Loss without the [tokens, vocabulary] logits: 'on' (TRL's fused LM head: lm_head + cross-"
        "entropy in tiles, recomputed in backward; the logits of gpt-oss's 201,088-token vocabulary are never "
        "stored), 'off' (the model's own loss over the full logits), 'auto' (on, except under fsdp2 where TRL's "
        "fused head cannot run). Same labels (assistant tokens only) and normalisation either way.",
    )
    reuse_process: bool = Field(
        True,
        description="Run the run's next ready job in the process of the one that just finished (same device): "
        "torch, transformers and modelopt are imported once, and a model loaded for an evaluation serves the "
        "export after it. Each job keeps its own status, log, cancel and resume. Off: a fresh process per job.",
    )
    gpu_memory_limit_gib: float | None = Field(
        None, gt=0,
        description="Cap on the GPU memory each job process may use, in GiB (empty: the whole card). Runs as if "
        "on a smaller card (79 for an H100 80GB) or leaves room for another process on a shared one: torch's "
        "allocator never holds more and fails with out-of-memory past it, as that card would. 'Will it fit?' "
        "answers for the capped card. Must not exceed the card's memory; ignored on CPU.",
    )
    strategy: Literal["single", "ddp", "fsdp2", "deepspeed_zero3"] = Field(
        "single",
        description="How SFT and QAT spread over processes: 'single' (one process), 'ddp' (a full copy per GPU), "
        "'fsdp2' (PyTorch FSDP2, GptOssDecoderLayer units), 'deepspeed_zero3' (ZeRO-3, NVIDIA's gpt-oss recipe; "
        "needs CUDA and the deepspeed package). Anything but 'single' launches through `accelerate launch`; "
        "on CPU only 'ddp' runs (over gloo).",
    )
    num_processes: int = Field(
        1, ge=1, le=4096,
        description="Training processes over all machines together (one per GPU). More than 1 needs a strategy "
        "other than 'single'; prepare, PTQ, evaluation and export always run in one process.",
    )
    num_machines: int = Field(
        1, ge=1, le=512,
        description="Machines in the run. With more than 1, the run's workspace must be on a filesystem all of "
        "them share, and each other machine runs the command the UI shows for its rank.",
    )
    machine_rank: int = Field(
        0, ge=0, le=511, description="Rank of the machine the engine runs on (0 = the main one, the usual case)."
    )
    main_process_ip: str = Field(
        "127.0.0.1", min_length=1, max_length=253,
        description="Address of the rank-0 machine that the other machines can reach (multi-machine runs).",
    )
    main_process_port: int = Field(
        29500, ge=0, le=65535,
        description="TCP port of the rank-0 machine for the process-group rendezvous; 0 = any free port "
        "(one machine only).",
    )

    @model_validator(mode="after")
    def _launch_consistent(self) -> HardwareConfig:
        if self.strategy == "single" and self.num_processes != 1:
            raise ValueError("strategy 'single' means num_processes 1; for more processes pick ddp, fsdp2 or "
                             "deepspeed_zero3")
        if self.strategy != "single" and self.num_processes == 1:
            raise ValueError(f"strategy {self.strategy!r} needs num_processes 2 or more; with one process use "
                             "strategy 'single'")
        if self.num_processes % self.num_machines:
            raise ValueError(f"num_processes ({self.num_processes}) must be a multiple of num_machines "
                             f"({self.num_machines}): each machine runs the same number of processes")
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank {self.machine_rank} must be below num_machines {self.num_machines}")
        if self.device == "cpu" and self.strategy in ("fsdp2", "deepspeed_zero3"):
            raise ValueError(f"strategy {self.strategy} needs CUDA GPUs; on CPU use ddp")
        if self.strategy == "fsdp2" and self.chunked_loss == "on":
            raise ValueError("chunked_loss 'on' cannot run under fsdp2 (TRL's fused LM head reads the lm_head "
                             "outside FSDP2's hooks): use 'auto' or 'off'")
        if self.num_machines > 1 and self.main_process_port == 0:
            raise ValueError("multi-machine runs need a fixed main_process_port that the other machines dial")
        per_machine = self.num_processes // self.num_machines
        if self.gpus is not None and self.num_processes > 1 and len(self.gpus) != per_machine:
            raise ValueError(f"gpus lists {len(self.gpus)} GPUs but each machine runs {per_machine} processes "
                             "(one per GPU)")
        return self


class Recipe(StageConfig):
    """A whole run: base model -> SFT -> PTQ / QAT per format -> evaluate every stage -> export."""

    name: str = Field("demo", min_length=1, max_length=120, description="A label for the run.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    ptq: QuantConfig = Field(default_factory=QuantConfig)
    qat: QATConfig = Field(default_factory=QATConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)

    @model_validator(mode="after")
    def _qat_needs_formats(self) -> Recipe:
        if self.qat.enabled and not self.ptq.formats:
            raise ValueError("qat.enabled needs at least one format in ptq.formats")
        sharded = self.hardware.strategy in ("fsdp2", "deepspeed_zero3")
        if sharded and ((self.sft.enabled and self.sft.lora) or (self.qat.enabled and self.qat.lora)):
            raise ValueError("LoRA runs are merged in memory before saving, which needs the whole model in one "
                             "process: use hardware.strategy 'ddp' or 'single' with LoRA")
        return self


def leaf_fields(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, pydantic FieldInfo) for every leaf field of the recipe."""
    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.extend(leaf_fields(annotation, f"{prefix}{name}."))
        else:
            out.append((f"{prefix}{name}", field))
    return out
