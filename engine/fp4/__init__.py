"""FP4 quantization and the checkpoints around it: the pure-PyTorch fake quant registered with modelopt
(`torch_backend`), its Triton kernel (`triton_kernel`), the fast QAT path for experts (`fast_experts`), everything
that talks to modelopt (`modelopt_glue`, `import_leaks`, `preview`), loading and saving stage models (`model_io`),
and the MXFP4 / NVFP4 exporters.

May import: `engine.recipe`, `engine.data`. Never the runtime, training, evaluation, serving or stages.
"""
