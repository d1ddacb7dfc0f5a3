"""Stage 5: write a real FP4 checkpoint of the final model of a format, and prove it holds the trained weights.

mxfp4 -> OpenAI's gpt-oss layout (engine/fp4/export_mxfp4.py; what vLLM / TRT-LLM / transformers load for gpt-oss);
nvfp4, nvfp4_w4a4 -> modelopt's unified HF format (engine/fp4/export_nvfp4.py). Both modules explain why we write the
files ourselves instead of calling modelopt's exporter. After writing, the export is read back the way a server
would read it and every expert weight must equal the fake-quant weight the model was evaluated with, exactly.
"""

from __future__ import annotations

import torch

from engine.fp4 import modelopt_glue
from engine.runtime.context import Context
from engine.fp4.export_mxfp4 import export_mxfp4, non_expert_state, verify_mxfp4_export
from engine.fp4.export_nvfp4 import export_nvfp4, verify_nvfp4_export
from engine.stages.common import open_model
from engine.runtime.workspace import export_dir

EXPORT_DTYPE = torch.bfloat16  # unquantized tensors, as OpenAI ships gpt-oss
EXPORTERS = {
    "mxfp4": (export_mxfp4, verify_mxfp4_export),
    "nvfp4": (export_nvfp4, verify_nvfp4_export),
    "nvfp4_w4a4": (export_nvfp4, verify_nvfp4_export),
}
MB = 1024 * 1024


def run(ctx: Context) -> dict:
    fmt = ctx.job["fmt"]
    if fmt not in EXPORTERS:
        raise ValueError(f"no exporter for format {fmt!r}; expected one of {', '.join(EXPORTERS)}")
    export, verify = EXPORTERS[fmt]
    target = ctx.job["target"]
    ctx.progress(0.05, f"loading {target}")
    model, tokenizer = open_model(ctx, target)
    model.eval()

    ctx.progress(0.2, f"writing the {fmt} checkpoint")
    out = export_dir(ctx.run_dir, fmt)
    with ctx.phase("save"):
        manifest = export(model, tokenizer, out, dtype=EXPORT_DTYPE)

    ctx.progress(0.6, "verifying: reading the export back and comparing every expert weight")
    expected = modelopt_glue.effective_expert_weights(model)
    check = verify(out, expected, non_expert_state(model, skip=expected))
    ctx.log(f"verified {check['tensors_checked']} tensors; expert weights exact (max |diff| {check['max_abs_diff']})")

    bf16_bytes = sum(p.numel() for p in model.parameters()) * 2
    ctx.store.add_artifact(ctx.run_id, ctx.job_id, "export", str(out), meta={
        "format": fmt, "bytes": manifest["bytes"], "verified": True, "max_abs_diff": check["max_abs_diff"],
        "files": manifest["files"], "dtype": manifest["dtype"], "bf16_bytes": bf16_bytes,
    })
    ctx.progress(1.0, f"exported {fmt} to {out}")
    return {
        "format": fmt, "path": str(out), "size_mb": round(manifest["bytes"] / MB, 3),
        "bf16_size_mb": round(bf16_bytes / MB, 3), "verified": True, "max_abs_diff": check["max_abs_diff"],
    }
