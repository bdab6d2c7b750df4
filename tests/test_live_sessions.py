"""The server's sessions in memory under the bound (`serve.live.LiveSessions`): what `fit` moves
out, in which order, and that a refusal moves nothing."""

from pathlib import Path
from types import SimpleNamespace

from kvbudget.serve.config import ServeConfig
from kvbudget.serve.live import LiveSessions
from kvbudget.serve.metrics import Metrics


def _live(memory: int, sessions: dict[str, int], slots: list[int] | None = None) -> LiveSessions:
    """A bound of ``memory`` bytes over idle sessions holding ``sessions`` bytes (oldest first),
    beside decode slots of ``slots[0]`` bytes that `shed` drops."""
    slots = slots if slots is not None else [0]

    def shed() -> int:
        freed, slots[0] = slots[0], 0
        return freed

    live = LiveSessions(ServeConfig("m", Path("."), memory=memory), Metrics(lambda: {}), extra=lambda: slots[0], shed=shed)
    for name, nbytes in sessions.items():
        live.add(("", name), SimpleNamespace(stored_bytes=nbytes))
    return live


def test_fit_moves_the_least_recently_used_idle_sessions_out_until_it_fits():
    live = _live(100, {"a": 30, "b": 30, "c": 30})
    live.use(("", "a"))
    assert live.fit(40)
    assert list(live.sessions) == [("", "c"), ("", "a")], "b went first, then nothing more was needed"
    assert live.metrics.counters["evictions"] == 1


def test_fit_drops_idle_slots_before_any_session():
    slots = [40]
    live = _live(100, {"a": 30, "b": 30}, slots)
    assert live.fit(30) and slots == [0]
    assert len(live) == 2 and live.metrics.counters["evictions"] == 0


def test_a_refusal_moves_no_session_out():
    """Where even every idle session moved out would leave no room (the turns in flight hold the
    rest), `fit` refuses at once: the idle sessions stay (a refused growth of the decode slots or
    a waiting turn costs them no reload)."""
    live = _live(100, {"a": 20, "b": 20})
    assert live.reserve("turn", ("", "t"), 50)
    assert not live.fit(70)
    assert len(live) == 2 and live.metrics.counters["evictions"] == 0
    assert not live.reserve("other", ("", "u"), 70)
    assert len(live) == 2 and live.committed() == 90
    assert live.fit(30) and list(live.sessions) == [("", "b")]
