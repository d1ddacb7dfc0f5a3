"""Server backends: what command serves a checkpoint, how to tell it is up, and whether it is installed here.

One small interface (`ServerBackend`) and one typed options model per backend. Flags are the tools' documented
CLIs (checked against their docs, not guessed):
    transformers serve MODEL --device D --dtype auto --host H --port P   (FORCE_MODEL positional: preloaded, pinned)
    vllm serve MODEL --host H --port P --tensor-parallel-size N --gpu-memory-utilization F --max-model-len L
    python -m sglang.launch_server --model-path MODEL --host H --port P --tp N --reasoning-parser gpt-oss
    trtllm-serve MODEL --host H --port P --backend pytorch --tp_size --pp_size --max_batch_size --max_num_tokens
                 --kv_cache_free_gpu_memory_fraction
All four answer GET /health once the model is loaded and speak OpenAI's /v1/chat/completions.

API keys never go on a command line (the servers table refuses them, and `ps` shows argv to every user):
vLLM reads VLLM_API_KEY from the environment instead; an external endpoint's key lives in memory only.
"""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TransformersOptions(Options):
    device: str = Field("auto", description="'auto' (GPU if any, else CPU), 'cpu', 'cuda:0', ...")
    dtype: str = Field("auto", description="'auto' = the checkpoint's dtype (bf16 for our exports)")
    continuous_batching: bool = False


class VllmOptions(Options):
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    # gpt-oss configs say 131,072 positions; a KV cache that long may not fit, so cap it by default.
    max_model_len: int | None = Field(8192, ge=16)


class SglangOptions(Options):
    tp: int = Field(1, ge=1, le=64)
    mem_fraction_static: float | None = Field(None, gt=0.0, le=1.0)
    reasoning_parser: str | None = "gpt-oss"  # returns the analysis channel as reasoning_content


class TrtllmOptions(Options):
    backend: Literal["pytorch", "tensorrt", "_autodeploy"] = "pytorch"
    tp_size: int = Field(1, ge=1, le=64)
    pp_size: int = Field(1, ge=1, le=64)
    max_batch_size: int = Field(8, ge=1, le=4096)
    max_num_tokens: int = Field(2048, ge=16, le=1_048_576)
    kv_cache_free_gpu_memory_fraction: float = Field(0.9, gt=0.0, le=1.0)


class ServerBackend:
    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    options_model: ClassVar[type[Options]] = Options
    needs_gpu: ClassVar[bool] = True
    notes: ClassVar[str] = ""
    health_path: ClassVar[str] = "/health"

    # -- what subclasses define -----------------------------------------------------------------------------------
    def argv(self, model_path: str, host: str, port: int, options: Options) -> list[str]:
        raise NotImplementedError

    def installed(self) -> bool:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------------------
    def parse_options(self, options: dict | Options | None) -> Options:
        if isinstance(options, self.options_model):
            return options
        return self.options_model.model_validate(dict(options or {}))

    def command(self, model_path: str | Path, host: str, port: int, options: dict | Options | None = None) -> list[str]:
        """The portable command (bare tool names), as a user would type it on another machine."""
        return self.argv(str(model_path), host, int(port), self.parse_options(options))

    def launch_argv(self, command: list[str]) -> list[str]:
        """The same command with its program resolved for this machine (our venv's tools are not on PATH)."""
        program = command[0]
        if program == "python":
            return [sys.executable, *command[1:]]
        return [_find_program(program) or program, *command[1:]]

    def health_url(self, host: str, port: int) -> str:
        return f"http://{_url_host(host)}:{port}{self.health_path}"

    def base_url(self, host: str, port: int) -> str:
        return f"http://{_url_host(host)}:{port}/v1"

    def shell_command(self, model_path: str | Path, host: str, port: int, options: dict | Options | None = None) -> str:
        return shlex.join(self.command(model_path, host, port, options))


class TransformersBackend(ServerBackend):
    name = "transformers"
    label = "transformers serve (CPU or GPU; embedded default)"
    options_model = TransformersOptions
    needs_gpu = False
    notes = ("Hugging Face `transformers serve`: one request at a time (no batching unless continuous batching is "
             "on), eager PyTorch. MXFP4 experts are dequantized to bf16 on load unless a GPU with Triton >= 3.4 and "
             "the `kernels` package is present. NVFP4 (modelopt) weight-only exports are served through a dequantized "
             "float32 copy (engine/fp4/dequantize_nvfp4.py); NVFP4 W4A4 cannot be.")

    def argv(self, model_path, host, port, options: TransformersOptions) -> list[str]:
        argv = ["transformers", "serve", model_path, "--device", options.device, "--dtype", options.dtype,
                "--host", host, "--port", str(port)]
        if options.continuous_batching:
            argv.append("--continuous-batching")
        return argv

    def installed(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in ("transformers", "fastapi", "uvicorn"))


