"""Chapter 6's server: the engine's continuous batching against `generate` alone, and the HTTP API driven by
OpenAI's own client: answers, streams, every bad input, a full line, a client that leaves, and a bounded load."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import httpx
import openai
import pytest
import torch
import uvicorn

from ch01_tokenization.tokenization import BPETokenizer
from ch03_gpt_model.gpt import generate
from ch06_llama.chat import ChatModel
from ch06_llama.checkpoints import gguf_metadata
from ch06_llama.layers import LlamaConfig
from ch06_llama.llama import LlamaModel
from ch06_llama.server import create_app
from ch06_llama.serving import Engine, QueueFull, Request, StopStrings
from shared.data import fetch
from shared.network import free_port

ROOT = Path(__file__).resolve().parent.parent
NAME = "toy"


@pytest.fixture(scope="module")
def smollm_parts():
    """SmolLM2's tokenizer and chat template, from the GGUF file (the mirror offline)."""
    reader = gguf.GGUFReader(fetch("smollm2-135m-instruct"))
    return BPETokenizer.from_gguf(reader), gguf_metadata(reader, "tokenizer.chat_template")


def toy_model(dtype=torch.float32, context_length: int = 256, seed: int = 0) -> LlamaModel:
    """A tiny random Llama with SmolLM2's vocabulary: fast, and its greedy tokens are all different."""
    torch.manual_seed(seed)
    model = LlamaModel(LlamaConfig(vocab_size=49152, context_length=context_length, n_layer=2, n_head=4, n_kv_head=2,
                                   n_embd=32, ffn_hidden=64, rope_theta=10000.0, rope_scaling=None))
    return model.to(dtype).eval()


def toy_chat_model(smollm_parts, **kw) -> ChatModel:
    tokenizer, template = smollm_parts
    return ChatModel(toy_model(**kw), tokenizer, template, tokenizer.special_tokens["<|im_end|>"], {})


# ---- the engine ------------------------------------------------------------------------------------------

def test_stop_strings_hold_back_what_may_start_one_and_cut_before_it():
    stops = StopStrings(["\n\n", "END"])
    assert stops.push("Hello E") == ("Hello ", False)          # "E" may begin "END"
    assert stops.push("ND of it") == ("", True)                 # it did: nothing after the stop passes
    other = StopStrings(["END"])
    assert other.push("EN") == ("", False) and other.push("ough") == ("ENough", False)
    assert other.push("EN") == ("", False) and other.flush() == "EN"


def test_batched_requests_get_the_tokens_each_gets_alone_whoever_joins_or_leaves(smollm_parts):
    tokenizer, _ = smollm_parts
    model = toy_model(torch.float64)                  # float64: batching moves no last bit that could flip a token
    prompts = [[5, 17, 300], [9] * 11, [40000, 2, 3, 4, 5, 6], [77], [123, 456], list(range(100, 130))]
    lengths = [12, 3, 20, 7, 1, 15]
    engine = Engine(model, tokenizer, max_batch=4)
    requests = [Request(p, n, temperature=0) for p, n in zip(prompts, lengths)]
    arrivals = {0: requests[:2], 2: requests[2:4], 5: requests[4:]}       # two wait for a free row (max_batch 4)
    rows = []
    for step in range(100):
        for request in arrivals.get(step, []):
            engine.submit(request)
        engine.step()
        rows.append(engine.load["decoding"])
        if all(r.finish_reason for r in requests):
            break
    assert max(rows) == 4 and rows[-1] == 0 and engine.load == {"decoding": 0, "waiting": 0, "cache_bytes": 0}
    for request, prompt, n in zip(requests, prompts, lengths):
        alone = generate(model, torch.tensor([prompt]), n, temperature=0)[0, len(prompt):].tolist()
        assert request.generated == alone and request.finish_reason == "length"


def test_seeded_sampling_repeats_itself_in_any_company(smollm_parts):
    tokenizer, _ = smollm_parts
    engine = Engine(toy_model(torch.float64), tokenizer)

    def sampled(company: int) -> list[int]:
        mine = Request([1, 2, 3], 10, temperature=1.0, top_p=0.9, seed=7)
        for request in [mine] + [Request([4, 5], 10, temperature=1.0) for _ in range(company)]:
            engine.submit(request)
        while mine.finish_reason is None:
            engine.step()
        return mine.generated

    assert sampled(0) == sampled(3)


