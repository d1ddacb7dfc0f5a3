"""Serving, for real: a reduced demo run (the engine's own SFT -> PTQ -> QAT -> export stages, in this process, on a
few demo conversations), its MXFP4 export served by `transformers serve` on a free loopback port, talked to through
engine.serving.chat (the openai client). No mocks; every process started is stopped.

The reduced run starts from the tiny base pre-trained briefly (40 steps, in the session's cache, tests/conftest.py
shared_cache) and fine-tunes on TRAINED_ROWS language-task conversations until it answers them: the served
model must give those trained answers, and compute exactly what the exported weights compute in-process.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.data import harmony
from engine.serving import server_process
from engine.serving.chat import ChatClient
from engine.serving.backends import BACKENDS, ExternalEndpoint
from engine.serving.formats import Finding, check_compatibility, inspect_checkpoint
from engine.runtime.workspace import REPO_ROOT
from storage import Store
from storage.db import StorageError

QUESTION = [{"role": "user", "content": "What is 3 plus 4?"}]
SECRET = "sk-test-NEVER-STORE-4242"


@pytest.fixture(scope="module")
def tiny_base(shared_cache) -> Path:
    from engine.data.embedded_model import ensure_tiny_base

    return ensure_tiny_base(shared_cache, steps=40, log=lambda message: None)


TRAINED_ROWS = 8  # demo conversations (language task) the reduced run is fine-tuned on
FORMATS = ("mxfp4", "nvfp4")


@pytest.fixture(scope="module")
def demo_run(tiny_base, tmp_path_factory) -> dict:
    """prepare -> SFT -> PTQ -> QAT -> export for MXFP4 and NVFP4, each stage as the engine's child runs it. Returns
    the QAT models as trained (fp32, fake-quantized), the export dirs and the conversations it was trained on."""
    from test_real_checkpoint import stage_context

    from engine.recipe.files import load_recipe
    from engine.stages import common, export, prepare, ptq, qat, sft
    from engine.runtime.workspace import export_dir

    root = tmp_path_factory.mktemp("demo-run")
    with open(REPO_ROOT / "assets" / "datasets" / "language.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(TRAINED_ROWS)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(REPO_ROOT / "assets" / "recipes" / "smoke.yaml", {
        "model.source": str(tiny_base), "data.source": str(data), "data.eval_source": str(data),
        "ptq.formats": list(FORMATS), "hardware.device": "cpu", "sft.learning_rate": 3e-3, "sft.max_steps": 80,
        "sft.per_device_train_batch_size": 4, "sft.eval_steps": 80, "sft.save_steps": 80, "qat.max_steps": 8,
        "qat.per_device_train_batch_size": 4, "qat.eval_steps": 8, "qat.save_steps": 8})
    store = Store(root / "studio.db")
    ctx = stage_context(store, root / "run", recipe, "prepare")
    prepare.run(ctx)
    sft.run(stage_context(store, root / "run", recipe, "sft", run_id=ctx.run_id))
    models, exports = {}, {}
    for fmt in FORMATS:
        for stage, module in (("ptq", ptq), ("qat", qat)):
            module.run(stage_context(store, root / "run", recipe, stage, fmt, run_id=ctx.run_id))
        fmt_ctx = stage_context(store, root / "run", recipe, "export", fmt, run_id=ctx.run_id, target=f"qat:{fmt}")
        export.run(fmt_ctx)
        models[fmt] = common.open_model(fmt_ctx, f"qat:{fmt}")[0].eval()
        exports[fmt] = export_dir(fmt_ctx.run_dir, fmt)
    return {"model": models["mxfp4"], "export": exports["mxfp4"], "models": models, "exports": exports, "rows": rows}


@pytest.fixture(scope="module")
def quantized(demo_run):
    return demo_run["model"]


@pytest.fixture(scope="module")
def mx_export(demo_run) -> Path:
    return demo_run["export"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    workdir = tmp_path_factory.mktemp("serving") / "workspace"
    return Store(workdir / "studio.db")


@pytest.fixture(scope="module")
def server(store, mx_export):
    row = server_process.start_server(store, mx_export, "transformers", timeout=180)
    yield row
    server_process.stop_server(store, row["id"])


@pytest.fixture(scope="module")
def nv_server(store, demo_run):
    """The NVFP4 export served by transformers (through its dequantized copy), beside the MXFP4 one."""
    row = server_process.start_server(store, demo_run["exports"]["nvfp4"], "transformers", timeout=180)
    yield row
    server_process.stop_server(store, row["id"])


@pytest.fixture(scope="module")
def in_process(mx_export):
    """The export loaded the way the docs say to on CPU: MXFP4 experts dequantized, the export's bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Mxfp4Config

    model = AutoModelForCausalLM.from_pretrained(str(mx_export), quantization_config=Mxfp4Config(dequantize=True),
                                                 dtype=torch.bfloat16)
    return model.eval(), AutoTokenizer.from_pretrained(str(mx_export))


