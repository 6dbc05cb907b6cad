"""Qwen3 reasoning and tool-call parsing on canned model outputs: whole and streamed in random pieces."""

import json

import pytest

from infer.parsers import OutputParser, parse_output

THINK = "<think>\nThe user wants 2 + 2. That is 4.\n</think>\n\n"
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "lookup", "arguments": {"q": "café"}}\n</tool_call>'


def streamed(text, rng, tools):
    """Feed `text` in random pieces; -> (reasoning, content, [(name, arguments)])."""
    p, r, c, calls, i = OutputParser(tools=tools), "", "", [], 0
    while i < len(text):
        n = int(rng.integers(1, 9))
        out = p.feed(text[i:i + n])
        r, c, calls, i = r + out.reasoning, c + out.content, calls + out.tool_calls, i + n
    out = p.feed("", final=True)
    return r + out.reasoning, c + out.content, [(x.name, x.arguments) for x in calls + out.tool_calls]


@pytest.mark.parametrize("case", ["reasoning", "no_reasoning", "unfinished_reasoning", "tools", "bad_tool",
                                  "unclosed_tool", "tools_off"])
def test_whole_and_streamed_parses_agree(case, rng):
    text, tools, want = {
        "reasoning": (THINK + "It is 4.", False, ("\nThe user wants 2 + 2. That is 4.\n", "It is 4.", [])),
        "no_reasoning": ("It is 4. <think> is a tag.", False, ("", "It is 4. <think> is a tag.", [])),
        "unfinished_reasoning": ("<think>\nstill thinking", False, ("\nstill thinking", "", [])),
        "tools": (THINK + "Let me add.\n" + CALL + "\n" + CALL2, True,
                  ("\nThe user wants 2 + 2. That is 4.\n", "Let me add.",
                   [("add", '{"a": 2, "b": 2}'), ("lookup", '{"q": "café"}')])),
        "bad_tool": ("<tool_call>\n{not json}\n</tool_call>", True, ("", "<tool_call>\n{not json}\n</tool_call>", [])),
        "unclosed_tool": ('Sure.\n<tool_call>\n{"name": "add"', True, ("", 'Sure.\n<tool_call>\n{"name": "add"', [])),
        "tools_off": (CALL, False, ("", CALL, [])),
    }[case]
    whole = parse_output(text, tools=tools)
    assert (whole.reasoning, whole.content, [(c.name, c.arguments) for c in whole.tool_calls]) == want
    r, c, calls = streamed(text, rng, tools)
    assert (r, calls) == (want[0], want[2])
    assert c.strip() == want[1].strip()  # streaming keeps the blank lines between calls; the whole strips them
    for _, args in calls:
        json.loads(args)


def test_tool_call_ids_are_unique_and_arguments_may_be_a_string():
    out = parse_output('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
                       '<tool_call>{"name": "f", "arguments": {}}</tool_call>', tools=True)
    assert [c.arguments for c in out.tool_calls] == ['{"x": 1}', "{}"]
    assert out.tool_calls[0].id != out.tool_calls[1].id