def test_a_request_ends_at_its_end_token_and_at_a_stop_string(smollm_parts):
    tokenizer, _ = smollm_parts
    model = toy_model(torch.float64)
    engine = Engine(model, tokenizer)
    seeded = dict(temperature=1.0, seed=5)                    # sampled: a random toy model's greedy text repeats
    free = generate(model, torch.tensor([[11, 12]]), 12, temperature=1.0,
                    generator=torch.Generator().manual_seed(5))[0, 2:].tolist()
    k = next(i for i in range(2, 12) if free[i] not in free[:i])         # a token seen there for the first time
    ended = Request([11, 12], 12, end_ids=frozenset({free[k]}), **seeded)
    text = tokenizer.decode(free[:6])
    stop = text[len(tokenizer.decode(free[:3])):][:2]             # two characters from the 4th token's text on
    pieces = []
    stopped = Request([11, 12], 12, stop=[stop], on_text=pieces.append, **seeded)
    for request in (ended, stopped):
        engine.submit(request)
    while not (ended.finish_reason and stopped.finish_reason):
        engine.step()
    assert ended.generated == free[:k + 1] and ended.finish_reason == "stop"
    assert stopped.finish_reason == "stop" and stop not in "".join(pieces)
    assert "".join(pieces) == text[:text.index(stop)]


def test_a_cancelled_request_leaves_and_frees_its_row_and_a_full_line_refuses(smollm_parts):
    tokenizer, _ = smollm_parts
    engine = Engine(toy_model(), tokenizer, max_batch=2, max_waiting=1)
    ended = []
    first = Request([1, 2, 3], 50, temperature=0, on_finish=ended.append)
    second = Request([4, 5], 50, temperature=0)
    engine.submit(first)
    engine.step()
    engine.submit(second)
    engine.step()
    assert engine.load["decoding"] == 2
    bytes_for_two = engine.load["cache_bytes"]
    engine.submit(Request([6], 5))
    with pytest.raises(QueueFull):
        engine.submit(Request([7], 5))
    first.cancel()
    engine.step()                                              # first leaves; the waiting one joins
    assert ended == ["cancelled"] and engine.load["decoding"] == 2 and engine.load["waiting"] == 0
    second.cancel()
    engine.step()
    assert engine.load["decoding"] <= 1 and engine.load["cache_bytes"] < bytes_for_two


def test_a_failing_step_ends_its_requests_as_errors_and_the_engine_goes_on(smollm_parts, monkeypatch, capsys):
    tokenizer, _ = smollm_parts
    model = toy_model()
    engine = Engine(model, tokenizer)
    broken = Request([1, 2], 5)
    engine.submit(broken)
    def lost(*args, **kwargs):
        raise RuntimeError("device lost")

    with monkeypatch.context() as patch:
        patch.setattr(model, "hidden_states", lost)
        engine.step()
    assert broken.finish_reason == "error" and "device lost" in str(engine.error)
    assert "device lost" in capsys.readouterr().err
    fine = Request([1, 2], 5, temperature=0)
    engine.submit(fine)
    while fine.finish_reason is None:
        engine.step()
    assert fine.finish_reason == "length" and len(fine.generated) == 5


