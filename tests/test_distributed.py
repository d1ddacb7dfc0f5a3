"""Multi-process SFT / QAT through accelerate: configs, commands, and a real 2-process run on CPU (gloo).

The end-to-end test runs prepare -> SFT -> PTQ -> QAT through the real engine with `hardware.num_processes 2`:
`accelerate launch` starts two ranks per training job. The same stages run in this process with one rank at the same
global batch (4 x 2 accumulation vs 4 per rank x 2 ranks) from the same inputs, and the losses must agree.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError
from test_real_checkpoint import (  # noqa: F401 - one_thread is a fixture
    make_mxfp4_checkpoint, make_small_data, one_thread, recipe_for, stage_context)

from engine.runtime import distributed, processes
from engine.recipe.configs import HardwareConfig, Recipe
from engine.runtime.pipeline import _add_jobs, plan
from engine.runtime.worker import Engine, request_cancel
from storage import Store

TRAIN_STAGES = ("prepare", "sft", "ptq", "qat")
LOSS_TOLERANCE = 1e-4  # measured max |2 ranks - 1 rank| over the 12 steps: 0 to 5e-7 (float sums in another order)


# ------------------------------------------------------------------------------------------------ configs, commands


def test_ddp_on_cpu_uses_accelerates_torchrun_launcher(tmp_path):
    """MULTI_GPU + use_cpu: accelerate's MULTI_CPU would need mpirun and otherwise start only one process."""
    from accelerate.commands.config.config_args import load_config_from_file

    hw = HardwareConfig(strategy="ddp", num_processes=2)
    config = distributed.accelerate_config(hw, Recipe().sft, on_cuda=False, bf16=False)
    path = distributed.write_config(config, tmp_path / "ddp.yaml")
    loaded = load_config_from_file(str(path))
    assert loaded.distributed_type == "MULTI_GPU" and loaded.use_cpu and loaded.num_processes == 2
    assert loaded.mixed_precision == "no"