@pytest.fixture(scope="module")
def nv_in_process(demo_run):
    """The NVFP4 export decoded by the exporter's own reader (modelopt's NVFP4QTensor), in float32."""
    from transformers import AutoTokenizer

    from engine.fp4.export_nvfp4 import load_dequantized

    export = demo_run["exports"]["nvfp4"]
    return load_dequantized(export, torch.float32), AutoTokenizer.from_pretrained(str(export))


def served(request, fmt: str) -> tuple[dict, tuple, torch.nn.Module]:
    """(server row, in-process (model, tokenizer), QAT fake-quant model) of one format."""
    names = {"mxfp4": ("server", "in_process"), "nvfp4": ("nv_server", "nv_in_process")}[fmt]
    return (request.getfixturevalue(names[0]), request.getfixturevalue(names[1]),
            request.getfixturevalue("demo_run")["models"][fmt])


# ------------------------------------------------------------------------------------------------ plans, no server


def test_commands_and_options_for_every_backend(mx_export) -> None:
    plan = server_process.plan_server(mx_export, "transformers", port=8123)
    assert plan.command.startswith(f"transformers serve {mx_export} --device cpu --dtype auto")
    assert "--host 127.0.0.1 --port 8123" in plan.command and not plan.errors
    assert plan.info.format == "mxfp4" and plan.info.harmony and not plan.info.response_template
    assert plan.info.embedded_demo  # trained from the embedded tiny model: the Chat tab says it knows single questions
    trt = server_process.plan_server(mx_export, "trtllm", port=8124, options={"tp_size": 2, "max_batch_size": 16,
                                                                       "kv_cache_free_gpu_memory_fraction": 0.5})
    for flag in ("--tp_size 2", "--pp_size 1", "--max_batch_size 16", "--max_num_tokens 2048",
                 "--kv_cache_free_gpu_memory_fraction 0.5", "--backend pytorch"):
        assert flag in trt.command
    assert server_process.plan_server(mx_export, "vllm").command.startswith(f"vllm serve {mx_export} --host 127.0.0.1")
    assert "-m sglang.launch_server --model-path" in server_process.plan_server(mx_export, "sglang").command
    for name in ("vllm", "sglang", "trtllm"):  # none is installed here (and there is no GPU): said, command shown
        plan = server_process.plan_server(mx_export, name)
        assert not plan.installed and any("not installed" in e for e in plan.errors) and plan.command
    with pytest.raises(ValueError):  # typed options: unknown fields (e.g. a key) and out-of-range values refused
        server_process.plan_server(mx_export, "trtllm", options={"api_key": SECRET})
    with pytest.raises(ValueError):
        server_process.plan_server(mx_export, "trtllm", options={"kv_cache_free_gpu_memory_fraction": 1.5})


def _fake_checkpoint(tmp_path: Path, qcfg: dict | None) -> Path:
    path = tmp_path / "ckpt"
    path.mkdir()
    config = {"model_type": "gpt_oss", **({"quantization_config": qcfg} if qcfg else {})}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("qcfg, fmt", [
    ({"quant_method": "mxfp4"}, "mxfp4"),
    ({"quant_method": "modelopt", "quant_algo": "W4A16_NVFP4"}, "nvfp4"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "nvfp4_w4a4"),
    (None, "bf16"),
])
def test_format_detection_and_what_it_needs(tmp_path, qcfg, fmt) -> None:
    info = inspect_checkpoint(_fake_checkpoint(tmp_path, qcfg))
    assert info.format == fmt and not info.embedded_demo
    hopper, blackwell = ({"name": "H100", "capability": (9, 0), "memory_gb": 80},), \
        ({"name": "B200", "capability": (10, 0), "memory_gb": 180},)
    on_hopper = check_compatibility(BACKENDS["vllm"], info, gpus=hopper)
    on_blackwell = check_compatibility(BACKENDS["vllm"], info, gpus=blackwell)
    by_transformers = check_compatibility(BACKENDS["transformers"], info, gpus=())
    errors = lambda found: [f.text for f in found if f.level == "error"]  # noqa: E731
    if fmt == "nvfp4_w4a4":
        assert any("Blackwell-class GPUs (sm_100+)" in e for e in errors(on_hopper)) and not errors(on_blackwell)
    else:
        assert not errors(on_hopper)
    if fmt == "nvfp4_w4a4":  # activations quantized too: no plain copy computes the same
        assert any("no plain copy computes what it computes" in e for e in errors(by_transformers))
    else:  # NVFP4 weight-only through its dequantized copy
        assert not errors(by_transformers)
    if fmt == "nvfp4":
        assert any("dequantized copy" in f.text for f in by_transformers if f.level == "info")
    no_gpu = check_compatibility(BACKENDS["trtllm"], info, gpus=())
    assert any("needs an NVIDIA GPU" in e for e in errors(no_gpu))
    assert all(isinstance(f, Finding) for f in on_hopper)


