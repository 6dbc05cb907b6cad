"""Qwen3 output parsing for the chat API: reasoning (`<think>...</think>`) and tool calls
(`<tool_call>{"name": ..., "arguments": ...}</tool_call>`).

One incremental parser serves both the streamed and the whole response: `feed(text)` takes the next piece
of the output and returns what is now settled (reasoning text, content text, complete tool calls);
`feed("", final=True)` flushes the end. A marker split across pieces is held back until it is whole.

Reasoning is recognised when the output starts with `<think>` (Qwen3 in thinking mode); everything up to
`</think>` is reasoning and the rest is the answer. Tool calls are recognised in the answer when the
request has tools; a block whose JSON does not parse, or lacks a "name", stays in the content as text.
"""

from __future__ import annotations

import dataclasses
import json
import uuid

THINK_START, THINK_END = "<think>", "</think>"
TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (the OpenAI format)
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclasses.dataclass
class Parsed:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker` (0 if none)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def parse_tool_call(block: str) -> ToolCall | None:
    try:
        obj = json.loads(block.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            json.loads(args)
        except json.JSONDecodeError:
            return None
        return ToolCall(obj["name"], args)
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class OutputParser:
    def __init__(self, reasoning: bool = True, tools: bool = False):
        self.tools = tools
        self.phase = "start" if reasoning else "content"
        self.buf = ""
        self.num_tool_calls = 0

    def feed(self, text: str, final: bool = False) -> Parsed:
        self.buf += text
        out = Parsed()
        while True:
            buf = self.buf
            if self.phase == "start":
                if buf.startswith(THINK_START):
                    self.buf, self.phase = buf[len(THINK_START):], "reasoning"
                    continue
                if not final and THINK_START.startswith(buf):  # (the empty string too)
                    break  # may still become <think>
                self.phase = "content"
            elif self.phase == "reasoning":
                i = buf.find(THINK_END)
                if i >= 0:
                    out.reasoning += buf[:i]
                    self.buf, self.phase = buf[i + len(THINK_END):], "answer_start"
                    continue
                keep = 0 if final else _partial_suffix(buf, THINK_END)
                out.reasoning += buf[:len(buf) - keep]
                self.buf = buf[len(buf) - keep:]
                break
            elif self.phase == "answer_start":  # the blank lines between </think> and the answer
                self.buf = buf.lstrip("\n")
                if not self.buf and not final:
                    break
                self.phase = "content"
            elif self.phase == "content":
                i = buf.find(TOOL_START) if self.tools else -1
                if i >= 0:
                    out.content += buf[:i]
                    self.buf, self.phase = buf[i:], "tool"
                    continue
                keep = 0 if final or not self.tools else _partial_suffix(buf, TOOL_START)
                out.content += buf[:len(buf) - keep]
                self.buf = buf[len(buf) - keep:]
                break
            else:  # "tool": inside <tool_call> ... waiting for its end
                j = buf.find(TOOL_END)
                if j < 0:
                    if final:  # never closed: plain text
                        out.content += buf
                        self.buf = ""
                    break
                call = parse_tool_call(buf[len(TOOL_START):j])
                if call is None:
                    out.content += buf[:j + len(TOOL_END)]
                else:
                    out.tool_calls.append(call)
                    self.num_tool_calls += 1
                self.buf, self.phase = buf[j + len(TOOL_END):], "content"
        return out


def parse_output(text: str, reasoning: bool = True, tools: bool = False) -> Parsed:
    """A whole output at once: (reasoning, content, tool calls)."""
    parsed = OutputParser(reasoning, tools).feed(text, final=True)
    if parsed.tool_calls:
        parsed.content = parsed.content.strip()
    return parsed
