"""python -m infer.generate: generate text with a Qwen3 checkpoint.

    python -m infer.generate --prompt "ROMEO."                       # the shipped small model, streamed
    python -m infer.generate --model /models/Qwen3-0.6B --chat --no-enable-thinking --prompt "Hi!"
    python -m infer.generate --model DIR --prompts-file in.jsonl --output out.jsonl --temperature 0.7

--prompts-file takes one JSON object per line: {"prompt": "..."} or {"messages": [...]} (rendered with the
checkpoint's chat template), optionally with per-line sampling fields (max_tokens, temperature, ...). The
output has one JSON line per input line, in input order, with the input's line number (`line`). Results are
written to OUTPUT.partial as each request finishes; if the run is interrupted, rerun it with --resume to
keep them and generate only the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def parse_args(argv=None):
    from infer.args import add_engine_args
    from qwen_jax.cli import ArgumentParser

    p = ArgumentParser(prog="python -m infer.generate", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="one prompt, streamed to the terminal")
    src.add_argument("--prompts-file", default=None, help="JSONL of prompts (needs --output)")
    p.add_argument("--output", default=None, help="JSONL results for --prompts-file (written as requests finish)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted --prompts-file run: keep the results already written")
    p.add_argument("--chat", action="store_true", help="apply the checkpoint's chat template to --prompt")
    p.add_argument("--system", default=None, help="system message with --chat")
    p.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="Qwen3 thinking mode in the chat template (default: the template's)")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=None, help="top-n logprobs per token in --output")
    return p.parse_args(argv)


def _sampling(args, overrides: dict | None = None):
    from infer.sampling import SamplingParams
    from qwen_jax.errors import RequestError

    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                        seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos, logprobs=args.logprobs)
    if overrides:
        fields = {f.name for f in dataclasses.fields(sp)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise RequestError(f"unknown sampling field(s) {unknown}")
        sp = dataclasses.replace(sp, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    return sp.validate()


def _read_prompts(path: str, args) -> list[tuple[int, dict, "SamplingParams"]]:  # noqa: F821
    """Every line of the prompts file, checked before any model loads: -> [(line number, object, params)]."""
    from qwen_jax.errors import DataError, RequestError
    from qwen_jax.files import iter_jsonl

    items = []
    for n, obj in iter_jsonl(path):
        if not (isinstance(obj.get("prompt"), str) or isinstance(obj.get("messages"), list)):
            raise DataError(f"{path}:{n}: expected {{\"prompt\": str}} or {{\"messages\": [...]}}")
        overrides = {k: v for k, v in obj.items() if k not in ("prompt", "messages", "id")}
        try:
            sp = _sampling(args, overrides)
        except RequestError as e:
            raise RequestError(f"{path}:{n}: {e}") from None
        items.append((n, obj, sp))
    if not items:
        raise DataError(f"{path}: no prompts")
    return items


class _Results:
    """The batch's results, written as each request finishes: OUTPUT.partial gets one JSON line per finished
    request (with its input `line`), flushed at once, so a crash or Ctrl-C loses nothing finished. At the end
    OUTPUT is written in input order, atomically, and the partial file is removed. With resume, the lines
    already in OUTPUT.partial are kept and not generated again."""

    def __init__(self, output: str, resume: bool):
        from qwen_jax.errors import ConfigError

        self.output, self.partial = output, output + ".partial"
        self.done: dict[int, dict] = {}
        if os.path.exists(self.partial):
            if not resume:
                raise ConfigError(f"{self.partial} holds results of an unfinished run: pass --resume to continue "
                                  f"it, or remove the file")
            with open(self.partial, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash: that request runs again
                    self.done[rec["line"]] = rec
        try:
            self.f = open(self.partial, "a", encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"--output {output}: cannot write {self.partial} ({e.strerror})") from None

    def add(self, rec: dict) -> None:
        self.done[rec["line"]] = rec
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()

    def finish(self, lines: list[int]) -> None:
        self.f.close()
        tmp = self.output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for n in lines:
                f.write(json.dumps(self.done[n], ensure_ascii=False) + "\n")
        os.replace(tmp, self.output)
        os.remove(self.partial)


def _record(n: int, obj: dict, out) -> dict:
    rec = {"line": n, **({"id": obj["id"]} if "id" in obj else {}), "text": out.text, "token_ids": out.token_ids,
           "finish_reason": out.finish_reason, "prompt_tokens": len(out.prompt_token_ids)}
    if out.logprobs is not None:
        rec["logprobs"] = [{str(k): v for k, v in lp.items()} for lp in out.logprobs]
    if out.error:
        rec["error"] = out.error
    return rec


def _batch(args) -> int:
    import queue

    from tqdm.auto import tqdm

    from jinja2 import TemplateError

    from infer.args import build_llm
    from qwen_jax.errors import ConfigError

    if not args.output:
        raise ConfigError("--prompts-file needs --output")
    items = _read_prompts(args.prompts_file, args)
    results = _Results(args.output, args.resume)
    todo = [it for it in items if it[0] not in results.done]
    if results.done:
        print(f"resuming: {len(items) - len(todo)} of {len(items)} results already in {results.partial}",
              file=sys.stderr)
    llm = build_llm(args)
    done: queue.SimpleQueue = queue.SimpleQueue()
    streams, by_id = [], {}
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="generate", unit="req", dynamic_ncols=True)
    try:
        for n, obj, sp in todo:
            try:
                prompt = obj.get("prompt")
                if prompt is None:
                    prompt = llm.tokenizer.apply_chat_template(obj["messages"], enable_thinking=args.enable_thinking,
                                                               tokenize=False)
                s = llm.engine.add_request(prompt, sp, notify=done, index=n)
            except (ValueError, TypeError, TemplateError) as e:  # a bad prompt or conversation: that line fails
                results.add({"line": n, **({"id": obj["id"]} if "id" in obj else {}), "text": "",
                             "token_ids": [], "finish_reason": "error", "prompt_tokens": 0, "error": str(e)})
                bar.update(1)
                continue
            streams.append(s)
            by_id[s.request_id] = (n, obj, s)
        for _ in range(len(streams)):
            n, obj, s = by_id[llm.engine.next_done(done)]
            results.add(_record(n, obj, s.result()))
            bar.update(1)
    except KeyboardInterrupt as e:
        e.args = (f"interrupted: {len(results.done)} of {len(items)} results are in {results.partial}; rerun with "
                  f"--resume to finish",)
        raise
    finally:
        bar.close()
        for s in streams:
            s.close()
    results.finish([n for n, _, _ in items])
    errors = [r for r in results.done.values() if r.get("error")]
    for r in sorted(errors, key=lambda r: r["line"]):
        print(f"line {r['line']}: error: {r['error']}", file=sys.stderr)
    print(f"wrote {len(items)} results to {args.output}" + (f" ({len(errors)} failed)" if errors else ""),
          file=sys.stderr)
    return 0


def _main(args) -> int:
    from infer.args import build_llm, check_engine_args

    check_engine_args(args)
    sp = _sampling(args)
    if args.prompts_file:
        return _batch(args)
    llm = build_llm(args)
    prompt = args.prompt if args.prompt is not None else "ROMEO.\n"
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        prompt = llm.tokenizer.apply_chat_template(messages, enable_thinking=args.enable_thinking, tokenize=False)
    stream = llm.stream(prompt, sp)  # a bad prompt fails here, before anything is printed
    if not args.chat:
        sys.stdout.write(prompt)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[finish_reason: {stream.finish_reason}]", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    from qwen_jax.cli import run_cli

    return run_cli(lambda: _main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
