"""Prompt rendering and completion-only loss masks.

Two prompt styles:
- "chat": ChatML through `tokenizer.apply_chat_template`; the question (plus a short per-task
  instruction) is the user turn; the completion is the assistant reply, ended by <|im_end|>.
- "fewshot": plain text for base models, `Question: ...\\nAnswer: ...` blocks separated by a blank
  line; the completion follows "Answer:" after one space and generation stops at the next
  "\\n\\nQuestion:" (or eos, which ends every fewshot training completion).

Labels follow the HuggingFace convention: `labels` has the length of `input_ids`, equals it on the
tokens to learn and is -100 elsewhere; the loss shifts (logits at t predict labels at t+1).
"""
from __future__ import annotations

from typing import Sequence

from model.tokenizer import IM_END, Tokenizer, chatml_segments

IGNORE_INDEX = -100
STYLES = ("chat", "fewshot")
# Appended to the user turn (chat style). Qwen2.5-Math's chain-of-thought instruction for the
# \boxed{} benchmarks; the embedded task answers GSM8K-style with "#### N", so its line is short.
INSTRUCTIONS = {
    "synthetic": "Solve step by step.",
    "gsm8k": "Please reason step by step, and put your final answer within \\boxed{}.",
    "math": "Please reason step by step, and put your final answer within \\boxed{}.",
    "humaneval": "Complete the following Python function.",
}
STOP_STRINGS = {"chat": (), "fewshot": ("\n\nQuestion:",)}  # beyond the tokenizer's stop ids


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def render_prompt(tokenizer: Tokenizer, question: str, style: str = "chat", *, task: str = "synthetic",
                  instruction: str | None = None, system: str | None = None,
                  shots: Sequence[tuple[str, str]] = ()) -> str:
    """The prompt string for `question`; the model continues it with the completion.

    instruction: appended to each chat user turn after a newline; None -> INSTRUCTIONS[task], ""
    for none. shots: (question, answer) pairs, earlier user/assistant turns in chat style and
    earlier Question/Answer blocks in fewshot style. system: chat style only.
    """
    _check_style(style)
    if style == "fewshot":
        if system is not None:
            raise ValueError("render_prompt: a system message needs style='chat'; fewshot prompts are plain text")
        blocks = [f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots]
        return "".join(blocks) + f"Question: {question}\nAnswer:"
    if instruction is None:
        if task not in INSTRUCTIONS:
            raise ValueError(f"render_prompt: unknown task {task!r}; known: {sorted(INSTRUCTIONS)} (or pass instruction=)")
        instruction = INSTRUCTIONS[task]
    messages = [{"role": "system", "content": system}] if system is not None else []
    for q, a in shots:
        messages += [{"role": "user", "content": _user_turn(q, instruction)}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": _user_turn(question, instruction)})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _user_turn(question: str, instruction: str) -> str:
    return f"{question}\n{instruction}" if instruction else question


def format_completion(answer: str, style: str) -> str:
    """The training completion text for a rendered prompt: fewshot answers follow "Answer:" after a space."""
    _check_style(style)
    return " " + answer if style == "fewshot" else answer


def _encode_segments(tokenizer: Tokenizer, segments: list[tuple[str, bool]], max_len: int,
                     source: str) -> tuple[list[int], list[int]]:
    """Encode (text, learn) pieces one by one; labels copy the ids of `learn` pieces, -100 elsewhere.

    Truncation policy: the sequence is cut at max_len from the right. Cutting a completion drops its
    end token too, so a truncated example never teaches the model to stop mid-answer. An example
    whose learnable tokens all fall past max_len would train on nothing: that is an error.
    """
    input_ids, labels = [], []
    for text, learn in segments:
        ids = tokenizer.encode(text)
        input_ids += ids
        labels += ids if learn else [IGNORE_INDEX] * len(ids)
    if all(label == IGNORE_INDEX for label in labels[:max_len]):
        raise ValueError(f"{source}: no learnable token within max_len={max_len} (sequence has {len(input_ids)} "
                         f"tokens, first learnable at {_first_learnable(labels)}); raise max_len or drop the example")
    return input_ids[:max_len], labels[:max_len]


def _first_learnable(labels: list[int]) -> int | None:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)


def tokenize_example(tokenizer: Tokenizer, prompt: str, completion: str, max_len: int,
                     style: str = "chat") -> tuple[list[int], list[int]]:
    """(input_ids, labels) for prompt + completion + end token, loss on the completion and end token.

    The end token is <|im_end|> in chat style and eos in fewshot style. Prompt and completion are
    encoded separately so the mask boundary is exact; with the embedded tokenizer this equals
    encoding the concatenation whenever the completion starts at a piece boundary (a space, a
    newline or a special token), as it does for the rendered prompts above.
    """
    _check_style(style)
    end = IM_END if style == "chat" else tokenizer.decode([tokenizer.eos_id])
    segments = [(prompt, False), (completion, True), (end, True)]
    return _encode_segments(tokenizer, segments, max_len, "tokenize_example")


def chat_example(tokenizer: Tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a ChatML conversation, loss on each assistant reply and its <|im_end|>."""
    segments = chatml_segments(messages, tokenizer.default_system_prompt)
    return _encode_segments(tokenizer, segments, max_len, "chat_example")
