"""LazyEviction (2025): lagged eviction that keeps tokens whose importance recurs.

In long reasoning, a token is often attended, ignored for a while, then attended again. For each
entry this scorer tracks when it was last important (attention above the uniform share 1/n of
the query, as Scissorhands) and the longest interval observed between two such moments (its
recurrence interval). An entry is *on schedule* while the time since it was last important is
within its interval: it is expected back, and on-schedule entries are kept first, ranked by the
attention they just received (sinks and steadily used tokens on top). Overdue entries come
after, least overdue first, so entries attended once drift out in order of staleness. Eviction
runs only every ``lag`` generated tokens (the policy's decode interval), not at every step.
"""

import torch
from torch import Tensor

from ...compress import Observation, Scorer, register


@register("lazy")
class LazyEviction(Scorer):
    paper = "LazyEviction (2025)"
    summary = "recurrence interval of each token's importance; evicts every `lag` steps"
    queries = -1
    state_names = ("lazy_last", "lazy_gap")
    position_state = ("lazy_last",)

    def __init__(self, window: int = 32, lag: int = 64) -> None:
        super().__init__(window)
        self.decode_interval = lag

    def score(self, obs: Observation) -> Tensor:
        # New entries start with state 0: an entry was last "important" when it was written.
        last = torch.maximum(obs.state.get("lazy_last", obs.zeros()), obs.positions.float())
        received, last, gap = obs.attention_lazy(last, obs.state.get("lazy_gap", obs.zeros()))
        obs.state["lazy_last"], obs.state["lazy_gap"] = last, gap
        overdue = (obs.seen - 1 - last) - gap
        on_schedule = 1e4 + received  # above any overdue entry's score
        return torch.where(overdue <= 0, on_schedule, -overdue)