def test_fsdp2_and_zero3_configs_follow_the_gpt_oss_recipe(tmp_path):
    recipe = Recipe.model_validate({"sft": {"gradient_accumulation_steps": 16, "max_grad_norm": 0.5}})
    fsdp = distributed.accelerate_config(HardwareConfig(strategy="fsdp2", num_processes=8), recipe.sft, True, True)
    assert fsdp["distributed_type"] == "FSDP" and fsdp["mixed_precision"] == "bf16"
    assert fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "GptOssDecoderLayer"
    zero3 = distributed.accelerate_config(HardwareConfig(strategy="deepspeed_zero3", num_processes=8), recipe.sft,
                                          True, True)
    ds = zero3["deepspeed_config"]
    assert zero3["distributed_type"] == "DEEPSPEED" and ds["zero_stage"] == 3
    assert ds["deepspeed_moe_layer_cls_names"] == "GptOssDecoderLayer"
    assert (ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (16, 0.5)  # must match the trainer's
    for strategy in ("fsdp2", "deepspeed_zero3"):
        with pytest.raises(ValueError, match=f"{strategy} needs CUDA"):
            distributed.accelerate_config(HardwareConfig(strategy=strategy, num_processes=2), recipe.sft, False, False)


def test_each_machine_gets_its_command(tmp_path):
    from accelerate.commands.launch import launch_command_parser

    hw = HardwareConfig(strategy="fsdp2", num_processes=16, num_machines=2, main_process_ip="10.0.0.5",
                        main_process_port=29600)
    commands = distributed.node_commands(tmp_path / "c.yaml", hw, Path("/shared/ws"), 7)
    assert len(commands) == 2
    for rank, command in enumerate(commands):
        assert f"--machine_rank {rank} " in command and "--main_process_ip 10.0.0.5" in command
        assert command.endswith("-m engine.stages.job --workdir /shared/ws --job 7")
    args = launch_command_parser().parse_args(distributed.launch_args(tmp_path / "c.yaml", hw, Path("/w"), 7, 1)[2:])
    assert (args.num_processes, args.num_machines, args.machine_rank, args.module) == (16, 2, 1, True)
    assert args.training_script == "engine.stages.job" and args.training_script_args == ["--workdir", "/w", "--job", "7"]


@pytest.mark.parametrize("fields, words", [
    ({"strategy": "ddp"}, "strategy 'ddp' needs num_processes 2 or more"),
    ({"num_processes": 2}, "strategy 'single' means num_processes 1"),
    ({"strategy": "ddp", "num_processes": 3, "num_machines": 2}, "multiple of num_machines"),
    ({"strategy": "ddp", "num_processes": 4, "num_machines": 2, "machine_rank": 2}, "below num_machines"),
    ({"strategy": "ddp", "num_processes": 4, "num_machines": 2, "main_process_port": 0}, "fixed main_process_port"),
    ({"strategy": "ddp", "num_processes": 2, "gpus": [0, 1, 2]}, "lists 3 GPUs"),
    ({"strategy": "fsdp2", "num_processes": 2, "device": "cpu"}, "needs CUDA GPUs"),
])
def test_inconsistent_hardware_is_rejected(fields, words):
    with pytest.raises(ValidationError, match=words):
        HardwareConfig(**fields)


def test_lora_with_sharded_strategies_is_refused():
    with pytest.raises(ValidationError, match="LoRA"):
        Recipe.model_validate({"sft": {"lora": True}, "hardware": {"strategy": "fsdp2", "num_processes": 2}})


def test_a_job_sees_only_its_gpus_numbered_as_nvml_numbers_them():
    from engine.runtime.worker import job_env

    base = {"CUDA_VISIBLE_DEVICES": "0,1,2", "CUDA_DEVICE_ORDER": "FASTEST_FIRST", "PATH": "/usr/bin"}
    env = job_env(["1", "2"], base=base)
    assert env["CUDA_VISIBLE_DEVICES"] == "1,2" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["PATH"] == "/usr/bin" and env["PYTHONUNBUFFERED"] == "1"
    assert job_env([], base=base)["CUDA_VISIBLE_DEVICES"] == ""  # a CPU job cannot take a GPU another job holds
    assert base["CUDA_VISIBLE_DEVICES"] == "0,1,2"  # the engine's own environment is left alone


def test_only_training_jobs_of_multi_process_recipes_use_accelerate(tmp_path):
    job = {"id": 3, "stage": "sft", "fmt": "bf16"}
    assert distributed.prepare_launch(Recipe(), job, tmp_path, tmp_path, gpus=[]) is None
    ddp = Recipe.model_validate({"hardware": {"strategy": "ddp", "num_processes": 2}})
    assert distributed.prepare_launch(ddp, {**job, "stage": "ptq", "fmt": "mxfp4"}, tmp_path, tmp_path, []) is None
    launch = distributed.prepare_launch(ddp, job, tmp_path, tmp_path, gpus=[])
    assert launch.argv[1:3] == ["-m", "accelerate.commands.launch"] and launch.config_path.exists()
    with pytest.raises(ValueError, match=r"2 processes per machine need as many GPUs, the job holds 1 \(0\)"):
        distributed.prepare_launch(ddp, job, tmp_path, tmp_path, gpus=["0"])


# ------------------------------------------------------------------------------------------------ 2 ranks on CPU


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    make_mxfp4_checkpoint(root / "gpt-oss-mxfp4")
    train, held_out = make_small_data(root)
    return root / "gpt-oss-mxfp4", train, held_out


def enqueue_training(store: Store, workdir: Path, recipe: Recipe) -> str:
    """A run of the recipe's prepare, SFT, PTQ and QAT jobs (no evaluation: it is not what this test is about)."""
    run_id = store.create_run(recipe.name, recipe.model_dump(mode="json"))
    root = workdir / "runs" / run_id
    root.mkdir(parents=True)
    store.update_run(run_id, run_dir=str(root))
    _add_jobs(store, run_id, [s for s in plan(recipe) if s.stage in TRAIN_STAGES], {}, "cpu")
    return run_id


def losses(store: Store, job_id: int) -> dict[int, float]:
    return {r["step"]: r["value"] for r in store.metrics(job_id=job_id, names=["loss"])}


def single_process_losses(store: Store, run_root: Path, recipe: Recipe, ptq_model: Path) -> tuple[dict, dict]:
    """SFT and QAT in this process, one rank, 4 x 2 accumulation, from the same base and the same PTQ model."""
    from engine.stages import prepare, qat, sft

    single = recipe.model_copy(update={"hardware": HardwareConfig(device="cpu")})
    for section in ("sft", "qat"):
        setattr(single, section, getattr(single, section).model_copy(update={"gradient_accumulation_steps": 2}))
    ctx = stage_context(store, run_root, single, "prepare")
    prepare.run(ctx)
    ctx = stage_context(store, run_root, single, "sft", run_id=ctx.run_id)
    sft.run(ctx)
    sft_losses = losses(store, ctx.job_id)
    shutil.copytree(ptq_model, ctx.model_dir("ptq:mxfp4"))  # QAT from the very PTQ model the 2-rank QAT started from
    ctx = stage_context(store, run_root, single, "qat", "mxfp4", run_id=ctx.run_id)
    qat.run(ctx)
    return sft_losses, losses(store, ctx.job_id)


def test_two_ranks_train_like_one(assets, workdir, one_thread):
    checkpoint, train, held_out = assets
    recipe = recipe_for(checkpoint, train, held_out, **{
        "hardware.strategy": "ddp", "hardware.num_processes": 2, "hardware.main_process_port": 0,
        "sft.per_device_train_batch_size": 4, "qat.per_device_train_batch_size": 4})
    store = Store(workdir / "studio.db")
    run_id = enqueue_training(store, workdir, recipe)
    Engine(workdir, idle_exit=0.5, poll_s=0.2).serve()
    jobs = {j["config"]["key"]: j for j in store.list_jobs(run_id)}
    print({k: round(j["ended_at"] - j["started_at"], 1) for k, j in jobs.items()})
    assert {k: j["status"] for k, j in jobs.items()} == dict.fromkeys(("prepare", "sft", "ptq:mxfp4", "qat:mxfp4"),
                                                                      "succeeded"), [j["error"] for j in jobs.values()]
    run_root = Path(store.get_run(run_id)["run_dir"])
    for key in ("sft", "qat:mxfp4"):
        check_ran_on_two_ranks_and_wrote_once(store, jobs[key], run_root)

    started = time.time()
    ref_sft, ref_qat = single_process_losses(store, workdir / "runs" / "single", recipe,
                                             run_root / "models" / "ptq-mxfp4")
    print(f"single-process reference: {time.time() - started:.1f} s")
    two_sft, two_qat = losses(store, jobs["sft"]["id"]), losses(store, jobs["qat:mxfp4"]["id"])
    assert sorted(two_sft) == sorted(ref_sft) == list(range(1, 9)) and sorted(two_qat) == list(range(1, 5))
    diffs = [abs(two_sft[s] - ref_sft[s]) for s in ref_sft] + [abs(two_qat[s] - ref_qat[s]) for s in ref_qat]
    print(f"max |loss(2 ranks) - loss(1 rank)| = {max(diffs):.2e} over {len(diffs)} steps")
    assert max(diffs) < LOSS_TOLERANCE
    assert two_sft[8] < two_sft[1] - 0.5  # and it trained


def check_ran_on_two_ranks_and_wrote_once(store: Store, job: dict, run_root: Path) -> None:
    log = Path(job["log_path"]).read_text()
    assert "rank 0/2," in log and "rank 1/2," in log  # two processes ran the stage
    assert log.count("succeeded (recorded by rank 0)") == 1 and job["attempt"] == 1 and job["ended_at"]
    rows = store.metrics(job_id=job["id"], names=["loss", "grad_norm", "learning_rate", "eval_loss"])
    counts = Counter((r["step"], r["name"]) for r in rows)
    assert rows and set(counts.values()) == {1}  # one row per step and name: only rank 0 logs
    (launch,) = [a for a in store.artifacts(job["run_id"], kind="launch") if a["job_id"] == job["id"]]
    assert "--num_processes 2" in launch["meta"]["commands"][0]
    stage, _, fmt = job["config"]["key"].partition(":")
    checkpoints = run_root / "checkpoints" / (f"{stage}-{fmt}" if fmt else stage)
    steps = (4, 8) if stage == "sft" else (2, 4)
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in steps]
    for step in steps:
        files = {p.name for p in (checkpoints / f"checkpoint-{step}").iterdir()}
        assert {"trainer_state.json", "rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"} <= files
    assert not list((checkpoints / ".staging").glob("checkpoint-*"))  # every staged checkpoint was moved in
    model_dir = run_root / "models" / (f"{stage}-{fmt}" if fmt else stage)
    assert (model_dir / "model.safetensors").exists() and not model_dir.with_name(model_dir.name + ".tmp").exists()


