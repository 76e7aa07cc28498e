"""Chat and instruction examples as token ids with a completion mask.

A ``messages`` conversation is rendered with the tokenizer's chat template. Its completion tokens are
those of the assistant turns: what the model generates after the template's generation prompt, up to
and including the end-of-turn token. A template with ``{% generation %}`` markers says so itself, and
transformers' ``return_assistant_tokens_mask`` is used. For other templates the spans come from the
renders of the conversation's prefixes. Assistant turn i starts where ``messages[:i]`` with the
generation prompt ends, and ends where ``messages[:i+1]`` ends, trailing whitespace excluded (the
newline a template puts after the end-of-turn token is layout, not generated). A template whose
prefixes do not render as prefixes of the whole conversation is refused.

A ``prompt``/``completion`` pair becomes a user and an assistant turn with the template. Plain (no
template), it is the prompt's ids then the completion's, the completion masked in.
"""

from __future__ import annotations

from typing import Any

from distill.errors import UserError


def check_messages(value: Any, where: str) -> list[dict]:
    """``value`` as a list of {role, content} messages with string fields, or a UserError."""
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise UserError(f"{where}: 'messages' is not a list of {{'role', 'content'}} messages with string values")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def has_generation_marks(tok) -> bool:
    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    return "generation %}" in template


def _render(tok, messages: list[dict], generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character spans of its assistant turns), from prefix renders."""
    full = _render(tok, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            before = _render(tok, messages[:i], generation_prompt=True) if i > 0 else ""
        except Exception:  # a template that cannot render an empty conversation
            before = ""
        upto = _render(tok, messages[:i + 1])
        if not (full.startswith(upto) and upto.startswith(before)):
            raise UserError("the tokenizer's chat template does not render a conversation's first turns as the "
                            "start of the whole conversation, so its assistant turns cannot be found; add "
                            "{% generation %} markers to the template")
        spans.append((len(before), len(upto.rstrip())))
    return full, spans


def encode_conversation(tok, messages: list[dict], use_marks: bool | None = None) -> tuple[list[int], list[int]]:
    """(ids, completion mask) of a rendered conversation; ``use_marks`` None: the template's
    generation markers where it has them."""
    if use_marks is None:
        use_marks = has_generation_marks(tok)
    if use_marks:
        enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(enc["input_ids"]), [int(b) for b in enc["assistant_masks"]]
        return ids, mask
    full, spans = assistant_spans(tok, messages)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= s and e <= b for a, b in spans) and e > s) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def prompt_completion_messages(prompt: Any, completion: Any, where: str) -> list[dict]:
    """A prompt/completion pair as messages: strings become a user and an assistant turn; lists of
    messages (the conversational form) are joined, the completion's turns being the assistant's."""
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
        return check_messages(list(prompt) + list(completion), where)
    raise UserError(f"{where}: 'prompt' and 'completion' must both be strings or both lists of messages")


def encode_plain_pair(tok, prompt: str, completion: str, start: int, end: int) -> tuple[list[int], list[int]]:
    """Without a template: start, the prompt's ids, the completion's ids, end; the completion and the
    end token are the completion."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    return [start, *p, *c, end], [0] * (1 + len(p)) + [1] * (len(c) + 1)