def test_non_loopback_host_only_when_asked(store, mx_export) -> None:
    with pytest.raises(server_process.ServingError, match="network"):
        server_process.start_server(store, mx_export, host="0.0.0.0")
    assert store.list_servers() == [] or all(r["host"] != "0.0.0.0" for r in store.list_servers())


# ------------------------------------------------------------------------------------------------ a served model


def test_chat_streams_analysis_then_final(server) -> None:
    assert server["status"] == "running" and server_process.is_healthy(server)
    client = ChatClient(server["base_url"], backend="transformers")
    events = list(client.stream_chat(QUESTION, reasoning_language="French", reasoning_effort="low", max_tokens=64))
    kinds = [e.kind for e in events]
    assert kinds[-1] == "done", events[-1]
    result = events[-1].result
    assert result.analysis and result.final, result
    # streamed in pieces, analysis first (the trained final answer is a number: one token, one piece)
    assert kinds.count("analysis") > 1 and kinds.count("final") >= 1
    assert kinds.index("final") > kinds.index("analysis")
    assert "".join(e.text for e in events if e.kind == "analysis") == result.analysis
    assert "".join(e.text for e in events if e.kind == "final").strip() == result.final
    for marker in (*harmony.SPECIAL_TOKENS, "assistantfinal"):
        assert marker not in result.analysis + result.final
    stats = result.stats
    assert 0 < stats.ttft_s < stats.total_s and stats.tokens > 0 and stats.token_source == "server usage"
    assert stats.decode_tokens_per_s > 0 and stats.finish_reason in ("stop", "length")


@pytest.mark.parametrize("fmt", FORMATS)
def test_served_model_gives_the_trained_answers(request, fmt, demo_run) -> None:
    """Each conversation the reduced run was trained on, asked through the app's chat code: the served export must
    pass them by the evaluation's own rule (final answer, reasoning in the requested language)."""
    from engine.evaluation.scoring import judge, requested_language

    server, _, _ = served(request, fmt)
    client = ChatClient(server["base_url"], backend="transformers")
    verdicts = []
    for row in demo_run["rows"]:
        question = [m for m in row["messages"] if m["role"] == "user"]
        reply = client.chat(question, reasoning_language=requested_language(row["messages"]), max_tokens=96)
        assert reply.error is None, reply.error
        verdicts.append((judge(row, {"analysis": reply.analysis, "final": reply.final}), reply.final, row["reference"]))
    passed = sum(v["passed"] for v, _, _ in verdicts)
    print(f"served {fmt} export passes {passed}/{len(verdicts)} trained conversations: {verdicts}")
    # Measured (MXFP4): 7 of 8 (one Spanish subtraction answered with another row's number); the same 40-step base
    # scores 0% in the smoke run's evaluate:original. Allowing two misses keeps the check robust to CPU float
    # differences.
    assert passed >= len(verdicts) - 2, verdicts


def test_nvfp4_is_served_from_its_dequantized_copy(nv_server, demo_run) -> None:
    """transformers cannot load the NVFP4 export: the server loads the copy written next to it, whose experts are
    the export decoded by modelopt's reference (the exporter's reader), to the bit."""
    from engine.fp4.export_mxfp4 import load_export
    from engine.fp4.export_nvfp4 import dequantized_state

    export = demo_run["exports"]["nvfp4"]
    copy_dir = export.with_name("nvfp4-dequantized")
    plan = server_process.plan_server(export, "transformers", port=8125)
    assert plan.served_path == str(copy_dir) and not plan.errors
    assert plan.command.startswith(f"python -m engine.fp4.dequantize_nvfp4 {export} && transformers serve {copy_dir} ")
    assert nv_server["status"] == "running" and nv_server["model_path"] == str(export)
    view = Path(shlex.split(nv_server["command"])[2])  # transformers serve VIEW ...: the harmony view of the copy
    assert (view / "model.safetensors").resolve() == copy_dir / "model.safetensors"
    assert "Traceback" not in server_process.log_tail(nv_server, 200)
    reference = dequantized_state(export)
    copy = load_export(copy_dir, torch.float32).state_dict()
    for name, weight in reference.items():
        assert torch.equal(copy[name], weight.float()), name