@pytest.fixture
def two_rank_sft(assets, workdir):
    """A 2-rank SFT job (endless) started by an engine driven by hand, once both ranks train; with the ranks' pids as
    their logs give them, checked against the pids the ranks registered in storage. Whatever is left is killed."""
    checkpoint, train, held_out = assets
    recipe = recipe_for(checkpoint, train, held_out, **{
        "hardware.strategy": "ddp", "hardware.num_processes": 2, "hardware.main_process_port": 0,
        "sft.per_device_train_batch_size": 4, "sft.max_steps": 100_000, "sft.eval_steps": 100_000,
        "sft.save_steps": 100_000, "qat.enabled": False})
    store = Store(workdir / "studio.db")
    run_id = enqueue_training(store, workdir, recipe)
    engine = Engine(workdir, poll_s=0.2)
    engine.engine_id = store.register_engine(os.getpid(), "test")
    try:
        yield _wait_for_two_ranks(engine, store, run_id)
    finally:
        store.stop_engine(engine.engine_id)
        leftovers = [pid for job in store.list_jobs(run_id) for pid, _ in job["ranks"] or []]
        for pid in [*leftovers, *(item.proc.pid for item in engine.running.values())]:
            processes.kill_group(pid, signal.SIGKILL)
        for item in engine.running.values():
            item.proc.wait()


