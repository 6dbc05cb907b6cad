"""python -m infer.generate: generate text with a Qwen3 checkpoint.

    python -m infer.generate --prompt "ROMEO."                       # the shipped small model, streamed
    python -m infer.generate --model /models/Qwen3-0.6B --chat --no-enable-thinking --prompt "Hi!"
    python -m infer.generate --model DIR --prompts-file in.jsonl --output out.jsonl --temperature 0.7

--prompts-file takes one JSON object per line: {"prompt": "..."} or {"messages": [...]} (rendered with the
checkpoint's chat template), optionally with per-line sampling fields (max_tokens, temperature, ...). The
output has one JSON line per input line, in input order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def parse_args(argv=None):
    from infer.args import add_engine_args

    p = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="one prompt, streamed to the terminal")
    src.add_argument("--prompts-file", default=None, help="JSONL of prompts (needs --output)")
    p.add_argument("--output", default=None, help="JSONL results for --prompts-file")
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


def _read_prompts(path: str, llm, args):
    """-> [(the line's object, prompt text, sampling params)]."""
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
        prompt = obj.get("prompt")
        if prompt is None:
            prompt = llm.tokenizer.apply_chat_template(obj["messages"], enable_thinking=args.enable_thinking,
                                                       tokenize=False)
        items.append((obj, prompt, sp))
    if not items:
        raise DataError(f"{path}: no prompts")
    return items


def _main(args) -> int:
    from infer.args import build_llm
    from qwen_jax.errors import ConfigError

    if args.prompts_file and not args.output:
        raise ConfigError("--prompts-file needs --output")
    sp = _sampling(args)
    llm = build_llm(args)
    if args.prompts_file:
        items = _read_prompts(args.prompts_file, llm, args)
        outs = llm.generate([p for _, p, _ in items], [s for _, _, s in items])
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            for (obj, _, _), out in zip(items, outs):
                rec = {**({"id": obj["id"]} if "id" in obj else {}), "text": out.text, "token_ids": out.token_ids,
                       "finish_reason": out.finish_reason, "prompt_tokens": len(out.prompt_token_ids)}
                if out.logprobs is not None:
                    rec["logprobs"] = [{str(k): v for k, v in lp.items()} for lp in out.logprobs]
                if out.error:
                    rec["error"] = out.error
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, args.output)
        errors = [o for o in outs if o.error]
        for o in errors:
            print(f"request {o.index + 1}: error: {o.error}", file=sys.stderr)
        print(f"wrote {len(outs)} results to {args.output}" + (f" ({len(errors)} failed)" if errors else ""),
              file=sys.stderr)
        return 0
    prompt = args.prompt if args.prompt is not None else "ROMEO.\n"
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        prompt = llm.tokenizer.apply_chat_template(messages, enable_thinking=args.enable_thinking, tokenize=False)
    else:
        sys.stdout.write(prompt)
    stream = llm.stream(prompt, sp)
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
