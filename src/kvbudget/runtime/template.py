"""A conversation as text: chat messages rendered in the model's chat template.

Models without a template (base models) get a plain rendering: the first message as a document,
then "Question: ...\\nAnswer: ..." turns. Either rendering of a conversation extends the rendering
of any earlier point of it (prefix-stable), which incremental feeding needs.
"""

from __future__ import annotations

from ..errors import KVBudgetError


def render(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    """``messages`` as the text the model reads, with the assistant's prompt after them if
    ``add_generation_prompt``."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = messages[0]["content"] if messages else ""
    for m in messages[1:]:
        text += f"\n\nQuestion: {m['content']}\nAnswer:" if m["role"] == "user" else f" {m['content']}"
    return text


def context_messages(context: str | list[dict]) -> list[dict]:
    """A context as chat messages: a document (str) is one user message; a list of messages is
    checked (non-empty, each a dict with 'role' and 'content')."""
    if isinstance(context, str):
        if not context.strip():
            raise KVBudgetError("context is empty")
        return [{"role": "user", "content": context}]
    messages = list(context)
    if not messages:
        raise KVBudgetError("context is an empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise KVBudgetError(f"context message {i} must be a dict with 'role' and 'content'")
    return messages
