"""KVzip (Kim et al. 2025): query-agnostic scoring by context reconstruction.

The model is asked to repeat the context ("Repeat the previous context exactly." followed by the
context itself); a cached entry matters as much as the largest attention it receives from any
query head during that reconstruction. The reconstruction costs one extra pass over the context
and its KV is discarded. Block-wise, as the paper's chunked scoring: after each block, the
tokens fed since the last compression are repeated; an entry keeps the maximum score it has had
(state ``kvzip``), so entries scored when their own block was repeated keep that evidence.

Deviation: the softmax is taken over the cached entries only (the repeated tokens are scratch and
not scored), which rescales each query's row by its attention mass on the cache.
"""

import functools

import torch
from torch import Tensor

from ...compress import Observation, Scorer, register

PROMPT = "Repeat the previous context exactly."


@functools.lru_cache(maxsize=8)
def repeat_prompt(tokenizer) -> Tensor:
    """The prompt's token ids [1, n], as a new user turn in the model's own chat template (the
    difference of two renderings, so no default system prompt sneaks in), or plain text."""
    if getattr(tokenizer, "chat_template", None):
        base = [{"role": "user", "content": "x"}]
        before = tokenizer.apply_chat_template(base, tokenize=False)
        after = tokenizer.apply_chat_template(base + [{"role": "user", "content": PROMPT}], tokenize=False,
                                              add_generation_prompt=True)
        text = after[len(before) :] if after.startswith(before) else f"\n{PROMPT}\n"
    else:
        text = f"\n\n{PROMPT}\n"
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids


@register("kvzip")
class KVzip(Scorer):
    paper = "KVzip (Kim et al. 2025)"
    summary = "max attention received while the model repeats the context (one extra pass)"
    queries = -1
    state_names = ("kvzip",)

    def reconstruction_ids(self, fed: Tensor, tokenizer) -> Tensor:
        if tokenizer is None:  # a bare prefill: the fed tokens are repeated without the prompt
            return fed
        return torch.cat([repeat_prompt(tokenizer).to(fed.device), fed], dim=1)

    def score(self, obs: Observation) -> Tensor:
        received = obs.attention_max()  # max over query heads and queries
        best = torch.maximum(obs.state.get("kvzip", obs.zeros()), received)
        obs.state["kvzip"] = best
        return best
