"""A2SF (Jo & Shin 2024): accumulated attention with a forgetting factor."""

from torch import Tensor

from ...compress import Observation, Scorer, register


@register("a2sf")
class A2SF(Scorer):
    """s <- forget * s + a_t at every compression (each block, each decode interval): like H2O, but
    old attention fades, so tokens important long ago do not hold their place forever."""

    paper = "A2SF (Jo & Shin 2024)"
    summary = "accumulated attention with a forgetting factor (0.9 per block)"
    queries = -1
    state_names = ("a2sf",)

    def __init__(self, window: int = 32, forget: float = 0.9) -> None:
        super().__init__(window)
        self.forget = forget

    def score(self, obs: Observation) -> Tensor:
        acc = self.forget * obs.state.get("a2sf", obs.zeros()) + obs.attention_sum()
        obs.state["a2sf"] = acc
        return acc
