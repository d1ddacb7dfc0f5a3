"""What SFT and QAT share: TRL trainer arguments from our config, metrics into storage, resume.

SFT runs TRL's SFTTrainer; QAT runs modelopt's QATSFTTrainer (SFTTrainer plus modelopt's state handling) on the
already fake-quantized model. Loss is on assistant tokens only (the chat template marks them).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from engine.recipe.configs import TrainConfig
from engine.runtime.context import Context
from engine.runtime.workspace import NO_CHECKPOINT, latest_checkpoint  # noqa: F401 - part of this module's API

TRAINABLE_FILE = "trainable.safetensors"  # LoRA QAT checkpoints: the adapters only (AtomicCheckpoints._save)


class StoreMetricsCallback(TrainerCallback):
    """Trainer logs -> the metrics table (the UI plots them), plus tokens/s and job progress."""

    def __init__(self, ctx: Context, stage_label: str):
        self.ctx = ctx
        self.stage_label = stage_label
        self._last_time: float | None = None
        self._last_tokens = 0.0
        self.note = ""  # appended to every progress message (a restart from step 0 stays visible while it trains)
        self._stored: tuple[int, set[str]] = (-1, set())  # the step last stored and the names stored for it

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.time()
        self._last_tokens = float(state.num_input_tokens_seen or 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        values = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and k != "epoch"}
        values.pop("total_flos", None)
        tokens = float(state.num_input_tokens_seen or 0)
        now = time.time()
        if "loss" in values and self._last_time is not None and now > self._last_time and tokens > self._last_tokens:
            values["tokens_per_s"] = (tokens - self._last_tokens) / (now - self._last_time)
            self._last_time, self._last_tokens = now, tokens
        # One row per step and name: the Trainer repeats num_input_tokens_seen in an evaluation's log and, with
        # train_runtime, in the end-of-training summary of the same step (seen with transformers 5.24 / TRL 1.16).
        step, names = self._stored
        if step != state.global_step:
            step, names = state.global_step, set()
        values = {k: v for k, v in values.items() if k not in names}
        self._stored = (step, names | set(values))
        if values:
            self.ctx.metrics(state.global_step, **values)
        if state.max_steps:
            summary = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k in ("loss", "eval_loss", "learning_rate"))
            self.ctx.progress(state.global_step / state.max_steps, f"{self.stage_label} step {state.global_step}/"
                              f"{state.max_steps} {summary}{self.note}")
        if "loss" in values and not math.isfinite(values["loss"]):
            raise FloatingPointError(
                f"loss became {values['loss']} at step {state.global_step}: lower the learning rate "
                "or check the data for empty/broken examples"
            )


def trl_args(cfg: TrainConfig, ctx: Context, output_dir: Path, max_length: int):
    """TRL SFTConfig from our TrainConfig (the only place where our fields map onto TRL's)."""
    from trl import SFTConfig

    on_cuda = ctx.device.type == "cuda"
    kwargs = dict(
        output_dir=str(output_dir),
        learning_rate=cfg.learning_rate,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=max(cfg.per_device_train_batch_size, 8),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_ratio,  # transformers 5 takes a ratio as a float < 1 here
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=on_cuda and ctx.dtype.is_floating_point and ctx.dtype.itemsize == 2,
        use_cpu=not on_cuda,
        report_to=[],
        assistant_only_loss=True,
        max_length=max_length,
        packing=False,
        include_num_input_tokens_seen=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_only_model=False,
    )
    if cfg.lr_scheduler_type == "cosine_with_min_lr":
        kwargs["lr_scheduler_kwargs"] = {"min_lr_rate": cfg.min_lr_rate}
    return SFTConfig(**kwargs)


def make_trainer(base: type, ctx: Context, cfg: TrainConfig, output_dir: Path, model, tokenizer, rows: tuple,
                 label: str, **extra):
    """`base` (TRL's SFTTrainer or modelopt's QATSFTTrainer) with atomic checkpoints, our arguments, the
    (train, eval) rows and the metrics callback; `extra` goes to the trainer (peft_config, quant_args).
    The model trains with the recipe's `hardware.attention` and `hardware.chunked_loss`."""
    from engine.training import attention

    hw = ctx.recipe.hardware
    attention.use(model, hw.attention, ctx.device, ctx.recipe.data.max_length, log=ctx.log)
    train_rows, eval_rows = rows
    trainer = atomic_trainer(base)(
        model=model,
        args=trl_args(cfg, ctx, output_dir, ctx.recipe.data.max_length),
        train_dataset=as_dataset(train_rows),
        eval_dataset=as_dataset(eval_rows[: cfg.eval_examples]),
        processing_class=tokenizer,
        callbacks=[StoreMetricsCallback(ctx, label)],
        **extra,
    )
    trainer.loss_path = loss_path(hw.chunked_loss, hw.strategy)
    ctx.log(f"loss: {'chunked (TRL fused LM head)' if trainer.loss_path == 'chunked' else 'full logits'}")
    return trainer


def loss_path(chunked_loss: str, strategy: str) -> str:
    """'chunked' or 'full' for the recipe's `hardware.chunked_loss`.

    'chunked' is TRL's SFTTrainer loss as it is (TRL >= 1.x, `trl.trainer.utils.add_fused_lm_head`): the backbone's
    last hidden states go through `trl.kernels.ChunkedLogProbFunction`, which projects [4096 tokens x 32,768 vocab]
    tiles, folds them into an online logsumexp and recomputes each tile in backward, accumulating the lm_head and
    hidden gradients in fp32; only assistant tokens (labels != -100) are scored, summed and divided by
    `num_items_in_batch`. That is the custom autograd function this loss needs, so it is not written again here.
    'full' is `transformers.Trainer.compute_loss`: the model's own forward with labels, [tokens, vocab] logits and
    transformers' ForCausalLMLoss over the same labels and the same `num_items_in_batch`.
    'auto' keeps what SFT and QAT ran before this option existed: chunked, but full under fsdp2, where TRL's fused head
    fails (see AtomicCheckpoints.compute_loss)."""
    if chunked_loss not in ("auto", "on", "off"):
        raise ValueError(f"hardware.chunked_loss must be auto, on or off, not {chunked_loss!r}")
    if chunked_loss == "off" or (chunked_loss == "auto" and strategy == "fsdp2"):
        return "full"
    return "chunked"


def stage_result(metrics: dict) -> dict:
    """What a training stage reports as its result."""
    return {k: v for k, v in metrics.items() if k in ("train_loss", "eval_loss", "train_runtime")}


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def as_dataset(rows: list[dict]):
    """Only `messages` goes to TRL: it renders them with the tokenizer's chat template."""
    from datasets import Dataset

    return Dataset.from_list([{"messages": r["messages"]} for r in rows])


def train(trainer, ctx: Context, output_dir: Path) -> dict:
    """Run (or resume) training; on resume, metric rows after the checkpoint are dropped so plots stay continuous."""
    resume = latest_checkpoint(output_dir)
    main = trainer.is_world_process_zero()  # with several ranks only the main one writes to storage
    if main:
        # Rows of steps after the checkpoint (all of them without one: a kill or cancel before the first save) are
        # trained again; dropped, so every curve has each step once.
        dropped = ctx.store.delete_metrics_after(ctx.job_id, checkpoint_step(resume) if resume else 0)
        if resume is not None:
            ctx.log(f"resuming from {resume} (dropped {dropped} metric rows logged after it)")
        elif ctx.job.get("attempt", 1) > 1 or dropped:
            ctx.progress(0.0, f"{NO_CHECKPOINT} (dropped {dropped} metric rows of the lost steps)")
            for callback in trainer.callback_handler.callbacks:
                if isinstance(callback, StoreMetricsCallback):
                    callback.note = f" ({NO_CHECKPOINT})"
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        done = _eval_at(trainer.state, trainer.state.global_step)
        # The callback stores evaluate()'s eval_loss; evaluating again at a step already evaluated would store a
        # second row for the same step. evaluate() runs on every rank: distributed evaluation is a collective.
        metrics.update(done if done is not None else trainer.evaluate())
    return metrics


def _eval_at(state, step: int) -> dict | None:
    """The eval metrics the trainer logged at `step`, if it evaluated there."""
    return next((dict(e) for e in reversed(state.log_history) if "eval_loss" in e and e.get("step") == step), None)


def atomic_trainer(base: type) -> type:
    """`base` with checkpoints written to a staging dir and renamed into place.

    transformers' Trainer writes `checkpoint-N` file by file; a kill mid-save would leave a directory that looks
    like a checkpoint but is not. Here it is written under `.staging/` and moved with one rename.
    With several ranks every rank writes into the staging dir (its own RNG state; FSDP / ZeRO-3 gather the weights
    collectively), so: the main process clears the staging dir, all wait, all write, all wait, the main process
    renames, all wait (so nobody looks for the checkpoint before it is in place).
    Under FSDP the loss is the model's own instead of TRL's fused LM head (see compute_loss).
    """

    class AtomicCheckpoints(base):
        def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
            from engine.training import prepared_data  # TRL's preparation, once per process (see that module)

            extra = (getattr(self, "completion_only_loss", None), getattr(self, "chat_template", None),
                     getattr(getattr(self, "_tokenizer", None), "eos_token", None))
            return prepared_data.prepare(super()._prepare_dataset, dataset, processing_class, args, packing,
                                         formatting_func, dataset_name, extra)

        def _save_checkpoint(self, model, trial):
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            final_root = self.args.output_dir
            staging = os.path.join(final_root, ".staging")
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            self.args.output_dir = staging
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = final_root
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                target = os.path.join(final_root, name)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(os.path.join(staging, name), target)
                _rotate(Path(final_root), self.args.save_total_limit)
            self.accelerator.wait_for_everyone()

        def _save(self, output_dir=None, state_dict=None):
            if not _injected_adapters(self.model):
                return super()._save(output_dir, state_dict)
            # Adapters injected in place (LoRA QAT): the Trainer would write the whole model (42 GB at 20b) into
            # every checkpoint, though only the adapters train. Resume needs only those (and the optimizer, which
            # the Trainer saves beside them).
            from safetensors.torch import save_file

            os.makedirs(output_dir, exist_ok=True)
            trainable = {n: p.detach().to("cpu").contiguous() for n, p in self.model.named_parameters()
                         if p.requires_grad}
            save_file(trainable, os.path.join(output_dir, TRAINABLE_FILE), metadata={"format": "pt"})

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            path = os.path.join(resume_from_checkpoint, TRAINABLE_FILE)
            if not os.path.exists(path):
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            from safetensors.torch import load_file

            params = dict((model or self.model).named_parameters())
            saved = load_file(path)
            wrong = sorted(set(saved) ^ {n for n, p in params.items() if p.requires_grad})
            if wrong:
                raise ValueError(f"{path}: the checkpoint's trainable parameters do not match this model's: {wrong[:5]}")
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value.to(params[name].device))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            fsdp = getattr(self, "is_fsdp_enabled", False)
            if getattr(self, "loss_path", "chunked") == "full" or (fsdp and _has_fused_lm_head(base)):
                # TRL's SFTTrainer computes the loss through its fused LM head, which runs the backbone and reads the
                # lm_head weight outside FSDP2's hooks. Measured on 2 H100s (torch 2.11, accelerate 1.15, TRL 1.16):
                # "aten.mul.Tensor got mixed torch.Tensor and DTensor" in the final norm. Under FSDP the model's own
                # loss is used instead: the same cross-entropy over the same labels (assistant tokens only, the rest
                # -100) and the router aux loss the model adds itself; TRL's token accuracy / entropy logs are lost.
                # `hardware.chunked_loss: off` takes the same path on purpose (loss_path).
                from transformers import Trainer

                return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            # keywords: modelopt's QAT trainer takes (model, inputs, return_outputs=False, **kwargs)
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    AtomicCheckpoints.__name__ = f"Atomic{base.__name__}"
    return AtomicCheckpoints


