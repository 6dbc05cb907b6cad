"""Online serving: python -m infer.serve beside `transformers serve --continuous-batching`, same checkpoint,
same workload, one run.

    python benchmarks/serving.py                                  # CPU: the shipped model; GPU: Qwen3-0.6B shape
    python benchmarks/serving.py --requests 200 --rates 4,16,64,inf --max-num-seqs 128

An async HTTP load generator (httpx) sends a fixed-seed workload: prompts are Shakespeare passages of
[min_len, max_len] tokens, each asking for [min_len, max_len] new tokens (greedy), streamed from
/v1/completions. Arrivals are Poisson at each --rates value (requests/s; inf = all at once). Each engine
is measured after a warm-up (below). Reported per engine and rate: output
tokens/s (tokens / (last token - first request)), time to first token and inter-token latency at p50 and
p99, measured on a second pass after a warm-up pass with the same lengths and arrival times (other text):
the figures are a long-running server's, after its step shapes are compiled. On a GPU the checkpoint is random weights at the Qwen3-0.6B shape; on a CPU, the shipped small model.
The peer needs `accelerate` (pip install -e ".[bench]").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workload(tok, n: int, lo: int, hi: int, seed: int, text_seed: int) -> list[tuple[str, int]]:
    """[(prompt text, max_tokens)]: passages of the shipped corpus cut to [lo, hi] tokens. The lengths come
    from `seed`, the passages from `text_seed`: a warm-up with another text_seed has the same shapes."""
    from train.data import DEFAULT_CORPUS, read_documents

    ids = tok.encode("\n".join(read_documents(DEFAULT_CORPUS))[:2_000_000])
    rng, text_rng = np.random.default_rng(seed), np.random.default_rng(text_seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(lo, hi + 1))
        start = int(text_rng.integers(0, len(ids) - length))
        out.append((tok.decode(ids[start:start + length]), int(rng.integers(lo, hi + 1))))
    return out


class Engine:
    def __init__(self, name: str, cmd: list[str], port: int, model_name: str, log_dir: str):
        self.name, self.port, self.model = name, port, model_name
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(os.path.join(log_dir, f"{name.replace(' ', '_')}.log"), "w+")
        env = {**os.environ, "PYTHONPATH": REPO}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 900) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"{self.name} exited:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit(f"{self.name} not ready after {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client, engine: Engine, prompt: str, max_tokens: int, extra: dict) -> dict:
    body = {"model": engine.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    stamps, usage = [], None
    async with client.stream("POST", engine.url + "/v1/completions", json=body, timeout=3600) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if any(c.get("text") for c in chunk.get("choices", [])):
                stamps.append(time.perf_counter())
    tokens = usage["completion_tokens"] if usage else len(stamps)
    return {"t0": t0, "stamps": stamps, "tokens": tokens}


async def run_load(engine: Engine, jobs, rate: float, seed: int, extra: dict) -> list[dict]:
    import httpx

    rng = np.random.default_rng(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=3600) as client:
        tasks = []
        for prompt, max_tokens in jobs:
            tasks.append(asyncio.create_task(one_request(client, engine, prompt, max_tokens, extra)))
            if math.isfinite(rate):
                await asyncio.sleep(float(rng.exponential(1.0 / rate)))
        return await asyncio.gather(*tasks)


def summarize(results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r and r["stamps"]]
    errors = [r["error"] for r in results if "error" in r]
    if not ok:
        return {"ok": 0, "errors": len(errors), "first_error": errors[0] if errors else "no tokens"}
    start = min(r["t0"] for r in ok)
    end = max(r["stamps"][-1] for r in ok)
    ttft = [r["stamps"][0] - r["t0"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["stamps"], r["stamps"][1:])]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else float("nan")  # noqa: E731
    return {"ok": len(ok), "errors": len(errors), "tok_s": sum(r["tokens"] for r in ok) / (end - start),
            "ttft50": pct(ttft, 50), "ttft99": pct(ttft, 99), "itl50": pct(itl, 50), "itl99": pct(itl, 99)}


def main(argv=None):
    import jax

    from benchmarks.common import markdown_table, record
    from benchmarks.throughput import make_checkpoint
    from qwen_jax import load_tokenizer
    from qwen_jax.assets import DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF checkpoint (default: see above)")
    p.add_argument("--requests", type=int, default=None, help="default: 200 on GPU, 24 on CPU")
    p.add_argument("--rates", default=None, help="requests/s, comma-separated (default: GPU 4,16,inf; CPU 2,inf)")
    p.add_argument("--min-len", type=int, default=None, help="default: 100 on GPU, 16 on CPU")
    p.add_argument("--max-len", type=int, default=None, help="default: 512 on GPU, 48 on CPU")
    p.add_argument("--max-num-seqs", type=int, default=None, help="ours; default: 128 on GPU, 16 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    args = p.parse_args(argv)
    cpu = jax.default_backend() == "cpu"
    n = args.requests or (24 if cpu else 200)
    rates = [float(r) for r in (args.rates or ("2,inf" if cpu else "4,16,inf")).split(",")]
    lo, hi = args.min_len or (16 if cpu else 100), args.max_len or (48 if cpu else 512)
    seqs = args.max_num_seqs or (16 if cpu else 128)
    tmp = tempfile.mkdtemp(prefix="serving-bench-")
    try:
        model = args.model or (DEFAULT_MODEL if cpu else os.path.join(tmp, "qwen3-0.6b-random"))
        if not args.model and not cpu:
            make_checkpoint("qwen3-0.6b", False, model)
        tok = load_tokenizer(model)
        jobs = workload(tok, n, lo, hi, args.seed, args.seed)
        warm = workload(tok, n, lo, hi, args.seed, args.seed + 1)  # same shapes and arrivals, other text
        name = "bench-model"
        engines = [("qwen-jax", [sys.executable, "-m", "infer.serve", "--model", model, "--served-model-name", name,
                                 "--max-model-len", str(2 * hi + 64), "--max-num-seqs", str(seqs),
                                 "--max-waiting", str(10 * n), "--log-level", "warning"], {"ignore_eos": True})]
        if not args.no_peer:
            engines.append(("transformers serve", ["transformers", "serve", "--continuous-batching", "--device",
                                                   "cpu" if cpu else "cuda", "--port", "{port}", model], {}))
        rows, summary = [], {}
        for label, cmd, extra in engines:
            port = free_port()
            cmd = [c.replace("{port}", str(port)) for c in cmd]
            if label == "qwen-jax":
                cmd += ["--port", str(port)]
            eng = Engine(label, cmd, port, name if label == "qwen-jax" else model, tmp)
            try:
                eng.wait_ready()
                for rate in rates:
                    # A warm-up pass with the same lengths and arrival times (other text, so no prefix-cache
                    # hits): it compiles the step shapes this traffic needs, as a long-running server has.
                    asyncio.run(run_load(eng, warm, rate, args.seed, extra))
                    s = summarize(asyncio.run(run_load(eng, jobs, rate, args.seed, extra)))
                    summary[(label, rate)] = s
                    if not s["ok"]:
                        rows.append([label, rate, f"0/{n}", s["first_error"], "", "", "", ""])
                        continue
                    rows.append([label, "inf" if math.isinf(rate) else rate, f"{s['ok']}/{n}", s["tok_s"],
                                 s["ttft50"], s["ttft99"], s["itl50"], s["itl99"]])
            finally:
                eng.stop()
        if not args.no_peer:
            for rate in rates:
                a, b = summary.get(("qwen-jax", rate), {}), summary.get(("transformers serve", rate), {})
                if a.get("ok") and b.get("ok"):
                    rows.append(["ratio (ours / peer)", "inf" if math.isinf(rate) else rate, "",
                                 f"{a['tok_s'] / b['tok_s']:.2f}x", f"{a['ttft50'] / b['ttft50']:.2f}x",
                                 f"{a['ttft99'] / b['ttft99']:.2f}x", f"{a['itl50'] / b['itl50']:.2f}x",
                                 f"{a['itl99'] / b['itl99']:.2f}x"])
        table = markdown_table(["engine", "rate (req/s)", "done", "out tok/s", "TTFT p50 ms", "TTFT p99 ms",
                                "ITL p50 ms", "ITL p99 ms"], rows)
        where = ("CPU, the shipped 4M-parameter model" if cpu else "random weights at the Qwen3-0.6B shape, bf16")
        record("Online serving (benchmarks/serving.py)", table,
               notes=f"{where}; {n} requests, prompt and output lengths uniform in [{lo}, {hi}] tokens, greedy, "
                     f"streamed /v1/completions, Poisson arrivals; ours with --max-num-seqs {seqs} and EOS "
                     f"ignored, transformers serve --continuous-batching with its defaults")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
