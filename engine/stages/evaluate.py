"""The same evaluation for every stage: eval loss, pass rate on generated answers, weight quantization error."""

from __future__ import annotations

from engine.evaluation import evaluator, survival
from engine.fp4 import modelopt_glue
from engine.runtime.context import Context
from engine.stages.common import load_splits, model_path, open_model


def stage_label(target: str) -> tuple[str, str]:
    """Job key of the evaluated model -> (stage, format) as in the results table."""
    if target == "prepare":
        return "original", "bf16"
    stage, _, fmt = target.partition(":")
    return stage, fmt or "bf16"


def run(ctx: Context) -> dict:
    cfg = ctx.recipe.eval
    target = ctx.job["target"]
    stage, fmt = stage_label(target)
    model, tokenizer = open_model(ctx, target)
    _, eval_rows = load_splits(ctx)

    ctx.progress(0.05, f"eval loss on {len(eval_rows)} examples")
    picked = pick_examples(eval_rows, cfg.max_examples_per_task)
    loss_batch = "auto" if cfg.batch_size == "auto" else evaluator.LOSS_CPU_BATCH  # a set size is the generation's
    with modelopt_glue.weights_quantized_once(model):  # same numbers, without re-quantizing at every forward
        loss = evaluator.eval_loss(model, tokenizer, eval_rows, ctx.recipe.data.max_length, batch_size=loss_batch)
        metrics: dict = {"eval_loss": loss}
        results = evaluator.generate_and_judge(
            model, tokenizer, picked, cfg.max_new_tokens, cfg.batch_size,
            on_batch=lambda done, total: ctx.progress(0.1 + 0.8 * done / total, f"generated {done}/{total} answers"),
        )
    metrics.update(evaluator.pass_rates(results))

    if fmt != "bf16":
        reference_key = "sft" if ctx.recipe.sft.enabled else "prepare"
        metrics.update(evaluator.weight_errors(model, reference_weights(ctx, target, reference_key, model)))
        if ctx.recipe.sft.enabled:
            metrics.update(survival_metrics(ctx, model))
    ctx.store.put_eval(ctx.run_id, ctx.job_id, stage, fmt, metrics)
    ctx.store.add_eval_examples([example_row(ctx, stage, fmt, i, r) for i, r in enumerate(results)])
    return {k: v for k, v in metrics.items() if isinstance(v, float) and not k.startswith("per_tensor")}


def survival_metrics(ctx: Context, model) -> dict:
    """How much of the fine-tune survives this model's quantization (engine/evaluation/survival.py), against the
    base model's expert weights as stored (an OpenAI MXFP4 base's _blocks/_scales decoded)."""
    base = evaluator.load_expert_weights(model_path(ctx, "prepare"))
    result = survival.fine_tune_survival(model, base) if base else None
    if result is None:
        ctx.log("fine-tune survival not computed: no expert weights readable in the base model's checkpoint")
        return {}
    ctx.log(f"fine-tune survival: {100 * result['erased_share']:.1f}% of the expert weights SFT changed are served "
            f"at the base's value; surviving delta {result['surviving_delta']:.3f}")
    return {"finetune_erased_share": result["erased_share"], "finetune_surviving_delta": result["surviving_delta"],
            "per_tensor_finetune_survival": result["per_tensor"]}


def reference_weights(ctx: Context, target: str, reference_key: str, model) -> dict | None:
    """The expert weights of the unquantized model this one came from, for the weight error.

    Read from the reference's files when it is a whole model; a PTQ model that kept only its quantizers computes on
    the reference's weights untouched, so its own master weights are the reference. A LoRA QAT model over a LoRA
    SFT has no cheap reference (rebuilding the SFT model would take a second copy in memory): None, and the
    table shows the error against the model's own master weights only."""
    from engine.training import stage_outputs

    path = model_path(ctx, reference_key)
    if not stage_outputs.is_lean(path):
        return evaluator.load_expert_weights(path)
    if stage_outputs.expert_weights_in_memory(ctx.run_dir, target, reference_key):
        return {item.name: item.weight.detach() for item in modelopt_glue.expert_weights(model)}
    ctx.log(f"no weight error against {reference_key}: it is stored as adapters over its base")
    return None


def pick_examples(rows: list[dict], per_task: int) -> list[dict]:
    """The first `per_task` eval rows of each task (the eval split is already a deterministic shuffle)."""
    counts: dict[str, int] = {}
    picked = []
    for row in rows:
        task = row.get("task") or "default"
        if counts.get(task, 0) < per_task:
            counts[task] = counts.get(task, 0) + 1
            picked.append(row)
    return picked


def example_row(ctx: Context, stage: str, fmt: str, idx: int, result: dict) -> dict:
    row = result["row"]
    prompt = evaluator.prompt_messages(row)
    return {
        "run_id": ctx.run_id, "job_id": ctx.job_id, "stage": stage, "fmt": fmt,
        "task": row.get("task") or "default", "idx": idx,
        "prompt": "\n".join(f"[{m['role']}] {m.get('content', '')}" for m in prompt if m["role"] != "system"),
        "reference": evaluator.reference_of(row),
        "completion": result["completion"].get("raw", ""),
        "passed": int(bool(result["verdict"]["passed"])),
        "detail": {**result["verdict"], "analysis": result["completion"].get("analysis"),
                   "final": result["completion"].get("final")},
    }