def test_bad_requests_are_refused_before_they_queue(smollm_parts):
    with pytest.raises(ValueError, match="temperature"):
        Request([1], 5, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        Request([1], 5, top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Request([1], 0)


# ---- the HTTP API ----------------------------------------------------------------------------------------

class Running:
    """A server on a thread, on a free port of 127.0.0.1, for a test."""

    def __init__(self, app):
        self.app, self.port = app, free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Running":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine(self) -> Engine:
        return self.app.state.server.engine

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


@pytest.fixture(scope="module")
def toy_server(smollm_parts):
    with Running(create_app(toy_chat_model(smollm_parts), NAME)) as running:
        yield running


HELLO = [{"role": "user", "content": "Hello there!"}]


def test_models_chat_streamed_chat_and_completions_answer_the_openai_client(toy_server):
    client = toy_server.client()
    assert [model.id for model in client.models.list()] == [NAME]
    whole = client.chat.completions.create(model=NAME, messages=HELLO, temperature=0, max_tokens=20)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 20
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 20
    chunks = list(client.chat.completions.create(model=NAME, messages=HELLO, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(chunks) > 3
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 20
    completion = client.completions.create(model=NAME, prompt="Once upon a time", temperature=0, max_tokens=8)
    assert completion.object == "text_completion" and completion.usage.completion_tokens == 8
    streamed = client.completions.create(model=NAME, prompt="Once upon a time", temperature=0, max_tokens=8,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text
    seeded = [client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=10, seed=3).choices[0].message
              .content for _ in range(2)]
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize("change, param, message", [
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be a whole number >= 1"),
    ({"max_tokens": 10_000}, "max_tokens", "at most"),
    ({"max_completion_tokens": -3}, "max_completion_tokens", "must be a whole number >= 1"),
    ({"temperature": -0.5}, "temperature", "temperature must be a number from 0 to 2"),
    ({"temperature": "hot"}, "temperature", "temperature must be a number"),
    ({"top_p": 0}, "top_p", r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, "top_p", r"top_p must be in \(0, 1\]"),
    ({"stop": [1, 2]}, "stop", "stop must be a string or a list"),
    ({"n": 2}, "n", "n must be 1"),
    ({"messages": []}, "messages", "messages must be a non-empty list"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "must have a role"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages", "the prompt takes"),
])
def test_bad_fields_are_a_400_naming_the_field(toy_server, change, param, message):
    body = {"model": NAME, "messages": HELLO, "max_tokens": 5} | change
    with pytest.raises(openai.BadRequestError, match=message) as info:
        toy_server.client().chat.completions.create(**body)
    assert info.value.status_code == 400 and info.value.body["param"] == param
    assert info.value.body["type"] == "invalid_request_error"


def test_unknown_model_bad_json_a_huge_body_and_a_wrong_route_are_answered_not_crashed(toy_server):
    with pytest.raises(openai.NotFoundError, match="does not exist") as info:
        toy_server.client().chat.completions.create(model="gpt-9", messages=HELLO)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="prompt must be a non-empty string"):
        toy_server.client().completions.create(model=NAME, prompt="")
    post = lambda path, **kw: httpx.post(toy_server.url + path, timeout=30, **kw)    # noqa: E731
    broken = post("/v1/chat/completions", content=b'{"model": "toy", "messages": [')
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    assert post("/v1/chat/completions", content=b"[1, 2]").status_code == 400
    huge = post("/v1/completions", content=json.dumps({"model": NAME, "prompt": "x" * 2_000_000}).encode())
    assert huge.status_code == 413 and "at most" in huge.json()["error"]["message"]
    missing = httpx.get(toy_server.url + "/v1/nothing-here", timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()
    assert toy_server.client().models.list().data[0].id == NAME           # still serving


def test_an_api_key_is_required_when_set(smollm_parts):
    with Running(create_app(toy_chat_model(smollm_parts), NAME, api_key="sesame")) as running:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            running.client(api_key="wrong").models.list()
        assert running.client(api_key="sesame").models.list().data[0].id == NAME
        assert httpx.get(running.url + "/", timeout=30).status_code == 200       # the page itself is public


def slow_chat_model(smollm_parts) -> ChatModel:
    """The toy model, 20 ms a step, with an end token it never produces: a request runs as long as it is told."""
    chat_model = toy_chat_model(smollm_parts, context_length=4096)
    model, hidden_states = chat_model.model, chat_model.model.hidden_states

    def slowly(*args, **kwargs):
        time.sleep(0.02)
        return hidden_states(*args, **kwargs)

    model.hidden_states = slowly
    return ChatModel(model, chat_model.tokenizer, chat_model.template, -1, {})


def test_a_full_line_answers_503_with_retry_after(smollm_parts):
    with Running(create_app(slow_chat_model(smollm_parts), NAME, max_batch=1, max_waiting=1)) as running:
        body = {"model": NAME, "prompt": "Tell me a long story", "max_tokens": 3000, "temperature": 0}
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", running.url + "/v1/completions", json=body | {"stream": True}) as first:
                first_lines = first.iter_lines()          # kept: a dropped iterator closes the connection
                next(first_lines)                                     # decoding: the one row is taken
                with http.stream("POST", running.url + "/v1/completions", json=body | {"stream": True}) as second:
                    assert second.status_code == 200 and running.engine.load["waiting"] == 1    # in line
                    refused = http.post(running.url + "/v1/completions", json=body)
                    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                    assert refused.json()["error"]["code"] == "server_busy"


def test_a_client_that_disconnects_stops_its_generation_and_frees_its_cache(smollm_parts):
    with Running(create_app(slow_chat_model(smollm_parts), NAME)) as running:
        body = {"model": NAME, "prompt": "Tell me a long story", "max_tokens": 4000, "stream": True}
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", running.url + "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                for _ in range(5):
                    next(lines)
                assert running.engine.load["decoding"] == 1
        deadline = time.monotonic() + 30
        while running.engine.load != {"decoding": 0, "waiting": 0, "cache_bytes": 0}:
            assert time.monotonic() < deadline, f"the request went on after its client left: {running.engine.load}"
            time.sleep(0.05)


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the process's memory from /proc")
def test_32_clients_for_a_bounded_time_get_whole_answers_or_503_and_memory_comes_back(smollm_parts):
    seconds = float(os.environ.get("LOAD_TEST_SECONDS", 10))
    with Running(create_app(toy_chat_model(smollm_parts), NAME, max_batch=8, max_waiting=8)) as running:
        client = running.client(timeout=60)
        client.completions.create(model=NAME, prompt="warm up", max_tokens=4)
        before = rss_mb()
        deadline = time.monotonic() + seconds
        outcomes = []

        def user(k: int) -> None:
            while time.monotonic() < deadline:
                try:
                    chunks = list(client.completions.create(model=NAME, prompt=f"Story number {k}:", stream=True,
                                                            max_tokens=24, temperature=0.8))
                    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
                    outcomes.append("answer")
                except openai.APIStatusError as err:
                    outcomes.append(err.status_code)
                    time.sleep(0.05)

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(user, range(32)))
        assert set(outcomes) <= {"answer", 503} and outcomes.count("answer") >= 32, outcomes[:20]
        idle = time.monotonic() + 10
        while running.engine.load != {"decoding": 0, "waiting": 0, "cache_bytes": 0}:
            assert time.monotonic() < idle
            time.sleep(0.05)
        after = rss_mb()
        print(f"{seconds:.0f} s of 32 clients: {outcomes.count('answer')} answers, {outcomes.count(503)} times 503; "
              f"memory {before:.0f} MB before, {after:.0f} MB after")
        assert after - before < 100                       # no cache or request kept: memory back near its start


# ---- the book's own models: chapter 4's runs, chapter 5's instruct runs, GPT-2 ------------------------------

@pytest.fixture(scope="module")
def book_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-2 as a Hugging Face folder, a 2-step chapter 4 run, and a 1-step chapter 5 instruct run on it."""
    from ch03_gpt_model.gpt import GPTConfig, GPTModel
    from ch04_pretraining.config import TrainConfig
    from ch04_pretraining.pretraining import train
    from ch05_finetuning.finetuning import FinetuneConfig, finetune

    root, quiet = tmp_path_factory.mktemp("book"), dict(log=lambda message: None, progress=False)
    torch.manual_seed(0)
    gpt2 = GPTModel(GPTConfig(vocab_size=50257, context_length=128, n_layer=2, n_head=2, n_embd=16))
    gpt2.save_pretrained_hf(root / "gpt2")
    train(TrainConfig(data="the-verdict", tokenizer="gpt2", model=dict(n_layer=1, n_head=2, n_embd=16,
                      context_length=64), max_steps=2, eval_interval=2, eval_iters=1, batch_size=2,
                      out_dir=str(root / "run")), **quiet)
    finetune(FinetuneConfig.for_task("instruct", data="instruction-data", base=str(root / "gpt2"), batch_size=2,
                                     max_steps=1, eval_interval=1, eval_iters=1, out_dir=str(root / "instruct")),
             **quiet)
    return {"gpt2": root / "gpt2", "run": root / "run", "instruct": root / "instruct"}


@pytest.mark.parametrize("kind", ["gpt2", "run", "instruct"])
def test_the_books_own_models_serve_completions_and_an_instruct_run_chats_in_its_alpaca_format(book_models, kind):
    from ch05_finetuning.instructions import alpaca_prompt
    from ch06_llama.chat import ALPACA_TEMPLATE, Chat, load_chat_model
    chat_model = load_chat_model(book_models[kind])
    model, tokenizer = chat_model.model, chat_model.tokenizer
    assert chat_model.end_of_turn == tokenizer.eot_token == 50256 and str(book_models[kind]) in chat_model.source

    def greedy(ids: list[int], tokens: int) -> str:
        out = generate(model, torch.tensor([ids]), tokens, temperature=0, eos_id=chat_model.end_of_turn)
        return tokenizer.decode([t for t in out[0, len(ids):].tolist() if t != chat_model.end_of_turn])

    with Running(create_app(chat_model, kind)) as running:
        client = running.client()
        completion = client.completions.create(model=kind, prompt="I had always", temperature=0, max_tokens=6)
        assert completion.choices[0].text == greedy(tokenizer.encode("I had always"), 6)
        question = [{"role": "user", "content": "Name a primary colour."}]
        if kind != "instruct":
            assert chat_model.template is None
            with pytest.raises(ValueError, match="has no chat template: it continues text"):
                Chat(chat_model)
            with pytest.raises(openai.BadRequestError, match="has no chat template") as info:
                client.chat.completions.create(model=kind, messages=question, max_tokens=5)
            assert info.value.body["param"] == "model"
            return
        assert chat_model.template == ALPACA_TEMPLATE
        prompt = alpaca_prompt({"instruction": question[0]["content"]})
        assert chat_model.encode(question) == tokenizer.encode(prompt)       # the format chapter 5 trained it on
        answer = client.chat.completions.create(model=kind, messages=question, temperature=0, max_tokens=6)
        assert answer.choices[0].message.content == greedy(tokenizer.encode(prompt), 6)
        assert Chat(chat_model, temperature=0, max_new_tokens=6).reply(question[0]["content"]).text == \
            answer.choices[0].message.content


# ---- the command line, with the real model ----------------------------------------------------------------

@contextlib.contextmanager
def serving(model: Path):
    """`python -m ch06_llama serve --model MODEL` on a free port, and an openai client once it answers, with the
    name it serves. It is stopped with SIGTERM, and must end without a traceback."""
    port = free_port()
    command = [sys.executable, "-m", "ch06_llama", "serve", "--model", str(model), "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                name = client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
                time.sleep(0.2)
        yield client, name
    finally:
        process.terminate()                       # uvicorn shuts down, then ends by the signal it was sent
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Traceback" not in process.stdout.read()


def test_serve_with_the_smollm2_gguf_file_answers_the_openai_client():
    path = fetch("smollm2-135m-instruct")
    with serving(path) as (client, name):
        question = [{"role": "user", "content": "What is the capital of France?"}]
        answer = client.chat.completions.create(model=name, temperature=0, max_tokens=20, messages=question)
        assert name == path.stem and "Paris" in answer.choices[0].message.content      # named after its file


def test_a_chapter_4_run_is_served_for_completions_and_refused_for_chat(book_models):
    with serving(book_models["run"]) as (client, name):
        completion = client.completions.create(model=name, prompt="I had always", max_tokens=5, seed=1)
        assert name == "run" and completion.usage.completion_tokens <= 5 and completion.choices[0].text
    chat = subprocess.run([sys.executable, "-m", "ch06_llama", "chat", "--model", str(book_models["run"])], input="",
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert chat.returncode == 2 and "has no chat template: it continues text" in chat.stderr


# ---- the web chat, in a real browser ---------------------------------------------------------------------

def chromium() -> tuple[str, str] | None:
    """(browser, driver) paths of a Chromium and its ChromeDriver, if this machine has both."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


NO_BROWSER = "no Chromium with ChromeDriver here (Debian: apt-get install chromium chromium-driver, as .ci/run does)"


@pytest.mark.skipif(chromium() is None and not os.environ.get("REQUIRE_BROWSER"), reason=NO_BROWSER)
def test_the_web_chat_streams_an_answer_and_stops_in_a_headless_chromium(smollm_parts):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert chromium() is not None, NO_BROWSER                  # REQUIRE_BROWSER set (CI): no skipping
    browser, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    with Running(create_app(slow_chat_model(smollm_parts), NAME)) as running:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            wait = WebDriverWait(driver, 60, poll_frequency=0.02)
            driver.get(running.url + "/")
            wait.until(lambda d: d.find_element(By.ID, "model").text == NAME)

            def ask(question: str, temperature: str, max_tokens: str) -> None:
                for field, value in (("temperature", temperature), ("max-tokens", max_tokens)):
                    driver.find_element(By.ID, field).clear()
                    driver.find_element(By.ID, field).send_keys(value)
                driver.find_element(By.ID, "message").send_keys(question)
                driver.find_element(By.ID, "send").click()

            ask("Hello!", "0", "40")                          # 40 tokens at 20 ms each: the text grows on screen
            seen = set()
            answer = driver.find_elements(By.CSS_SELECTOR, ".assistant")
            while not (answer and answer[-1].get_attribute("data-done")):
                if answer:
                    seen.add(answer[-1].text)
                answer = driver.find_elements(By.CSS_SELECTOR, ".assistant")
            expected = running.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content":
                                                                "Hello!"}], temperature=0, max_tokens=40)
            assert answer[-1].get_attribute("data-reply") == expected.choices[0].message.content   # exactly
            assert len({text for text in seen if text}) >= 3                   # streamed: several lengths shown

            ask("Tell me more.", "0", "3000")                 # a minute of tokens, stopped after a few
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant")) == 2 and
                       len(d.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text) > 10)
            driver.find_element(By.ID, "stop").click()
            wait.until(lambda d: d.find_element(By.ID, "status").text == "stopped")
            stopped = driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text
            deadline = time.monotonic() + 30
            while running.engine.load["decoding"]:                 # the server stopped generating it too
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text == stopped
            assert not driver.find_element(By.ID, "send").get_attribute("disabled")
        finally:
            driver.quit()
