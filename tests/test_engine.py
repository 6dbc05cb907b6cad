"""The inference engine against transformers' generate, under memory pressure, with prefix caching,
and sharded; plus per-request errors and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from infer import LLM, SamplingParams
from qwen_jax import RequestError
from qwen_jax.compilation_cache import Compilations
from reference.hf_models import build, build_tokenizer, qwen3_chat_template

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def _tiny(d, kind):
    extra = dict(num_experts=8) if kind == "moe" else {}
    model, path = build(d, vocab_size=320, num_hidden_layers=2, max_position_embeddings=256, **extra)
    build_tokenizer(d, qwen3_chat_template())
    model.generation_config.eos_token_id = None  # compare full 40-token continuations
    return model, path


@pytest.fixture(scope="module", params=["dense", "moe"])
def model_dir(request, tmp_path_factory):
    """Dense and MoE: for the tests where the model kind changes what the engine does."""
    return _tiny(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("dense"), "dense")


def _hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _prompts(rng, lengths, vocab=320):
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def test_greedy_matches_transformers_single_and_batched(model_dir, rng):
    model, path = model_dir
    llm = LLM(path, max_model_len=128, num_kv_blocks=64, block_size=8, max_num_batched_tokens=64)
    prompts = _prompts(rng, [5, 23, 11, 40, 1])  # mixed lengths; 80 tokens exceed one 64-token prefill step
    expected = [_hf_greedy(model, p, 40) for p in prompts]
    assert llm.generate(prompts[1], GREEDY, use_tqdm=False)[0].token_ids == expected[1]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for out, exp in zip(outs, expected):
        assert out.token_ids == exp and out.finish_reason == "length"


def test_packed_prefill_gives_the_padded_outputs(dense_dir, rng):
    """New prompts prefill back to back in one row (segment ids keep each to itself): the same tokens and
    logprobs as one padded row per prompt, greedy and sampled. The 70-token prompt is longer than a 64-token
    step: its first chunk runs packed, its continuation (with cached keys) padded. (MoE's packed prefill:
    tests/test_cache_path.py, and the greedy test above against transformers.)"""
    _, path = dense_dir
    prompts = _prompts(rng, [5, 23, 11, 40, 1, 70])
    params = [SamplingParams(temperature=0 if i % 2 else 0.9, seed=i, max_tokens=8, ignore_eos=True, logprobs=2)
              for i in range(len(prompts))]
    runs = {}
    for packed in (True, False):
        llm = LLM(path, max_model_len=128, num_kv_blocks=64, block_size=8, max_num_batched_tokens=64,
                  compilation_cache=False)
        llm.engine.runner.packed_prefill = packed
        runs[packed] = llm.generate(prompts, params, use_tqdm=False), {s.kind for s in llm.engine.runner.programs.built}
        llm.shutdown()
    (packed, packed_kinds), (padded, padded_kinds) = runs.values()
    assert packed_kinds == {"packed", "prefill", "decode"} and padded_kinds == {"prefill", "decode"}
    for x, y in zip(packed, padded):
        assert x.token_ids == y.token_ids
        for lx, ly in zip(x.logprobs, y.logprobs):
            assert list(lx) == list(ly) and np.allclose(list(lx.values()), list(ly.values()), atol=1e-5)


def test_chunked_prefill_and_preemption_under_pressure(dense_dir, rng):  # scheduling is model-agnostic
    model, path = dense_dir
    n = 10
    prompts = _prompts(rng, rng.integers(1, 60, n).tolist())
    params = [SamplingParams(temperature=0, max_tokens=int(m), ignore_eos=True) for m in rng.integers(5, 40, n)]
    # 13 blocks of 8 tokens: room for about two sequences at once; prefill chunks of 16 tokens.
    tight = LLM(path, max_model_len=100, num_kv_blocks=13, block_size=8, max_num_seqs=6, max_num_batched_tokens=16)
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.stats()["preemptions"] > 0
    for out, p, sp in zip(outs, prompts, params):  # each equals the reference run on that prompt alone
        assert out.token_ids == _hf_greedy(model, p, sp.max_tokens)
    assert tight.stats()["free_blocks"] == 13  # everything was given back


def test_prefix_caching_reuses_blocks_and_gives_same_output(dense_dir, rng):
    _, path = dense_dir
    shared = _prompts(rng, [37])[0]
    a, b = shared + _prompts(rng, [5])[0], shared + _prompts(rng, [9])[0]
    llm = LLM(path, max_model_len=128, num_kv_blocks=64, block_size=8)
    llm.generate(a, GREEDY, use_tqdm=False)
    hits = llm.stats()["prefix_cache_hits"]
    out = llm.generate(b, GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 32 and llm.stats()["prefix_cache_hits"] - hits == 4  # 4 full shared blocks
    fresh = LLM(path, max_model_len=128, num_kv_blocks=64, block_size=8).generate(b, GREEDY, use_tqdm=False)[0]
    assert fresh.num_cached_tokens == 0 and out.token_ids == fresh.token_ids


@pytest.mark.parametrize("kind,kv_heads", [("moe", 4), ("dense", 2)])
def test_sharded_engine_matches_unsharded(tmp_path, kind, kv_heads, rng):
    extra = dict(num_experts=8) if kind == "moe" else {}
    _, path = build(tmp_path, vocab_size=320, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=kv_heads, max_position_embeddings=256, **extra)
    build_tokenizer(tmp_path)
    prompts = _prompts(rng, [7, 30, 12])
    one = LLM(path, max_model_len=128, num_kv_blocks=64).generate(prompts, GREEDY, use_tqdm=False)
    four = LLM(path, max_model_len=128, num_kv_blocks=64, tensor_parallel=4)
    # KV pool [L, blocks, block_size, kv_heads, head_dim]: kv heads on `tensor` when 4 divides them
    assert four.engine.runner.cache["k"].sharding.spec[3] == ("tensor" if kv_heads == 4 else None)
    assert [o.token_ids for o in four.generate(prompts, GREEDY, use_tqdm=False)] == [o.token_ids for o in one]


def test_seeds_stops_logprobs_and_request_errors(dense_dir):
    _, path = dense_dir
    llm = LLM(path, max_model_len=64, num_kv_blocks=64)
    p = [5, 6, 7, 8]
    s1 = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=3, ignore_eos=True)
    a = llm.generate([p, p], [s1, s1], use_tqdm=False)
    b = llm.generate(p, s1, use_tqdm=False)[0]
    assert a[0].token_ids == a[1].token_ids == b.token_ids  # same seed, alone or batched
    c = llm.generate(p, SamplingParams(temperature=1.0, max_tokens=20, seed=4, ignore_eos=True), use_tqdm=False)[0]
    assert c.token_ids != b.token_ids
    stop_tok = b.token_ids[5]
    d = llm.generate(p, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=3, ignore_eos=True,
                                       stop_token_ids=[stop_tok]), use_tqdm=False)[0]
    assert d.token_ids == b.token_ids[:b.token_ids.index(stop_tok) + 1] and d.finish_reason == "stop"
    lp = llm.generate(p, SamplingParams(temperature=0, max_tokens=3, logprobs=4, ignore_eos=True),
                      use_tqdm=False)[0]
    assert len(lp.logprobs) == 3 and all(len(x) == 4 for x in lp.logprobs)
    first = lp.logprobs[0]
    assert list(first)[0] == lp.token_ids[0] and first[lp.token_ids[0]] == max(first.values())
    outs = llm.generate([[], list(range(70)), [5, 999], p], SamplingParams(temperature=0, max_tokens=4),
                        use_tqdm=False)
    assert [o.finish_reason for o in outs[:3]] == ["error"] * 3
    assert "empty prompt" in outs[0].error and "max_model_len is 64" in outs[1].error
    assert "token id 999 is outside the vocabulary" in outs[2].error
    assert outs[3].error is None and len(outs[3].token_ids) >= 1
    with pytest.raises(RequestError, match="top_p must be in"):
        llm.generate(p, SamplingParams(top_p=0.0))


def test_stop_strings_cut_the_text():
    """On the shipped model, whose greedy continuation of "ROMEO.\\n" is known text."""
    llm = LLM(max_model_len=128, num_kv_blocks=32)
    full = llm.generate("ROMEO.\n", SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    stop = full.text.strip().split()[2]  # the third word
    cut = llm.generate("ROMEO.\n", SamplingParams(temperature=0, max_tokens=24, stop=[stop]), use_tqdm=False)[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    assert stop not in cut.text and len(cut.token_ids) < len(full.token_ids)
    streamed = "".join(llm.stream("ROMEO.\n", SamplingParams(temperature=0, max_tokens=24, stop=[stop])))
    assert streamed == cut.text


def _mixed_requests(rng, vocab: int, n: int):
    """Prompts and sampling parameters that finish inside a decode window in every way: max_tokens, stop
    tokens, stop strings; greedy, and seeded sampling with penalties and logprobs; n = 2 samples."""
    prompts = [rng.integers(10, vocab, int(k)).tolist() for k in rng.integers(2, 30, n)]
    frequent = list(range(10, vocab // 8))  # an eighth of the vocabulary: a stop within a few tokens
    kinds = [
        lambda m: SamplingParams(temperature=0, max_tokens=m),
        lambda m: SamplingParams(temperature=0.9, top_p=0.9, seed=int(m), max_tokens=m, repetition_penalty=1.3,
                                 frequency_penalty=0.4, presence_penalty=0.3, logprobs=3),
        lambda m: SamplingParams(temperature=1.0, seed=int(m), max_tokens=40, stop_token_ids=frequent, logprobs=0),
        lambda m: SamplingParams(temperature=0.8, top_k=30, seed=int(m), max_tokens=40, stop=["e", "\n"]),
        lambda m: SamplingParams(temperature=0.7, min_p=0.05, seed=int(m), max_tokens=m, n=2),
    ]
    return prompts, [kinds[i % len(kinds)](int(m)) for i, m in enumerate(rng.integers(1, 41, n))]


def test_multi_step_decode_gives_the_single_step_outputs(rng):
    """Windows of up to 8 decode steps on device, each dispatched before the previous one is read (overlap),
    against one step per host round trip with no overlap: the same tokens, stop reasons and text, for every
    way of finishing inside a window, also with a pool so small that sequences are preempted (windows then
    shrink). Logprobs agree to float32 rounding: the block-table width a step sees differs."""
    prompts, params = _mixed_requests(rng, 4096, 20)

    def run(**kw):
        llm = LLM(max_model_len=80, max_num_seqs=8, **kw)
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.stats()
        llm.shutdown()
        return outs, stats

    one, stats = run(decode_steps=1, overlap=False, num_kv_blocks=160)
    assert stats["windows_overlapped"] == 0
    roomy, stats = run(decode_steps=8, num_kv_blocks=160)
    assert stats["windows_overlapped"] > 0
    for outs, stats in ((roomy, stats), run(decode_steps=8, num_kv_blocks=14, block_size=8)):
        for a, b in zip(outs, one):
            for x, y in zip(a.outputs, b.outputs):
                assert (x.token_ids, x.text, x.finish_reason, x.stop_reason) == (y.token_ids, y.text,
                                                                                 y.finish_reason, y.stop_reason)
                assert (x.logprobs is None) == (y.logprobs is None)
                for lx, ly in zip(x.logprobs or (), y.logprobs or ()):
                    assert list(lx) == list(ly) and np.allclose(list(lx.values()), list(ly.values()), atol=1e-5)
    assert stats["preemptions"] > 0
    reasons = {o.finish_reason for out in one for o in out.outputs}
    assert reasons == {"stop", "length"}, reasons


def test_a_fixed_workload_compiles_at_most_seven_programs(dense_dir):
    """The issue-16 workload (32 greedy requests, prompt and output lengths uniform in [16, 128), all sent at
    once): with every step on its own program, 2 packed prefill and 5 decode programs (decode rows 8, 12,
    16, 24, 32); fewer when a shrinking batch stays on a built program (infer/programs.py: how many depends
    on measured times). It compiled 10 step programs before decode windows, row and token minimums and one
    sampler program per prefill, and 8 before packed prefill; a change that adds shape variants fails here."""
    _, path = dense_dir
    rng = np.random.default_rng(0)  # a fixed workload: the count depends on its lengths
    prompts = _prompts(rng, rng.integers(16, 128, 32).tolist())
    params = [SamplingParams(temperature=0, max_tokens=int(k), ignore_eos=True) for k in rng.integers(16, 128, 32)]
    with Compilations() as built:
        llm = LLM(path, max_model_len=256, max_num_seqs=32, num_kv_blocks=600, compilation_cache=False)
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [p.max_tokens for p in params]
    compiled = {"prefill": built.count("_step_impl"), "decode": built.count("_decode_impl")}
    assert sum(compiled.values()) <= 7, compiled


def test_a_shrinking_batch_runs_on_a_built_program_with_the_same_tokens(dense_dir, rng):
    """A batch that shrinks from 12 rows to 1 either builds each row bucket's own decode program (patience 0)
    or runs on the 12-row program and charges the smaller buckets for the padding (patience infinity): the same
    tokens and logprobs either way, sampled rows included. Output lengths differ, so the batch shrinks."""
    _, path = dense_dir
    prompts = _prompts(rng, rng.integers(4, 20, 12).tolist())
    params = [SamplingParams(temperature=0 if i % 3 else 0.8, seed=i, max_tokens=int(m), ignore_eos=True,
                             logprobs=1 if i % 3 == 0 else None)
              for i, m in enumerate(rng.integers(2, 40, 12))]
    results = {}
    for patience in (0, float("inf")):
        llm = LLM(path, max_model_len=64, max_num_seqs=12, num_kv_blocks=80, compilation_cache=False)
        programs = llm.engine.runner.programs
        programs.patience = patience
        outs = llm.generate(prompts, params, use_tqdm=False)
        decode = {s for s in programs.built if s.kind == "decode"}
        results[patience] = outs, decode, dict(programs.waste)
        llm.shutdown()
    (eager, eager_built, _), (patient, patient_built, waste) = results.values()
    assert {s.dims[0] for s in patient_built} == {12} and min(s.dims[0] for s in eager_built) < 12
    assert any(s.kind == "decode" and s.dims[0] < 12 for s in waste)  # charged (by measured time) for its padding
    for x, y in zip(eager, patient):
        assert x.token_ids == y.token_ids
        if x.logprobs is not None:
            for lx, ly in zip(x.logprobs, y.logprobs):
                assert list(lx) == list(ly) and np.allclose(list(lx.values()), list(ly.values()), atol=1e-5)


def test_a_prefill_shape_compiles_one_sampler_variant_where_it_can(dense_dir, rng):
    """Greedy prefill steps take the argmax program unless the full sampler's program for their shape is
    already built; a sampled step always needs the full one. Greedy tokens are the same either way. (Fresh
    prompts of one length each time: a repeated one would hit the prefix cache and change the shape.)"""
    _, path = dense_dir
    p, q, r, u = _prompts(rng, [20] * 4)
    greedy, sampled = SamplingParams(temperature=0, max_tokens=3), SamplingParams(temperature=1, seed=3, max_tokens=3)

    def prefills(llm, prompt, params):
        with Compilations() as built:
            out = llm.generate([prompt], params, use_tqdm=False)[0]
        return built.count("_step_impl"), out.token_ids

    llm = LLM(path, max_model_len=64, num_kv_blocks=16, compilation_cache=False)
    assert prefills(llm, q, sampled)[0] == 1
    built, tokens = prefills(llm, p, greedy)
    assert built == 0  # the sampled step's program serves the greedy one
    llm.shutdown()
    llm = LLM(path, max_model_len=64, num_kv_blocks=16, compilation_cache=False)
    assert prefills(llm, p, greedy) == (1, tokens)  # its own argmax program, the same tokens
    assert prefills(llm, r, sampled)[0] == 1  # sampling needs the full one
    assert prefills(llm, u, greedy)[0] == 0
    llm.shutdown()


def test_warmup_compiles_every_decode_program_a_workload_meets(dense_dir, rng, capsys):
    """After LLM(warmup=True), requests of up to max_model_len tokens (greedy and sampled, any batch) compile
    no decode program, and one prompt alone no program at all; the warm-up shows a progress bar."""
    _, path = dense_dir
    with Compilations() as built:
        llm = LLM(path, max_model_len=32, max_num_seqs=12, num_kv_blocks=40, warmup=True, compilation_cache=False)
    assert "warmup (sequences up to 32 tokens)" in capsys.readouterr().err
    decode = built.count("_decode_impl")
    assert decode == 2 * 2 * 2  # greedy and sampling x rows {8, 12} x table widths {1, 2} blocks of 16
    with Compilations() as later:
        for n in (1, 5, 12):
            prompts = _prompts(rng, rng.integers(1, 16, n).tolist())
            params = [SamplingParams(temperature=float(rng.choice([0, 1])), seed=i, max_tokens=int(m),
                                     ignore_eos=True) for i, m in enumerate(rng.integers(1, 17, n))]
            llm.generate(prompts, params, use_tqdm=False)
    assert later.count("_decode_impl") == 0, later.names
    with Compilations() as single:  # one new prompt alone: its packed prefill program was built too
        llm.generate(_prompts(rng, [9]), SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert single.count() == 0, single.names


def test_penalty_state_is_touched_only_by_requests_with_penalties(dense_dir, rng):
    """Greedy requests (the argmax fast path) and sampled ones without penalties leave the [max_num_seqs,
    vocab] penalty tables as they were; a request with penalties writes its counts."""
    _, path = dense_dir
    llm = LLM(path, max_model_len=64, max_num_seqs=8, num_kv_blocks=40)
    penalty = lambda: {k: np.asarray(v).sum() for k, v in llm.engine.runner.penalty.items()}  # noqa: E731
    prompts = _prompts(rng, [5, 9, 3])
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    llm.generate(prompts, SamplingParams(temperature=1.0, seed=1, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert penalty() == {"counts": 0, "seen": 0}
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, frequency_penalty=0.5),
                 use_tqdm=False)
    assert all(v > 0 for v in penalty().values())
    llm.shutdown()


def test_abandoned_stream_releases_its_blocks(dense_dir):
    _, path = dense_dir
    llm = LLM(path, max_model_len=64, num_kv_blocks=32)
    stream = llm.stream([5, 6, 7], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    next(stream)
    stream.close()  # the caller stops listening mid-generation
    assert llm.engine.wait_idle(30)
    assert llm.stats()["free_blocks"] == 32 and llm.stats()["running"] == 0
    assert llm.generate([5, 6, 7], GREEDY, use_tqdm=False)[0].finish_reason == "length"


def test_cli_stream_and_batch_file(dense_dir, tmp_path):
    _, path = dense_dir
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = REPO
    common = [sys.executable, "-m", "infer.generate", "--model", path, "--max-model-len", "64",
              "--num-kv-blocks", "32", "--temperature", "0", "--ignore-eos"]
    r = subprocess.run(common + ["--prompt", "Hello, world", "--max-tokens", "5", "--no-overlap"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello, world") and "finish_reason: length" in r.stderr
    lines = [{"prompt": "To be", "max_tokens": 3}, {"messages": [{"role": "user", "content": "hi"}]},
             {"prompt": "x " * 80}, {"prompt": "or not", "max_tokens": 2, "id": "q4"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = subprocess.run(common + ["--prompts-file", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                                 "--max-tokens", "4"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = [json.loads(x) for x in open(tmp_path / "o.jsonl")]
    assert [len(x["token_ids"]) for x in res] == [3, 4, 0, 2] and res[3]["id"] == "q4"
    assert "max_model_len" in res[2]["error"] and "line 3: error" in r.stderr
    assert [x["line"] for x in res] == [1, 2, 3, 4] and not os.path.exists(tmp_path / "o.jsonl.partial")
    bad = subprocess.run(common + ["--prompt", "x", "--top-p", "2"], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: invalid sampling")


def test_gpu_pool_sizing_runs_a_warmup_and_uses_the_memory_left(dense_dir, monkeypatch):
    """The GPU path (device memory statistics present), exercised on CPU with stated statistics."""
    import infer.runner as runner

    calls = []

    def fake_stats():
        calls.append(1)
        return {"bytes_limit": 64 * 2**20, "bytes_in_use": 10 * 2**20, "peak_bytes_in_use": 24 * 2**20}

    monkeypatch.setattr(runner, "device_memory_stats", fake_stats)
    _, path = dense_dir
    llm = LLM(path, max_model_len=128, kv_cache_memory_fraction=0.5, max_num_batched_tokens=64)
    assert len(calls) == 2  # before and after the warm-up step
    assert llm.num_blocks == int((64 - 24) * 2**20 * 0.5) // llm.engine.runner.bytes_per_block()
    assert llm.generate([5, 6, 7], GREEDY, use_tqdm=False)[0].finish_reason == "length"


def test_concurrent_generate_calls_each_get_their_solo_output(dense_dir, rng):
    """4 threads call generate at once on one LLM: each gets exactly its own (solo) outputs."""
    import threading

    _, path = dense_dir
    llm = LLM(path, max_model_len=96, num_kv_blocks=96, block_size=8)
    jobs = [_prompts(rng, rng.integers(2, 30, 3).tolist()) for _ in range(4)]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    solo = [[o.token_ids for o in llm.generate(j, sp, use_tqdm=False)] for j in jobs]
    got, errors = [None] * 4, []

    def work(i):
        try:
            got[i] = [o.token_ids for o in llm.generate(jobs[i], sp, use_tqdm=False)]
        except Exception as e:  # reported below: an exception in a thread must fail the test
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors and got == solo


def test_abandoned_stream_then_generate_gives_the_solo_output(dense_dir):
    _, path = dense_dir
    llm = LLM(path, max_model_len=128, num_kv_blocks=64)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    solo = [o.token_ids for o in llm.generate([[5, 6, 7], [9, 10]], sp, use_tqdm=False)]
    stream = llm.stream([11, 12, 13], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    next(stream)
    del stream  # dropped without close(): garbage collection aborts it
    assert [o.token_ids for o in llm.generate([[5, 6, 7], [9, 10]], sp, use_tqdm=False)] == solo
    assert llm.engine.wait_idle(30) and llm.stats()["free_blocks"] == 64


def test_n_samples_share_the_prompt_and_repeat_with_a_seed(dense_dir, rng):
    _, path = dense_dir
    llm = LLM(path, max_model_len=128, num_kv_blocks=64, block_size=8)
    prompt = _prompts(rng, [30])[0]  # 3 full blocks before the last prompt token
    sp = SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=11, ignore_eos=True)
    hits = llm.stats()["prefix_cache_hits"]
    a = llm.generate(prompt, sp, use_tqdm=False)[0]
    assert llm.stats()["prefix_cache_hits"] - hits == 2 * 3  # samples 1 and 2 reuse sample 0's 3 blocks
    b = llm.generate(prompt, sp, use_tqdm=False)[0]
    assert len(a.outputs) == 3 and [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1  # each sample has its own seed stream
    one = llm.generate(prompt, SamplingParams(temperature=1.0, max_tokens=8, seed=11, ignore_eos=True),
                       use_tqdm=False)[0]
    assert one.token_ids == a.outputs[0].token_ids  # sample 0 is the n = 1 output of the same seed


def test_tokenizer_elsewhere_token_ids_only_and_max_tokens_none(dense_dir, tmp_path):
    import shutil

    _, path = dense_dir
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in os.listdir(path):
        if f in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(path, f), bare / f)
    with_tok = LLM(str(bare), tokenizer=path, max_model_len=64, num_kv_blocks=16)
    assert with_tok.generate("Hello", GREEDY, use_tqdm=False)[0].finish_reason == "length"
    ids_only = LLM(str(bare), skip_tokenizer_init=True, max_model_len=64, num_kv_blocks=16)
    out = ids_only.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                            use_tqdm=False)[0]
    assert len(out.token_ids) == 64 - 3 and out.finish_reason == "length" and out.text == ""  # to the context end
    bad = ids_only.generate(["a text prompt", [5, 6]], GREEDY, use_tqdm=False)
    assert bad[0].finish_reason == "error" and "needs a tokenizer" in bad[0].error
    assert bad[1].error is None


def test_batch_generation_killed_then_resumed_keeps_its_results(dense_dir, tmp_path):
    """SIGKILL a --prompts-file run once some results are written; --resume keeps them, generates the rest,
    and the output equals an uninterrupted run's. Ctrl-C instead says how many results were kept."""
    import signal
    import time

    _, path = dense_dir
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = REPO
    lines = [{"prompt": f"line {i}: " + "to be " * (i % 5), "max_tokens": 6 + 4 * (i % 4)} for i in range(12)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    # One request at a time, one token per host round trip: slow enough to be cut between results 3 and 12.
    common = [sys.executable, "-m", "infer.generate", "--model", path, "--max-model-len", "64", "--num-kv-blocks",
              "64", "--max-num-seqs", "1", "--decode-steps", "1", "--temperature", "0", "--ignore-eos",
              "--prompts-file", str(tmp_path / "in.jsonl")]
    whole = subprocess.run(common + ["--output", str(tmp_path / "whole.jsonl")], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr

    def cut(out, sig):
        partial = tmp_path / (out.name + ".partial")
        proc = subprocess.Popen(common + ["--output", str(out)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if partial.exists() and len(partial.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        kept = [json.loads(x) for x in partial.read_text().splitlines() if x.strip()]
        assert 3 <= len(kept) < len(lines) and not out.exists()
        return proc.returncode, err, kept, partial

    rc, err, kept, partial = cut(tmp_path / "int.jsonl", signal.SIGINT)
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"interrupted: {len(kept)} of {len(lines)} results are in {partial}; "
                                            f"rerun with --resume to finish")
    out = tmp_path / "cut.jsonl"
    _, _, kept, partial = cut(out, signal.SIGKILL)
    again = subprocess.run(common + ["--output", str(out)], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr  # an unfinished run is never overwritten
    resumed = subprocess.run(common + ["--output", str(out), "--resume"], env=env, cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(kept)} of {len(lines)} results already" in resumed.stderr
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text() and not partial.exists()


def test_a_second_process_loads_every_program_from_the_compilation_cache(dense_dir, tmp_path):
    _, path = dense_dir
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env.update(PYTHONPATH=REPO, JAX_LOG_COMPILES="1")
    cmd = [sys.executable, "-m", "infer.generate", "--model", path, "--max-model-len", "64", "--num-kv-blocks", "32",
           "--temperature", "0", "--prompt", "Hello", "--max-tokens", "4", "--compilation-cache", str(tmp_path / "xla")]
    runs = [subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    assert runs[0].stdout == runs[1].stdout
    compiled = runs[1].stderr.count("Finished XLA compilation")
    hits = runs[1].stderr.count("Persistent compilation cache hit")
    assert compiled > 0 and hits == compiled  # the second process compiled nothing itself
    assert "Persistent compilation cache hit for 'jit__packed_step_impl'" in runs[1].stderr  # a new prompt: packed


@pytest.mark.parametrize("flags,words", [
    (["--dtype", "float8"], "--dtype must be"), (["--block-size", "0"], "--block-size must be >= 1"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be >= 1"), (["--max-model-len", "0"], "--max-model-len must be"),
    (["--decode-steps", "0"], "--decode-steps must be >= 1"), (["--warmup", "1"], "--warmup must be >= 2"),
    (["--kv-cache-memory-fraction", "2"], "--kv-cache-memory-fraction"), (["--top-p", "0"], "top_p must be in"),
    (["--max-tokens", "0"], "max_tokens must be"), (["--prompts-file", "/nonexistent.jsonl", "--output", "o.jsonl"],
                                                    "no such file"),
])
def test_bad_generate_flags_are_one_line_and_exit_2(flags, words, capsys):
    from infer import generate

    assert generate.main(["--prompt", "x", *flags] if "--prompts-file" not in flags else flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and words in err[-1] and len(err) <= 2