@pytest.mark.parametrize("fmt", FORMATS)
def test_served_greedy_reply_equals_in_process(request, fmt) -> None:
    """Token for token: the server's greedy reply is what the exported model generates in-process."""
    server, (model, tokenizer), _ = served(request, fmt)
    client = ChatClient(server["base_url"], backend="transformers")
    served_reply = client.chat(QUESTION, reasoning_language="German", max_tokens=48, temperature=0.0)
    messages = client.build_messages(QUESTION, reasoning_language="German")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=48, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:]
    local = harmony.parse_completion(tokenizer.decode(new, skip_special_tokens=False))
    assert (served_reply.analysis.strip(), served_reply.final.strip()) == (local["analysis"], local["final"])
    assert served_reply.analysis and served_reply.final
    assert served_reply.stats.tokens == len(new)


@pytest.mark.parametrize("fmt", FORMATS)
def test_served_logits_match_in_process(request, fmt) -> None:
    """transformers serve has no logprobs; /v1/systemone returns a softmax over the next-token logits of 26 option
    labels (A..Z) after a prompt. Those probabilities carry 25 logit differences per prompt: they must equal the
    in-process dequantized model's (same weights; MXFP4: bf16, NVFP4: float32), and the fp32 fake-quant model's
    (the QAT model before export) within the rounding of the export's bf16 non-expert weights (and MXFP4's bf16
    compute)."""
    from transformers.decision import DecisionConfig, label_token_ids

    server, (model, tokenizer), quantized = served(request, fmt)
    api = ChatClient(server["base_url"])
    criteria = {f"option {i}": None for i in range(26)}
    for state in ("What is 3 plus 4?", "Is the sky green?", "Count the letters in 'garden'."):
        question = {"type": "choice", "instructions": "Which?", "criteria": criteria}
        request_body = {"state": state, "questions": {"q": question}}
        answer = api._client.post("/systemone", cast_to=object, body={"model": api.model, **request_body})
        served_p = torch.tensor(list(answer["answers"]["q"]["probabilities"].values()), dtype=torch.float64)
        (inputs, questions), = DecisionConfig().prepare_inputs(request_body, tokenizer)
        labels = label_token_ids(tokenizer, tuple(questions[0].labels))
        with torch.no_grad():
            local = model(input_ids=inputs["input_ids"]).logits[0, -1, labels].float().softmax(-1).double()
            fp32 = quantized(input_ids=inputs["input_ids"]).logits[0, -1, labels].softmax(-1).double()
        assert torch.allclose(served_p, local, rtol=0, atol=1e-6), (served_p - local).abs().max()
        # bf16 activations and non-expert weights vs fp32: log-prob differences of a few bf16 ulps (2^-8 = 0.4%)
        assert (served_p.log() - fp32.log()).abs().max() < 0.05, (served_p.log() - fp32.log()).abs().max()


def test_api_key_never_lands_in_the_database(server, store) -> None:
    endpoint = ExternalEndpoint(server["base_url"], api_key=SECRET)
    assert SECRET not in repr(endpoint) and SECRET not in endpoint.describe()
    client = ChatClient(endpoint.base_url, api_key=endpoint.api_key)  # transformers serve ignores the header
    assert SECRET not in repr(client)
    assert client.chat(QUESTION, max_tokens=8).error is None
    with pytest.raises(StorageError):  # the storage layer refuses a key on a recorded command line
        store.add_server(backend="vllm", command=f"vllm serve m --api-key {SECRET}", status="starting")
    workdir = Path(store.path).parent
    for path in [*workdir.glob("studio.db*"), *workdir.glob("servers/**/*.log")]:
        assert SECRET.encode() not in path.read_bytes(), path