def save_final(trainer, tokenizer, out_dir: Path, adapters_of: str | None = None, adapters=None) -> Path:
    """Write the trained model as the stage's output (atomically), from the main process only.

    One process or DDP: every rank holds the whole model; the main one saves it. With LoRA (`adapters_of` = the job
    key of the model the adapters sit on) only the adapters are written, with a pointer to that model
    (engine/training/stage_outputs.py): `adapters` is the LoraModel lora.add_adapters injected (QAT), else the
    trainer's PeftModel (SFT); a quantized model's quantizer buffers go with them.
    FSDP2 / ZeRO-3: the weights are sharded, so all ranks call `trainer.save_model`, which gathers the full state
    dict and writes it on the main process; then the main process renames it into place.
    """
    from engine.fp4 import model_io

    out_dir = Path(out_dir)
    accelerator = trainer.accelerator
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        if trainer.args.should_save:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.unwrap_model(trainer.model).config.output_router_logits = False
        trainer.save_model(str(tmp))
        if trainer.args.should_save:
            tokenizer.save_pretrained(str(tmp))
            model_io.replace_dir(tmp, out_dir)
    elif trainer.args.should_save and adapters_of is not None:
        from engine.fp4 import modelopt_glue
        from engine.training import stage_outputs

        model = accelerator.unwrap_model(trainer.model)
        quantized = model if modelopt_glue.is_quantized(model) else None
        stage_outputs.save_adapter(out_dir, adapters_of, adapters if adapters is not None else model, tokenizer,
                                   quantized_model=quantized)
    elif trainer.args.should_save:
        model_io.save_model_atomic(accelerator.unwrap_model(trainer.model), tokenizer, out_dir)
    accelerator.wait_for_everyone()
    return out_dir


def _injected_adapters(model) -> bool:
    """LoRA injected into the model itself (lora.add_adapters, QAT), not wrapped in a PeftModel (TRL, SFT; peft
    saves only the adapters of a PeftModel already)."""
    from peft import PeftModel

    return not isinstance(model, PeftModel) and any("lora_" in n for n, _ in model.named_parameters())


def _has_fused_lm_head(base: type) -> bool:
    from trl import SFTTrainer

    return issubclass(base, SFTTrainer)


def _rotate(root: Path, keep: int | None) -> None:
    import shutil

    if not keep:
        return
    found = sorted((checkpoint_step(p), p) for p in root.glob("checkpoint-*") if p.is_dir())
    for _, path in found[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
