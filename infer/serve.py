"""python -m infer.serve: an OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

    python -m infer.serve                                   # the shipped small model on 127.0.0.1:8000
    python -m infer.serve --model /models/Qwen3-8B --port 8000 --served-model-name qwen3-8b --api-key sk-local

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events or not),
GET /v1/models, /health and /metrics (Prometheus). The server is a thin layer: each request becomes an
engine request whose pieces come back through an asyncio queue; the engine thread does the work. A client
that disconnects aborts its request. SIGTERM stops accepting connections, lets running requests finish
within --grace-period seconds, then exits 0.
"""

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from typing import AsyncIterator

# FastAPI reads the endpoint annotations at runtime: these names must be module globals.
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from infer import metrics as M
from infer import openai_protocol as P
from infer.engine import EngineBusy, EngineStopped, RequestOutput
from infer.parsers import OutputParser, parse_output
from qwen_jax.errors import RequestError

log = logging.getLogger("infer.serve")


def parse_args(argv=None):
    from infer.args import add_engine_args
    from qwen_jax.cli import ArgumentParser

    p = ArgumentParser(prog="python -m infer.serve", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", default=None, help="the model name clients use (default: --model's "
                                                             "directory name)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    g.add_argument("--max-waiting", type=int, default=1024,
                   help="requests waiting for the engine beyond which new ones get 429 (default: %(default)s)")
    g.add_argument("--grace-period", type=float, default=30.0,
                   help="seconds running requests get to finish on SIGTERM (default: %(default)s)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


class EngineClient:
    """The asyncio side of the engine: add requests, read their pieces, abort on cancellation."""

    def __init__(self, llm):
        self.llm, self.engine = llm, llm.engine

    async def run(self, prompts: list, params) -> AsyncIterator[tuple[int, object]]:
        """(prompt index, StreamDelta or final RequestOutput) for every prompt's request, as they come.
        Leaving early (an error, a disconnected client) aborts every request still running."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        streams = []
        try:
            for i, prompt in enumerate(prompts):
                def sink(item, i=i):
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, (i, item))
                    except RuntimeError:  # the event loop has closed (server shutdown): nobody is listening
                        pass
                streams.append(self.engine.add_request(prompt, params, stream=True, sink=sink))
            left = len(streams)
            while left:
                i, item = await queue.get()
                if isinstance(item, RequestOutput):
                    streams[i].output = item
                    left -= 1
                yield i, item
        finally:
            for s in streams:
                s.close()


def create_app(llm, served_model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="qwen-jax", docs_url=None, redoc_url=None)
    client = EngineClient(llm)
    tok = llm.tokenizer
    metrics = M.ServerMetrics(llm.engine)

    class HTTPError(Exception):
        def __init__(self, status: int, message: str, param: str | None = None):
            self.status, self.message, self.param = status, message, param

    def error(status, message, param=None):
        return JSONResponse(P.error_body(message, status, param), status_code=status)

    @app.exception_handler(HTTPError)
    async def _http_error(_, e: HTTPError):
        return error(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        return error(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}", ".".join(loc) or None)

    @app.exception_handler(EngineBusy)
    async def _busy(_, e):
        return error(429, str(e))

    @app.exception_handler(EngineStopped)
    async def _stopped(_, e):
        return error(503, str(e))

    @app.exception_handler(RequestError)
    async def _bad_request(_, e):
        return error(400, str(e))

    @app.exception_handler(Exception)
    async def _bug(_, e):
        log.exception("internal error")
        return error(500, f"internal error: {type(e).__name__}")

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {api_key}":
            raise HTTPError(401, "invalid or missing API key (Authorization: Bearer ...)")

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise HTTPError(404, f"model {name!r} does not exist; this server serves {served_model_name!r}", "model")

    def token_text(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False) if tok is not None else ""

    def chat_logprobs(lps: list[dict[int, float]] | None, n_top: int):
        if lps is None:
            return None
        content = []
        for lp in lps:
            (tid, val), *_ = lp.items()
            top = sorted(lp.items(), key=lambda kv: -kv[1])[:n_top]
            content.append({"token": token_text(tid), "logprob": val, "bytes": list(token_text(tid).encode()),
                            "top_logprobs": [{"token": token_text(t), "logprob": v,
                                              "bytes": list(token_text(t).encode())} for t, v in top]})
        return {"content": content}

    def completion_logprobs(lps: list[dict[int, float]] | None, n_top: int, offset: int = 0):
        if lps is None:
            return None
        tokens, values, tops, offsets = [], [], [], []
        for lp in lps:
            (tid, val), *_ = lp.items()
            tokens.append(token_text(tid))
            values.append(val)
            tops.append({token_text(t): v for t, v in sorted(lp.items(), key=lambda kv: -kv[1])[:n_top]})
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    async def collect(prompts, sp, raw: Request) -> list[RequestOutput]:
        """Run to the end (no streaming to the client), aborting if the client goes away."""
        timer = metrics.timer()

        async def consume():
            outs: dict[int, RequestOutput] = {}
            async for i, item in client.run(prompts, sp):  # aborts its requests if cancelled
                timer.saw(i, item)
                if isinstance(item, RequestOutput):
                    outs[i] = item
            return [outs[i] for i in range(len(prompts))]

        async def disconnected():
            while not await raw.is_disconnected():
                await asyncio.sleep(0.25)

        work, watch = asyncio.ensure_future(consume()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
        if work.cancelled():
            raise HTTPError(499, "client disconnected")
        outs = work.result()
        timer.done(outs)
        return outs

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    # ------------------------------------------------------------------ endpoints
    @app.get("/health")
    async def health():
        if llm.engine.error:
            return error(503, llm.engine.error)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": P.now(),
                                            "owned_by": "qwen-jax", "max_model_len": llm.max_model_len}]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(req: P.CompletionRequest, raw: Request):
        check_model(req.model)
        sp = req.sampling_params()
        prompts = req.prompts()
        rid, created, n_top = P.new_id("cmpl"), P.now(), req.logprobs or 0
        if not req.stream:
            outs = await collect(prompts, sp, raw)
            choices = [{"index": pi * sp.n + o.index, "text": o.text, "finish_reason": o.finish_reason,
                        "logprobs": completion_logprobs(o.logprobs, n_top), "stop_reason": o.stop_reason}
                       for pi, out in enumerate(outs) for o in out.outputs]
            return {"id": rid, "object": "text_completion", "created": created, "model": served_model_name,
                    "choices": choices, "usage": _usage(outs)}
        gen = client.run(prompts, sp)
        first = await _first(gen)

        async def events():
            timer, outs, offsets = metrics.timer(), [], {}
            try:
                async for i, item in _chain(first, gen):
                    timer.saw(i, item)
                    if isinstance(item, RequestOutput):
                        outs.append(item)
                        continue
                    idx = i * sp.n + item.index
                    lp = completion_logprobs(item.logprobs, n_top, offsets.get(idx, 0))
                    offsets[idx] = offsets.get(idx, 0) + len(item.text)
                    if item.text or item.finish_reason or lp:
                        yield sse({"id": rid, "object": "text_completion", "created": created,
                                   "model": served_model_name, "choices": [{"index": idx, "text": item.text,
                                   "logprobs": lp, "finish_reason": item.finish_reason}]})
                timer.done(outs)
                if req.include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": served_model_name,
                               "choices": [], "usage": _usage(outs)})
                yield "data: [DONE]\n\n"
            finally:
                await gen.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(req: P.ChatCompletionRequest, raw: Request):
        check_model(req.model)
        if tok is None:
            raise HTTPError(400, "chat needs a tokenizer with a chat template; this server runs without one")
        sp = req.sampling_params()
        try:
            messages = [m.for_template() for m in req.messages]
            kwargs = dict(req.chat_template_kwargs or {})
            if req.tools and req.tool_choice != "none":
                kwargs["tools"] = req.tools
            prompt = tok.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt, **kwargs)
        except RequestError:
            raise
        except Exception as e:  # the template rejected the conversation
            raise HTTPError(400, f"messages: the chat template cannot render them ({type(e).__name__}: {e})",
                            "messages") from None
        rid, created = P.new_id("chatcmpl"), P.now()
        n_top = req.top_logprobs or 0
        if not req.stream:
            out = (await collect([prompt], sp, raw))[0]
            choices = []
            for o in out.outputs:
                parsed = parse_output(o.text, tools=req.parse_tools)
                message = {"role": "assistant", "content": parsed.content or (None if parsed.tool_calls else ""),
                           "reasoning_content": parsed.reasoning or None}
                reason = o.finish_reason
                if parsed.tool_calls:
                    message["tool_calls"] = [_tool_call(c) for c in parsed.tool_calls]
                    reason = "tool_calls"
                choices.append({"index": o.index, "message": message, "finish_reason": reason,
                                "logprobs": chat_logprobs(o.logprobs, n_top) if req.logprobs else None,
                                "stop_reason": o.stop_reason})
            return {"id": rid, "object": "chat.completion", "created": created, "model": served_model_name,
                    "choices": choices, "usage": _usage([out])}
        gen = client.run([prompt], sp)
        first = await _first(gen)

        def chunk(index, delta, finish=None, logprobs=None):
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": served_model_name,
                        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

        async def events():
            timer, outs = metrics.timer(), []
            parsers = [OutputParser(tools=req.parse_tools) for _ in range(sp.n)]
            try:
                for k in range(sp.n):
                    yield chunk(k, {"role": "assistant", "content": ""})
                async for i, item in _chain(first, gen):
                    timer.saw(i, item)
                    if isinstance(item, RequestOutput):
                        outs.append(item)
                        continue
                    p = parsers[item.index]
                    parsed = p.feed(item.text, final=item.finish_reason is not None)
                    lp = chat_logprobs(item.logprobs, n_top) if req.logprobs else None
                    if parsed.reasoning:
                        yield chunk(item.index, {"reasoning_content": parsed.reasoning})
                    if parsed.content or lp:
                        yield chunk(item.index, {"content": parsed.content}, logprobs=lp)
                    streamed = p.num_tool_calls - len(parsed.tool_calls)  # this sample's calls already sent
                    for k, call in enumerate(parsed.tool_calls, streamed):
                        yield chunk(item.index, {"tool_calls": [{"index": k, **_tool_call(call)}]})
                    if item.finish_reason is not None:
                        reason = "tool_calls" if p.num_tool_calls else item.finish_reason
                        yield chunk(item.index, {}, finish=reason)
                timer.done(outs)
                if req.include_usage:
                    yield sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                               "model": served_model_name, "choices": [], "usage": _usage(outs)})
                yield "data: [DONE]\n\n"
            finally:
                await gen.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


async def _first(gen):
    """Start a request before the response is committed, so that a rejected request (bad prompt, full
    queue) is an HTTP error rather than a broken stream. -> the first item (or None if there is none)."""
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(first, gen):
    if first is not None:
        yield first
    async for x in gen:
        yield x


def _tool_call(call) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _usage(outs) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return P.usage(prompt, completion, sum(o.num_cached_tokens for o in outs))


def _main(args) -> int:
    import os

    import uvicorn

    from infer.args import build_llm
    from qwen_jax.errors import require

    require(0 < args.port < 65536, f"--port must be in 1..65535, got {args.port}")
    require(args.max_waiting >= 1, f"--max-waiting must be >= 1, got {args.max_waiting}")
    require(args.grace_period >= 0, f"--grace-period must be >= 0, got {args.grace_period}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    llm = build_llm(args, max_waiting=args.max_waiting)
    name = args.served_model_name or os.path.basename(os.path.normpath(llm.model_path))
    app = create_app(llm, name, args.api_key)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.grace_period, access_log=False)
    server = uvicorn.Server(config)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (max_model_len {llm.max_model_len}, "
          f"{llm.num_blocks} KV blocks)", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    # uvicorn handles SIGTERM / Ctrl-C (graceful shutdown) and re-raises the signal once it has stopped:
    # by then the work is done, so the re-raised signal must not turn a clean stop into an "interrupted".
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()  # returns after SIGTERM / Ctrl-C once connections have drained (or the grace period ran out)
    llm.shutdown(grace=0)
    if not server.started:
        print(f"error: could not listen on {args.host}:{args.port}", file=sys.stderr)
        return 2
    print(f"stopped after {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    from qwen_jax.cli import run_cli

    return run_cli(lambda: _main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
