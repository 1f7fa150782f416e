"""Export, serving and the A/B report, on a tiny model trained for two steps."""

import asyncio
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from specialist.config import validate_config
from specialist.deploy.ab import ab_report, two_proportion_test, wilson_interval
from specialist.deploy.arms import load_arm, parse_split
from specialist.deploy.export import ExportMismatch, compare_outputs, export_run, load_exported
from specialist.deploy.serve import ROUTER, BackgroundServer as RunningServer, Router, ServeSettings, create_app
from specialist.errors import ConfigError
from specialist.pipeline import train_only


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder with a LoRA adapter (module scope: trained once for every test here)."""
    import sys

    from conftest import LOG_EXAMPLES

    tmp = tmp_path_factory.mktemp("deploy")
    sys.path.insert(0, str(tmp))
    data = tmp / "data.jsonl"
    rows = [{"prompt": f"{LOG_EXAMPLES[i % 3][0]} #{i}", "completion": json.dumps(LOG_EXAMPLES[i % 3][1])}
            for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp, data


@pytest.fixture
def run_dir(trained_run, tiny_model_dir):
    tmp, data = trained_run
    folder = tmp / "runs" / "tiny"
    if not (folder / "adapter").is_dir():
        config = validate_config({
            "data": {"path": str(data), "dedupe": {"near": False}},
            "model": {"name": str(tiny_model_dir), "dtype": "float32"},
            "method": {"r": 4, "alpha": 8},
            "training": {"max_steps": 2, "batch_size": 4, "max_length": 128, "learning_rate": 0.05,
                         "report_to": []},
            "evaluation": {"max_new_tokens": 8},
            "output": {"dir": str(tmp / "runs"), "run_name": "tiny"}})
        train_only(config, "tiny")
    return folder


# ---- export -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["merged", "adapter"])
def test_export_loads_back_and_answers_the_golden_prompts_like_the_run(run_dir, tmp_path, fmt):
    result = export_run(run_dir, fmt, tmp_path / fmt, golden=4, max_new_tokens=8)
    check = json.loads((result.folder / "export_check.json").read_text())
    assert check["prompts"] == 4 and check["mismatches"] == []
    assert (result.folder / "template.json").is_file() and (result.folder / "tokenizer_config.json").is_file()
    if fmt == "merged":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(result.folder)  # plain transformers, no PEFT
        assert not any("lora" in name for name, _ in model.named_parameters())
        assert model.generation_config.eos_token_id
    else:
        assert (result.folder / "adapter_config.json").is_file()
        assert (result.folder / "adapter_model.safetensors").is_file()
    model, tokenizer, template = load_exported(result.folder)
    assert template.kind in ("builtin", "chat") and tokenizer.eos_token


def test_a_different_model_is_reported_as_a_mismatch(run_dir, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specialist.data import PromptTemplate, read_split

    exported = load_exported(export_run(run_dir, "merged", tmp_path / "m", golden=2, max_new_tokens=6).folder)[0]
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for param in other.parameters():
        param.data.normal_(std=0.5)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [ex.prompt for ex in read_split(run_dir / "data").test[:4]]
    check = compare_outputs(exported, other, tokenizer, PromptTemplate.load(run_dir / "template.json"), prompts, 6)
    assert check["mismatches"] and {"run", "export", "run_stopped", "export_stopped"} <= set(check["mismatches"][0])
    assert issubclass(ExportMismatch, Exception) and ExportMismatch.exit_code == 1


def test_export_refuses_a_folder_without_a_model_and_an_unknown_format(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {"path": "d.jsonl"}}))
    with pytest.raises(ConfigError, match="holds no trained model"):
        export_run(tmp_path, "gguf")
    with pytest.raises(ConfigError, match="unknown export format"):
        export_run(tmp_path, "onnx")


# ---- routing ----------------------------------------------------------------------------------------------


def test_split_routing_is_sticky_per_user_and_follows_the_weights():
    router = Router({"tuned": None, "base": None}, parse_split("tuned=0.8,base=0.2", ["tuned", "base"]))
    assert {router.pick(ROUTER, "alice") for _ in range(20)} == {router.pick(ROUTER, "alice")}
    picks = [router.pick(ROUTER, f"user{i}") for i in range(1000)]
    assert 0.75 < picks.count("tuned") / 1000 < 0.85
    assert router.pick("base", "alice") == "base" and router.pick("nope", None) is None
    with pytest.raises(ConfigError, match="unknown arm"):
        parse_split("tuned=1,other=1", ["tuned", "base"])


# ---- the server -------------------------------------------------------------------------------------------


@pytest.fixture
def arms(run_dir, tiny_model_dir):
    tuned = load_arm("tuned", str(run_dir))
    tuned.max_new_tokens = 8
    base = load_arm("base", str(tiny_model_dir), tuned.template)
    base.max_new_tokens = 8
    return {"tuned": tuned, "base": base}


def settings(tmp_path, **overrides):
    return ServeSettings(**{"split": {"tuned": 0.5, "base": 0.5}, "db": tmp_path / "log.sqlite",
                            "log_prompts": True, **overrides})


def test_openai_client_chat_completion_streaming_and_auth(arms, tmp_path):
    from openai import AuthenticationError, NotFoundError, OpenAI

    app = create_app(arms, settings(tmp_path, api_key="secret"))
    with RunningServer(app) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="secret", max_retries=0)
        assert [m.id for m in client.models.list().data] == [ROUTER, "tuned", "base"]
        chat = client.chat.completions.create(model="tuned", max_tokens=5,
                                              messages=[{"role": "user", "content": "081109 INFO dfs.DataNode: x"}])
        assert chat.model == "tuned" and chat.choices[0].finish_reason in ("stop", "length")
        assert isinstance(chat.choices[0].message.content, str) and chat.usage.completion_tokens <= 5
        completion = client.completions.create(model="base", prompt="Dec 10 sshd[1]: Invalid user x", max_tokens=4)
        assert completion.model == "base" and completion.usage.prompt_tokens > 0
        chunks = list(client.chat.completions.create(model="tuned", max_tokens=6, stream=True,
                                                     messages=[{"role": "user", "content": "a log line"}]))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        whole = client.chat.completions.create(model="tuned", max_tokens=6,
                                               messages=[{"role": "user", "content": "a log line"}])
        assert streamed.strip() == whole.choices[0].message.content  # greedy: streaming changes only the delivery
        routed = client.chat.completions.create(model=ROUTER, user="alice", max_tokens=2,
                                                messages=[{"role": "user", "content": "x"}])
        assert routed.model in ("tuned", "base")
        with pytest.raises(NotFoundError):
            client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
        for request_id in (chat.id, chunks[-1].id):  # a streamed answer's id is the logged one too
            feedback = httpx.post(f"{server.url}/v1/feedback", json={"id": request_id, "score": 1},
                                  headers={"Authorization": "Bearer secret"})
            assert feedback.status_code == 200
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'specialist_requests_total{arm="tuned"}' in metrics and "specialist_latency_seconds" in metrics
    rows = sqlite3.connect(tmp_path / "log.sqlite").execute("SELECT arm, endpoint, prompt FROM requests").fetchall()
    assert len(rows) == 5 and ("base", "completion", "Dec 10 sshd[1]: Invalid user x") in rows


def test_bad_requests_get_openai_shaped_errors(arms, tmp_path):
    app = create_app(arms, settings(tmp_path, max_request_bytes=2000, max_tokens_limit=16))
    with RunningServer(app) as server:
        url = f"{server.url}/v1/chat/completions"
        malformed = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
        assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
        assert httpx.post(url, json={"model": "tuned", "messages": []}).status_code == 400
        assert httpx.post(url, json={"model": "tuned", "messages": [{"role": "user", "content": "x" * 5000}]}
                          ).status_code == 413
        too_many = httpx.post(url, json={"model": "tuned", "max_tokens": 999,
                                         "messages": [{"role": "user", "content": "x"}]})
        assert too_many.status_code == 400 and "limit" in too_many.json()["error"]["message"]
        assert httpx.post(url, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}
                          ).status_code == 404
        assert httpx.post(f"{server.url}/v1/feedback", json={"id": "cmpl-none", "score": 1}).status_code == 404


def test_a_full_queue_answers_503_with_retry_after_and_never_hangs(arms, tmp_path):
    app = create_app(arms, settings(tmp_path, queue_size=1, max_batch=1))
    worker = app.state.workers["tuned"]
    slow = worker.generate_batch

    def slow_batch(*args):
        time.sleep(0.4)
        return slow(*args)

    worker.generate_batch = slow_batch
    body = {"model": "tuned", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    with RunningServer(app) as server, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30),
                                  range(8)))
    statuses = [r.status_code for r in responses]
    assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"


def test_load_32_concurrent_clients_zero_errors_every_request_recorded(arms, tmp_path):
    app = create_app(arms, settings(tmp_path, max_batch=8, max_wait_ms=20, queue_size=256))
    n = 256

    async def client(session: httpx.AsyncClient, i: int) -> int:
        body = {"model": ROUTER, "user": f"u{i % 40}", "max_tokens": 3,
                "messages": [{"role": "user", "content": f"line {i}"}]}
        return (await session.post("/v1/chat/completions", json=body, timeout=60)).status_code

    async def run_load(url: str) -> list[int]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=url, limits=limits) as session:
            semaphore = asyncio.Semaphore(32)

            async def bounded(i):
                async with semaphore:
                    return await client(session, i)

            return await asyncio.gather(*(bounded(i) for i in range(n)))

    with RunningServer(app) as server:
        statuses = asyncio.run(run_load(server.url))
    assert statuses == [200] * n
    recorded = sqlite3.connect(tmp_path / "log.sqlite").execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    assert recorded == n
    workers = app.state.workers.values()
    assert sum(w.batched_requests for w in workers) == n
    assert sum(w.batches for w in workers) < n  # requests were batched together


# ---- A/B report -------------------------------------------------------------------------------------------


def test_wilson_interval_and_two_proportion_test_match_known_values():
    low, high = wilson_interval(8, 10)
    assert abs(low - 0.4902) < 1e-3 and abs(high - 0.9433) < 1e-3
    test = two_proportion_test(90, 100, 75, 100)
    assert abs(test["z"] - 2.7914) < 1e-3 and abs(test["p_value"] - 0.00525) < 1e-4  # pooled: 0.15 / 0.053736


def test_ab_report_counts_arms_latency_pass_rates_and_feedback(tmp_path):
    from specialist.deploy.records import RequestLog

    log = RequestLog(tmp_path / "log.sqlite")
    for i in range(20):
        arm = "tuned" if i < 12 else "base"
        log.add(request_id=f"r{i}", arm=arm, endpoint="chat", user=None, latency_s=0.1 * (i % 4 + 1),
                tokens_in=10, tokens_out=5, format_ok=(i % 6 != 0) if arm == "tuned" else (i % 2 == 0),
                finish_reason="stop", prompt=None, output=None)
    assert log.add_feedback("r1", 1.0, "good") and not log.add_feedback("missing", 0.0, None)
    log.close()
    report = ab_report(tmp_path / "log.sqlite")
    tuned, base = report["arms"]["tuned"], report["arms"]["base"]
    assert (tuned["requests"], base["requests"]) == (12, 8)
    assert tuned["format_pass_rate"] == 10 / 12 and base["format_pass_rate"] == 4 / 8
    assert tuned["feedback_count"] == 1 and tuned["feedback_mean"] == 1.0
    assert tuned["latency_p50_s"] <= tuned["latency_p95_s"]
    assert report["format_pass_tests"][0]["arms"] == ["tuned", "base"]


@pytest.mark.parametrize(("qtype", "tolerance"), [("f32", 1e-4), ("f16", 2e-3), ("q8_0", 2e-2)])
def test_gguf_export_reads_back_through_transformers_with_close_logits(run_dir, tmp_path, qtype, tolerance):
    import gguf

    result = export_run(run_dir, "gguf", tmp_path / qtype, golden=4, max_new_tokens=8, quantize=qtype)
    meta = json.loads((result.folder / "export.json").read_text())
    reader = gguf.GGUFReader(str(result.folder / meta["gguf_file"]))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    check = result.check
    assert check["logits"]["max_relative_l2"] < tolerance and check["logits"]["top1_agreement"] == 1.0
    if qtype != "q8_0":
        assert check["mismatches"] == []
    sizes = {t.name: t.tensor_type.name for t in reader.tensors}
    assert sizes["blk.0.attn_q.weight"] == {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[qtype]
    assert sizes["blk.0.attn_norm.weight"] == "F32"


def test_gguf_tokenizer_reads_back_with_the_same_ids(run_dir, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    result = export_run(run_dir, "gguf", tmp_path / "g", golden=1, max_new_tokens=4, quantize="f16")
    name = json.loads((result.folder / "export.json").read_text())["gguf_file"]
    from_gguf = AutoTokenizer.from_pretrained(result.folder, gguf_file=name)
    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "081109 INFO dfs.DataNode: Receiving block"
    assert from_gguf(text, add_special_tokens=False)["input_ids"] == original(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
def test_int8_export_loads_scores_as_an_eval_arm_and_stays_close(run_dir, tmp_path, mode):
    import torch

    from specialist.evaluate.runner import evaluate_run, load_run_config

    result = export_run(run_dir, "int8", tmp_path / "q8", golden=4, max_new_tokens=8, quantize=mode)
    meta = json.loads((result.folder / "export.json").read_text())
    merged_bytes = sum(p.numel() * 4 for p in load_exported(result.folder)[0].parameters())
    assert meta["int8_mode"] == mode and result.check["logits"]["max_relative_l2"] < 0.1
    model = load_exported(result.folder)[0]
    layer = model.model.layers[0].mlp.down_proj
    if mode == "dynamic":
        assert type(layer).__module__.startswith("torch.ao.nn.quantized.dynamic")  # int8 matmuls
        assert type(model.lm_head) is torch.nn.Linear  # the head stays float
    else:
        assert type(layer) is torch.nn.Linear and meta["int8_bytes"] < 0.5 * merged_bytes  # int8 on disk (scales and header aside: 1/4)
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again after loading
    config = load_run_config(run_dir, ["evaluation.forgetting=false", "evaluation.max_examples=4",
                                       "evaluation.max_new_tokens=6", "evaluation.bootstrap_samples=100"])
    evaluation = evaluate_run(run_dir, config, {"int8": result.folder})
    assert "int8" in evaluation.report["arms"] and "tuned" in evaluation.report["arms"]
    costs = evaluation.report["costs"]
    assert costs["int8"]["weights_bytes"] == meta["int8_bytes"] and costs["tuned"]["generation_seconds"] > 0
    assert "| int8 |" in (run_dir / "report.md").read_text()


# ---- drift ------------------------------------------------------------------------------------------------


def test_psi_and_js_distance_are_zero_for_the_same_data_and_grow_with_shift():
    from collections import Counter

    import numpy as np

    from specialist.deploy.drift import js_distance, population_stability_index

    rng = np.random.default_rng(0)
    reference = rng.normal(100, 10, 2000)
    assert population_stability_index(reference, rng.normal(100, 10, 2000)) < 0.05
    assert population_stability_index(reference, rng.normal(140, 10, 2000)) > 1.0
    words = Counter({"block": 5, "datanode": 3})
    assert js_distance(words, words) == 0.0 and js_distance(words, Counter({"refund": 4})) == 1.0


def fill_log(path, rows):
    from specialist.deploy.records import RequestLog

    log = RequestLog(path)
    for i, (prompt, tokens_in, ok) in enumerate(rows):
        log.add(request_id=f"r{i}", arm="tuned", endpoint="chat", user=None, latency_s=0.1, tokens_in=tokens_in,
                tokens_out=5, format_ok=ok, finish_reason="stop", prompt=prompt, output=None)
    log.close()


def test_drift_cli_passes_on_training_like_traffic_and_fails_with_exit_1_on_shift(run_dir, tmp_path):
    from typer.testing import CliRunner

    from specialist.cli import app
    from specialist.data import PromptTemplate, read_split
    from specialist.models import load_tokenizer
    from specialist.evaluate.runner import load_run_config

    tokenizer = load_tokenizer(load_run_config(run_dir).model.name)
    template = PromptTemplate.load(run_dir / "template.json")
    train = [ex.prompt for ex in read_split(run_dir / "data").train]
    same = [(p, len(template.encode_prompt(p, tokenizer)), True) for p in train]
    fill_log(tmp_path / "same.sqlite", same)
    result = CliRunner().invoke(app, ["drift", str(run_dir), str(tmp_path / "same.sqlite")], terminal_width=200)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "drift.json").read_text())
    assert not summary["drift"] and summary["signals"]["novel_input_share"]["value"] == 0.0
    assert (tmp_path / "drift.png").stat().st_size > 1000

    other = "refund my card payment was declined twice at the checkout page yesterday evening"
    shifted = [(f"{other} {i}", 300 + i, i < 20) for i in range(40)]  # longer, unfamiliar, failing later
    fill_log(tmp_path / "shifted.sqlite", shifted)
    result = CliRunner().invoke(app, ["drift", str(run_dir), str(tmp_path / "shifted.sqlite")], terminal_width=200)
    assert result.exit_code == 1, result.output
    signals = json.loads((tmp_path / "drift.json").read_text())["signals"]
    assert all(signals[name]["drift"] for name in ("input_length_psi", "vocabulary_js_distance",
                                                   "novel_input_share", "format_pass_rate_trend"))


def test_gguf_generates_in_llama_cpp_where_it_is_installed(run_dir, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed here")
    from specialist.data import PromptTemplate, read_split
    from specialist.deploy.export import greedy_answer

    result = export_run(run_dir, "gguf", tmp_path / "g", golden=1, max_new_tokens=6, quantize="f32")
    name = json.loads((result.folder / "export.json").read_text())["gguf_file"]
    llm = llama_cpp.Llama(model_path=str(result.folder / name), n_ctx=256, verbose=False)
    template = PromptTemplate.load(run_dir / "template.json")
    model, tokenizer, _ = load_exported(result.folder)
    prompt = read_split(run_dir / "data").test[0].prompt
    tokens = template.encode_prompt(prompt, tokenizer)
    generated = []
    for token in llm.generate(tokens, temp=0.0, top_k=1):
        if token == tokenizer.eos_token_id or len(generated) == 6:
            break
        generated.append(token)
    expected, _ = greedy_answer(model, tokenizer, template, prompt, 6)
    assert tokenizer.decode(generated, skip_special_tokens=True).strip() == expected