def test_a_server_that_cannot_load_fails_with_its_log(store, mx_export, tmp_path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in mx_export.iterdir():
        (broken / item.name).write_bytes(item.read_bytes()[:1000] if item.suffix == ".safetensors" else item.read_bytes())
    with pytest.raises(server_process.ServingError, match="exited while starting") as failure:
        server_process.start_server(store, broken, timeout=180)
    assert "Traceback" in str(failure.value) or "Error" in str(failure.value)  # the log tail says why
    row = [r for r in store.list_servers() if r["model_path"] == str(broken)][0]
    assert row["status"] == "failed" and not server_process.group_alive(row["pid"])


def test_stop_leaves_nothing_and_reconcile_marks_the_killed_one_gone(store, mx_export) -> None:
    first = server_process.start_server(store, mx_export, wait=False)
    second = server_process.start_server(store, mx_export, wait=False)
    try:
        first = server_process.wait_until_healthy(store, first["id"], timeout=180)
        second = server_process.wait_until_healthy(store, second["id"], timeout=180)
        os.killpg(first["pid"], signal.SIGKILL)  # e.g. the OOM killer, or a reboot
        time.sleep(0.5)
        # A restarted app: a new process that did not start these servers finds them by pid and command line.
        code = ("import json, sys; from storage import Store; from engine.serving.server_process import reconcile_servers; "
                "print(json.dumps([r['id'] for r in reconcile_servers(Store(sys.argv[1]))]))")
        out = subprocess.run([sys.executable, "-c", code, str(store.path)], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=120, check=True)
        live = json.loads(out.stdout.strip().splitlines()[-1])
        assert second["id"] in live and first["id"] not in live  # (the module's server is live too)
        assert server_process.get_server(store, first["id"])["status"] == "gone"
        assert server_process.get_server(store, second["id"])["status"] == "running"
    finally:
        stopped = server_process.stop_server(store, second["id"])
        server_process.stop_server(store, first["id"])
    assert stopped["status"] == "stopped" and stopped["stopped_at"]
    for row in (first, second):
        assert not server_process.group_alive(row["pid"]), f"processes of server {row['id']} are left"
        with pytest.raises(ProcessLookupError):
            os.kill(row["pid"], 0)


def test_launch_serve_foreground_until_ctrl_c(mx_export, tmp_path) -> None:
    port = server_process.free_port()
    proc = subprocess.Popen([sys.executable, "launch.py", "--workdir", str(tmp_path / "ws"), "serve", str(mx_export),
                             "--port", str(port)], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)
            lines.append(line)
        text = "".join(lines)
        assert f"http://127.0.0.1:{port}/v1" in text and "command: " in text and "transformers serve" in text, text
        assert ChatClient(f"http://127.0.0.1:{port}/v1").chat(QUESTION, max_tokens=8).error is None
        rows = Store(tmp_path / "ws" / "studio.db").list_servers()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert [r["status"] for r in Store(tmp_path / "ws" / "studio.db").list_servers()] == ["stopped"]
    assert not server_process.group_alive(rows[0]["pid"])


def test_bench_runs_on_cpu_with_a_tiny_model(tmp_path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "bench/serve_bench.py", "--layers", "2", "--experts", "4", "--hidden", "64",
                    "--intermediate", "64", "--heads", "2", "--kv-heads", "1", "--head-dim", "32", "--requests", "3",
                    "--max-tokens", "12", "--chat", "--workdir", str(tmp_path / "ws"), "--json", str(out)],
                   cwd=REPO_ROOT, check=True, timeout=600)
    report = json.loads(out.read_text())
    row = report["results"][0]
    assert row["backend"] == "transformers" and row["requests"] == 3 and row["load_s"] > 0
    assert report["shape"]["layers"] == 2 and report["shape"]["hidden"] == 64  # read back from the served config
    assert row["chat"]["error"] is None and row["chat"]["tokens"] > 0  # the chat endpoint answered
    assert row["gpu_mem_peak_gib"] is None or row["gpu_mem_peak_gib"] > 0  # None: no GPU on this machine
    assert row["ttft_s"]["p50"] > 0 and row["decode_tokens_per_s"]["mean"] > 0 and row["tokens"]["mean"] == 12
    assert all(r["status"] == "stopped" for r in Store(tmp_path / "ws" / "studio.db").list_servers())
    from transformers import Mxfp4Config

    from engine.fp4.export_mxfp4 import load_export

    # The random checkpoint is a well-formed MXFP4 export: every key present, nothing unexpected.
    load_export(tmp_path / "ws" / "model-mxfp4", torch.bfloat16, quantization_config=Mxfp4Config(dequantize=True))