def _wait_for_two_ranks(engine: Engine, store: Store, run_id: str):
    sft = None
    deadline = time.time() + 120
    while time.time() < deadline:  # the engine loop, by hand: run until SFT is training on both ranks
        engine._reap()
        engine._handle_cancels()
        engine._start_ready_jobs()
        sft = next(j for j in store.list_jobs(run_id) if j["stage"] == "sft")
        if sft["status"] == "running" and sft["log_path"] and "SFT step 2/" in Path(sft["log_path"]).read_text():
            break
        time.sleep(0.2)
    assert sft is not None and sft["status"] == "running", sft
    ranks = [int(line.split("pid ")[1].split(")")[0]) for line in Path(sft["log_path"]).read_text().splitlines()
             if line.startswith("== job") and "rank " in line]
    assert len(ranks) == 2 and all(_alive(pid) for pid in ranks)
    assert sorted(pid for pid, _ in sft["ranks"]) == sorted(ranks)  # every rank registered itself
    assert all(os.getsid(pid) == pid for pid in ranks)  # torchrun's ranks lead sessions of their own
    return engine, store, run_id, sft, ranks


def _drive(engine: Engine, until, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not until():
        engine._reap()
        engine._handle_cancels()
        engine._start_ready_jobs()
        time.sleep(0.2)


def test_cancel_stops_every_rank(two_rank_sft, monkeypatch):
    """Even when the launcher cannot pass the SIGTERM on (here it is stopped, as a wedged launcher would be): the
    engine signals every rank itself, and its SIGKILL escalation ends the launcher. The dependants are skipped."""
    from engine.runtime import worker

    monkeypatch.setattr(worker, "KILL_GRACE_S", 2.0)
    engine, store, run_id, sft, ranks = two_rank_sft
    os.kill(sft["pid"], signal.SIGSTOP)
    assert request_cancel(store, sft["id"]) == "cancelling"
    _drive(engine, lambda: store.get_job(sft["id"])["status"] == "cancelled", timeout=60)
    assert store.get_job(sft["id"])["status"] == "cancelled"
    assert not any(_alive(pid) for pid in ranks)
    assert _group_members(sft["pid"]) == [] and all(_group_members(pid) == [] for pid in ranks)
    _drive(engine, lambda: False, timeout=1)  # the next claim skips what depended on SFT
    jobs = {j["config"]["key"]: j["status"] for j in store.list_jobs(run_id)}
    assert jobs == {"prepare": "succeeded", "sft": "cancelled", "ptq:mxfp4": "skipped"}, jobs


def test_a_hard_killed_launcher_leaves_no_rank_alive(two_rank_sft):
    """SIGKILL to the launcher (what recovery and the cancel's escalation send): the engine's clean-up of the dead
    job reaches the ranks, which torchrun had put out of the launcher's process group."""
    engine, store, run_id, sft, ranks = two_rank_sft
    os.kill(sft["pid"], signal.SIGKILL)
    _drive(engine, lambda: store.get_job(sft["id"])["status"] != "running", timeout=30)
    job = store.get_job(sft["id"])
    assert job["status"] == "interrupted" and "SIGKILL" in job["error"], job
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(pid) for pid in ranks):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in ranks)


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, ...
            members.append(int(stat.parent.name))
    return members


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------------------------------------ bookkeeping per rank


def run_child(workdir: Path, job_id: int, rank: int) -> int:
    """`python -m engine.stages.job` as rank `rank` of 2 would run it (the env torchrun gives each rank)."""
    import subprocess
    import sys

    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
    return subprocess.run([sys.executable, "-m", "engine.stages.job", "--workdir", str(workdir), "--job", str(job_id)],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True).returncode


def test_only_rank_0_records_success_and_the_first_failure_wins(workdir):
    store = Store(workdir / "studio.db")
    recipe = Recipe.model_validate({"model": {"source": str(workdir / "no-such-model")}})
    (workdir / "runs" / "r").mkdir(parents=True)
    run_id = store.create_run("ranks", recipe.model_dump(mode="json"), run_dir=str(workdir / "runs" / "r"))
    report = store.add_job(run_id, "report", config={"key": "report"})
    prepare = store.add_job(run_id, "prepare", config={"key": "prepare"})
    for job_id in (report, prepare):
        store.update_job(job_id, status="running")

    assert run_child(workdir, report, rank=1) == 0
    assert store.get_job(report)["status"] == "running"  # rank 1 finished its part but records nothing
    assert run_child(workdir, report, rank=0) == 0
    assert store.get_job(report)["status"] == "succeeded"

    assert run_child(workdir, prepare, rank=1) == 1  # the model source does not exist
    failed = store.get_job(prepare)
    assert failed["status"] == "failed" and failed["error"].startswith("rank 1/2, ")
    assert run_child(workdir, prepare, rank=0) == 1
    assert store.get_job(prepare)["error"] == failed["error"]  # the first failure is kept
