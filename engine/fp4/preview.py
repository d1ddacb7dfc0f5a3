"""Which modules get FP4 quantizers for a format, before any PTQ has run (the QAT tab's "what gets quantized").

    python -m engine.fp4.preview FORMAT [--block-size N] --out FILE.json

Applies modelopt's config for FORMAT (engine.fp4.modelopt_glue.modelopt_config, the same one PTQ uses) to a freshly built,
untrained embedded tiny gpt-oss and writes engine.fp4.modelopt_glue.quant_summary() as JSON. The module names follow
transformers' GptOss layout, so the table holds for real gpt-oss checkpoints too (with more layers). It runs as a
subprocess (~20 s: importing modelopt dominates) so the web process never imports modelopt or builds a model; the UI
caches the file.
After PTQ ran, runs/<id>/models/ptq-<fmt>/quant_summary.json is the exact table and should be preferred.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def preview(fmt: str, block_size: int | None = None) -> list[dict]:
    from transformers import GptOssForCausalLM

    from engine.fp4 import modelopt_glue
    from engine.data.embedded_model import VOCAB_SIZE, tiny_config

    model = GptOssForCausalLM(tiny_config(VOCAB_SIZE))
    backend = modelopt_glue.resolve_backend("torch", "cpu")
    # No forward loop: nothing is calibrated, only the quantizers are inserted and enabled by the config's patterns.
    model = modelopt_glue.quantize(model, fmt, None, backend, block_size)
    return modelopt_glue.quant_summary(model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format")
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rows = preview(args.format, args.block_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")  # written whole, then renamed: readers never see half
    with os.fdopen(fd, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