class VllmBackend(ServerBackend):
    name = "vllm"
    label = "vLLM (NVIDIA GPU)"
    options_model = VllmOptions
    notes = ("vLLM serves gpt-oss MXFP4 natively (Hopper: W4A16 Marlin/Triton MoE kernels; Blackwell: native FP4) "
             "and modelopt NVFP4 checkpoints. Its gpt-oss chat path renders prompts with openai-harmony (o200k "
             "vocabulary), so the tiny demo model is best queried through /v1/completions there.")

    def argv(self, model_path, host, port, options: VllmOptions) -> list[str]:
        argv = ["vllm", "serve", model_path, "--host", host, "--port", str(port),
                "--tensor-parallel-size", str(options.tensor_parallel_size),
                "--gpu-memory-utilization", str(options.gpu_memory_utilization)]
        if options.max_model_len:
            argv += ["--max-model-len", str(options.max_model_len)]
        return argv

    def installed(self) -> bool:
        return _find_program("vllm") is not None or importlib.util.find_spec("vllm") is not None


class SglangBackend(ServerBackend):
    name = "sglang"
    label = "SGLang (NVIDIA GPU)"
    options_model = SglangOptions
    notes = "SGLang serves gpt-oss MXFP4 on Hopper/Blackwell; `--reasoning-parser gpt-oss` splits the analysis channel."

    def argv(self, model_path, host, port, options: SglangOptions) -> list[str]:
        argv = ["python", "-m", "sglang.launch_server", "--model-path", model_path, "--host", host,
                "--port", str(port), "--tp", str(options.tp)]
        if options.mem_fraction_static is not None:
            argv += ["--mem-fraction-static", str(options.mem_fraction_static)]
        if options.reasoning_parser:
            argv += ["--reasoning-parser", options.reasoning_parser]
        return argv

    def installed(self) -> bool:
        return importlib.util.find_spec("sglang") is not None


class TrtllmBackend(ServerBackend):
    name = "trtllm"
    label = "TensorRT-LLM trtllm-serve (NVIDIA GPU)"
    options_model = TrtllmOptions
    notes = ("TensorRT-LLM's PyTorch backend serves gpt-oss MXFP4 (W4A16 on Hopper, W4A8/FP4 on Blackwell) and "
             "modelopt NVFP4 checkpoints; NVFP4 W4A4 needs Blackwell FP4 tensor cores.")

    def argv(self, model_path, host, port, options: TrtllmOptions) -> list[str]:
        return ["trtllm-serve", model_path, "--host", host, "--port", str(port), "--backend", options.backend,
                "--tp_size", str(options.tp_size), "--pp_size", str(options.pp_size),
                "--max_batch_size", str(options.max_batch_size), "--max_num_tokens", str(options.max_num_tokens),
                "--kv_cache_free_gpu_memory_fraction", str(options.kv_cache_free_gpu_memory_fraction)]

    def installed(self) -> bool:
        return _find_program("trtllm-serve") is not None


BACKENDS: dict[str, ServerBackend] = {b.name: b for b in (TransformersBackend(), VllmBackend(), SglangBackend(),
                                                          TrtllmBackend())}


def get_backend(name: str) -> ServerBackend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}") from None


@dataclass
class ExternalEndpoint:
    """Any OpenAI-compatible server we did not start. The key stays in this object (process memory): it is never
    written to the database, a log or a recipe, and its repr hides it."""

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    model: str | None = None
    name: str = "external"

    def __post_init__(self):
        self.base_url = self.base_url.strip().rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"an endpoint URL starts with http:// or https://, got {self.base_url!r}")

    def describe(self) -> str:
        key = "key set" if self.api_key else "no key"
        return f"{self.name} · {self.base_url} · {key}"


def _find_program(name: str) -> str | None:
    """`name` on PATH, else next to this interpreter (a venv's console scripts when the venv is not activated)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else None


def _url_host(host: str) -> str:
    """The address a client dials: a wildcard bind is reached on loopback; IPv6 literals need brackets."""
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
