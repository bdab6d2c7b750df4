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

from .base import Observation, Scorer, register


@register("lazy")
class LazyEviction(Scorer):
    paper = "LazyEviction (2025)"
    summary = "recurrence interval of each token's importance; evicts every `lag` steps"
    queries = -1
    state_names = ("lazy_last", "lazy_gap")

    def __init__(self, window: int = 32, lag: int = 64) -> None:
        super().__init__(window)
        self.decode_interval = lag

    def score(self, obs: Observation) -> Tensor:
        pos = obs.positions.float()
        qpos_all = obs.query_positions.to(obs.keys.device).float()
        # New entries start with state 0: an entry was last "important" when it was written.
        last = torch.maximum(obs.state.get("lazy_last", obs.zeros()), pos)
        gap = obs.state.get("lazy_gap", obs.zeros())
        received = obs.zeros()
        # Query chunks in order (never the whole [m, n] attention): `last` carries the latest
        # important moment from one chunk to the next, so the scan equals one over all queries.
        for start, attn in obs.attention_chunks():  # [B, H, mc, n]
            qpos = qpos_all[start : start + attn.shape[2]][None, None, :, None]
            visible = pos[:, :, None, :] <= qpos
            if obs.valid is not None:
                visible = visible & obs.valid[:, :, None, :]
            important = attn > 1.0 / visible.sum(-1, keepdim=True).clamp(min=1)
            events = torch.where(important, qpos, torch.tensor(float("-inf"), device=attn.device))
            previous = torch.cat([last[:, :, None], events], dim=2).cummax(dim=2).values
            gaps = torch.where(important, qpos - previous[:, :, :-1], 0.0)
            gap = torch.maximum(gap, gaps.amax(dim=2))
            last = previous[:, :, -1]
            received += attn.sum(dim=2)
        obs.state["lazy_last"], obs.state["lazy_gap"] = last, gap
        overdue = (obs.seen - 1 - last) - gap
        on_schedule = 1e4 + received  # above any overdue entry's score
        return torch.where(overdue <= 0, on_schedule, -overdue)
