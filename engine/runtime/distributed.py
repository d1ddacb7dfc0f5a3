"""Multi-process SFT and QAT through `accelerate launch`: the run's accelerate config file and each machine's command.

    hardware.strategy   accelerate config
    ddp                 distributed_type MULTI_GPU (torchrun under the hood); one full model copy per process
    fsdp2               distributed_type FSDP, fsdp_version 2, one FSDP unit per GptOssDecoderLayer
    deepspeed_zero3     distributed_type DEEPSPEED, zero_stage 3, deepspeed_moe_layer_cls_names GptOssDecoderLayer
                        (NVIDIA Model Optimizer's examples/gpt-oss/configs/zero3.yaml)

On CPU only `ddp` runs (asked for FSDP on CPU, accelerate silently trains plain DDP), and it is written as MULTI_GPU
with `use_cpu: true` on purpose: accelerate starts MULTI_CPU runs only through `mpirun` and without it silently
launches one process; its torchrun launcher starts every rank, and the ranks (TrainingArguments.use_cpu) then form
a MULTI_CPU process group over gloo.

The engine runs the command of its own machine (`hardware.machine_rank`) as the job's process (new session, log file,
so cancelling kills every rank). The other machines of a multi-machine run each run their command from
`node_commands`; they need this repository at the same path and the workspace on a shared filesystem.
Inside the ranks only the main process writes to storage (engine/stages/job.py, engine/training/hf_trainer.py).
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.recipe.configs import HardwareConfig, Recipe, TrainConfig
from engine.runtime.workspace import REPO_ROOT, stage_key

LAYER_CLS = "GptOssDecoderLayer"  # transformers' gpt-oss decoder layer: the FSDP unit and the ZeRO-3 MoE leaf
STAGES = ("sft", "qat")  # the stages that train; everything else runs in one process
DISTRIBUTED_TYPES = {"ddp": "MULTI_GPU", "fsdp2": "FSDP", "deepspeed_zero3": "DEEPSPEED"}


@dataclass
class Launch:
    argv: list[str]  # what the engine runs (this machine's rank), via this interpreter's accelerate
    config_path: Path
    commands: list[str]  # one shell command per machine rank, for the UI / the other machines


# ----------------------------------------------------------------------------------------- the config file


def accelerate_config(hw: HardwareConfig, train: TrainConfig, on_cuda: bool, bf16: bool) -> dict:
    """The accelerate config for one training job (its gradient accumulation and clipping go to DeepSpeed)."""
    if hw.strategy == "single":
        raise ValueError("strategy 'single' runs without accelerate launch")
    if hw.strategy in ("fsdp2", "deepspeed_zero3") and not on_cuda:
        # Measured: on CPU accelerate drops the FSDP plugin without a word and trains plain DDP; ZeRO-3 needs CUDA.
        raise ValueError(f"{hw.strategy} needs CUDA GPUs; on CPU use hardware.strategy 'ddp'")
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "distributed_type": DISTRIBUTED_TYPES[hw.strategy],
        "downcast_bf16": "no",
        "enable_cpu_affinity": False,
        "machine_rank": hw.machine_rank,
        "main_process_ip": hw.main_process_ip,
        "main_process_port": hw.main_process_port,
        "main_training_function": "main",
        "mixed_precision": "bf16" if bf16 else "no",
        "num_machines": hw.num_machines,
        "num_processes": hw.num_processes,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": not on_cuda,
    }
    if hw.strategy == "fsdp2":
        config["fsdp_config"] = fsdp2_config()
    elif hw.strategy == "deepspeed_zero3":
        config["deepspeed_config"] = zero3_config(train)
    return config


def fsdp2_config() -> dict:
    return {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": LAYER_CLS,
        # Full state dicts: the final save is one ordinary HF checkpoint that every later stage loads as is.
        "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_reshard_after_forward": True,
        "fsdp_offload_params": False,
        # Every rank loads the model itself (engine/fp4/model_io.py); meta-device loading would need a different loader.
        "fsdp_cpu_ram_efficient_loading": False,
        "fsdp_activation_checkpointing": False,
    }


def zero3_config(train: TrainConfig) -> dict:
    return {
        "zero_stage": 3,
        # The MoE block is one ZeRO-3 leaf: its experts are gathered together instead of hook by hook.
        "deepspeed_moe_layer_cls_names": LAYER_CLS,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "gradient_clipping": train.max_grad_norm,
        "offload_optimizer_device": "none",
        "offload_param_device": "none",
        "zero3_init_flag": True,
        "zero3_save_16bit_model": True,
    }


def write_config(config: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=True))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------- the commands


def launch_args(config_path: Path, hw: HardwareConfig, workdir: Path, job_id: int, machine_rank: int) -> list[str]:
    """`accelerate launch ... -m engine.stages.job --workdir W --job N` for one machine."""
    return [
        "accelerate", "launch",
        "--config_file", str(config_path),
        "--num_processes", str(hw.num_processes),
        "--num_machines", str(hw.num_machines),
        "--machine_rank", str(machine_rank),
        "--main_process_ip", hw.main_process_ip,
        "--main_process_port", str(hw.main_process_port),
        "-m", "engine.stages.job", "--workdir", str(workdir), "--job", str(job_id),
    ]


def node_commands(config_path: Path, hw: HardwareConfig, workdir: Path, job_id: int) -> list[str]:
    """The shell command for each machine rank (index = rank), run from the repository root."""
    return [f"cd {shlex.quote(str(REPO_ROOT))} && {shlex.join(launch_args(config_path, hw, workdir, job_id, rank))}"
            for rank in range(hw.num_machines)]


def engine_argv(config_path: Path, hw: HardwareConfig, workdir: Path, job_id: int) -> list[str]:
    """This machine's command, run with this interpreter (`python -m accelerate.commands.launch` = `accelerate launch`),
    so the ranks use the engine's environment whatever is on PATH."""
    args = launch_args(config_path, hw, workdir, job_id, hw.machine_rank)
    return [sys.executable, "-m", "accelerate.commands.launch", *args[2:]]


def uses_accelerate(recipe: Recipe, stage: str) -> bool:
    return stage in STAGES and recipe.hardware.num_processes > 1


def prepare_launch(recipe: Recipe, job: dict, run_dir: Path, workdir: Path, gpus: list[str]) -> Launch | None:
    """For a training job of a multi-process recipe: write its accelerate config, return the commands; else None.
    `gpus`: the GPUs the engine reserved for the job (empty on CPU); one per local process."""
    if not uses_accelerate(recipe, job["stage"]):
        return None
    hw = recipe.hardware
    on_cuda, per_machine = bool(gpus), hw.num_processes // hw.num_machines
    if on_cuda and len(gpus) != per_machine:
        raise ValueError(f"{per_machine} processes per machine need as many GPUs, the job holds {len(gpus)} "
                         f"({','.join(gpus)}); list them in hardware.gpus, e.g. {list(range(per_machine))}")
    train = recipe.sft if job["stage"] == "sft" else recipe.qat
    bf16 = on_cuda and recipe.model.dtype in ("auto", "bfloat16")
    name = f"{job['id']}-{stage_key(job['stage'], job['fmt'])}.yaml"
    path = write_config(accelerate_config(hw, train, on_cuda, bf16), run_dir / "accelerate" / name)
    return Launch(engine_argv(path, hw, workdir, job["id"]), path, node_commands(path, hw, workdir, job["id"]))


# ----------------------------------------------------------------------------------------- inside a rank


def rank() -> int:
    """Global rank of this process (torchrun / accelerate set RANK); 0 outside a launch."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0
