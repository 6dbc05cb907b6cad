"""python -m infer.serve end to end: the real server on 127.0.0.1 and a free port, the official `openai`
client, the shipped small model. Every wait and loop here is bounded in count and time."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from infer import LLM, SamplingParams
from qwen_jax.assets import DEFAULT_MODEL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "qwen3-4m-shakespeare"
ENGINE = ["--max-model-len", "512", "--num-kv-blocks", "512", "--max-num-seqs", "32"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp_path, *flags):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / f"server-{self.port}.log", "w+")
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env["PYTHONPATH"] = REPO
        self.proc = subprocess.Popen([sys.executable, "-m", "infer.serve", "--port", str(self.port), *ENGINE, *flags],
                                     cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError("server did not come up in 180 s:\n" + self.output())

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                             timeout=120, **kw)

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llm():
    return LLM(DEFAULT_MODEL, max_model_len=512, num_kv_blocks=512)


def test_stream_equals_whole_equals_llm_generate(server, llm):
    c = server.client()
    whole = c.completions.create(model=MODEL, prompt="ROMEO.\n", max_tokens=24, temperature=0)
    chunks = list(c.completions.create(model=MODEL, prompt="ROMEO.\n", max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    ref = llm.generate("ROMEO.\n", SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert whole.choices[0].text == streamed == ref.text and whole.choices[0].finish_reason == ref.finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == len(ref.token_ids)
    assert whole.usage.prompt_tokens == len(ref.prompt_token_ids)

    messages = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Who goes there?"}]
    chat = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    parts = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in parts if ch.choices)
    prompt = llm.tokenizer.apply_chat_template(messages)
    ref = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert chat.choices[0].message.content == text == ref.text
    assert chat.usage.prompt_tokens == len(prompt)


def test_n_samples_with_a_seed_repeat(server):
    c = server.client()
    kw = dict(model=MODEL, prompt="KING.\n", max_tokens=12, temperature=1.0, n=3, seed=1234)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [x.index for x in a.choices] == [0, 1, 2]
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert len({x.text for x in a.choices}) > 1


def test_chat_template_tools_thinking_and_logprobs(server, llm):
    c = server.client()
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Rain in Verona?"}]
    for kwargs in ({"tools": tools}, {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}):
        r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                      top_logprobs=3, **kwargs)
        template_kwargs = {"tools": tools} if "tools" in kwargs else {"enable_thinking": False}
        assert r.usage.prompt_tokens == len(llm.tokenizer.apply_chat_template(messages, **template_kwargs))
        msg = r.choices[0].message
        assert msg.content is not None and msg.tool_calls is None  # this model does not call tools
        lps = r.choices[0].logprobs.content
        assert len(lps) == r.usage.completion_tokens and all(len(x.top_logprobs) == 3 for x in lps)
        assert all(x.logprob <= 0 and x.top_logprobs[0].logprob >= x.logprob for x in lps)
    no_think = llm.tokenizer.apply_chat_template(messages, enable_thinking=False, tokenize=False)
    assert no_think.endswith("<think>\n\n</think>\n\n")  # the template's own switch reached it


def test_64_concurrent_streams_get_their_own_tokens(server, llm, rng):
    prompts = ["ROMEO.\n", "JULIET.\n", "KING HENRY.\n", "To be, or not", "Now is the winter", "O, "]
    jobs = []
    for i in range(64):
        greedy = i % 2 == 0
        jobs.append(dict(prompt=prompts[int(rng.integers(len(prompts)))], max_tokens=int(rng.integers(2, 24)),
                         temperature=0.0 if greedy else 0.9, top_p=1.0 if greedy else 0.9, seed=int(rng.integers(1000))))

    async def one(client, job):
        text, reason = "", None
        stream = await client.completions.create(model=MODEL, stream=True, **job)
        async for ch in stream:
            text += ch.choices[0].text
            reason = ch.choices[0].finish_reason or reason
        return text, reason

    async def run_all():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
        return await asyncio.wait_for(asyncio.gather(*(one(client, j) for j in jobs)), timeout=600)

    results = asyncio.run(run_all())
    assert all(reason in ("stop", "length") for _, reason in results)
    for job, (text, _) in zip(jobs, results):  # greedy and seeded: each equals the request run alone
        solo = llm.generate(job["prompt"], SamplingParams(temperature=job["temperature"], top_p=job["top_p"],
                                                          seed=job["seed"], max_tokens=job["max_tokens"]),
                            use_tqdm=False)[0]
        assert text == solo.text, job


def test_disconnected_client_gives_its_blocks_back(server):
    before = server.metrics()
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "ROMEO.\n" * 20, "max_tokens": 200, "temperature": 0.8,
                            "stream": True, "ignore_eos": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break  # leave mid-stream
    deadline, m = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["qwen_jax_num_requests_running"] == 0 and m["qwen_jax_kv_cache_usage_perc"] == 0:
            break
        time.sleep(0.2)
    assert m["qwen_jax_num_requests_running"] == 0 and m["qwen_jax_kv_cache_usage_perc"] == 0
    assert m["qwen_jax_programs_built_total"] >= 2 and m["qwen_jax_program_build_seconds_total"] > 0  # prefill, decode
    aborted = m.get('qwen_jax_request_success_total{finish_reason="abort"}', 0)
    assert m["qwen_jax_generation_tokens_total"] - before["qwen_jax_generation_tokens_total"] < 200 or aborted


def test_bad_requests_are_openai_errors(server):
    c = server.client()
    cases = [(dict(prompt="x", temperature=-1), 400, "temperature"),
             (dict(prompt="x " * 600), 400, "max_model_len is 512"),
             (dict(prompt="x", extra_body={"best_of": 2}), 400, "best_of"),
             (dict(prompt="x", max_tokens="many"), 400, "max_tokens")]
    for kw, status, words in cases:
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model=MODEL, **kw)
        assert e.value.status_code == status and words in e.value.response.json()["error"]["message"], kw
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    assert [m.id for m in c.models.list().data] == [MODEL]


def test_api_key_full_queue_and_sigterm(tmp_path):
    s = Server(tmp_path, "--api-key", "sk-test", "--max-num-seqs", "1", "--max-waiting", "1",
               "--grace-period", "60")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        assert s.client(api_key="sk-test").models.list().data[0].id == MODEL

        async def one(client):
            try:
                r = await client.completions.create(model=MODEL, prompt="ROMEO.\n", max_tokens=40,
                                                    extra_body={"ignore_eos": True})
                return r.usage.completion_tokens
            except openai.RateLimitError:
                return 429

        async def burst():
            client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="sk-test", max_retries=0, timeout=120)
            return await asyncio.wait_for(asyncio.gather(*(one(client) for _ in range(6))), timeout=300)

        got = asyncio.run(burst())
        assert 429 in got and 40 in got, got

        # SIGTERM with a request in flight: it finishes, then the server exits 0.
        done = {}

        def long_request():
            r = s.client(api_key="sk-test").completions.create(model=MODEL, prompt="KING.\n", max_tokens=120,
                                                               extra_body={"ignore_eos": True})
            done["tokens"] = r.usage.completion_tokens

        import threading

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and s.metrics()["qwen_jax_num_requests_running"] < 1:
            time.sleep(0.05)
        assert s.stop(signal.SIGTERM, timeout=120) == 0, s.output()
        t.join(timeout=60)
        assert done.get("tokens") == 120
        assert "Traceback" not in s.output()
    finally:
        s.stop(signal.SIGKILL)
