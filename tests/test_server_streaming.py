"""Streaming a reply (`serve/streaming.py`): the model thread's events reach a request's queue on
the event loop in order, in batches (one wake-up of the loop for the events of a decode step),
and the text deltas of tokens pushed in groups join to the same answer as one by one."""

import asyncio
import threading

import pytest

from kvbudget.runtime.models import load_tokenizer
from kvbudget.serve.streaming import Outbox, TextStreamer, next_events


def test_events_from_another_thread_arrive_in_order_in_batches():
    """Events put from a thread while the loop is busy are delivered in order, every one of them,
    with one wake-up of the loop per batch; `next_events` takes all that are there."""

    async def main():
        loop, outbox = asyncio.get_running_loop(), Outbox()
        queues = [asyncio.Queue() for _ in range(3)]
        wakeups = []
        call = loop.call_soon_threadsafe

        def counted(*args):
            wakeups.append(1)
            return call(*args)

        loop.call_soon_threadsafe = counted

        def model_thread():
            for step in range(50):  # the loop is not running these: all queue up
                for i, q in enumerate(queues):
                    outbox.put(loop, q, ("token", step * 10 + i))

        thread = threading.Thread(target=model_thread)
        thread.start()
        thread.join()
        got = [await next_events(q, timeout=5) for q in queues]
        assert got == [[("token", step * 10 + i) for step in range(50)] for i in range(3)]
        assert len(wakeups) == 1, "one wake-up for the 150 events put while the loop was busy"
        outbox.put(loop, queues[0], None)
        assert await next_events(queues[0], timeout=5) == [None]
        with pytest.raises(TimeoutError):
            await next_events(queues[1], timeout=0.01)

    asyncio.run(main())


def test_a_closed_loop_is_an_error_and_leaves_nothing_behind():
    loop = asyncio.new_event_loop()
    loop.close()
    outbox = Outbox()
    with pytest.raises(RuntimeError):
        outbox.put(loop, asyncio.Queue(), ("token", 1))
    with pytest.raises(RuntimeError):  # still scheduled again: nothing pending was left for it
        outbox.put(loop, asyncio.Queue(), ("token", 2))


def test_tokens_pushed_in_groups_give_the_same_text():
    tok = load_tokenizer()
    ids = tok("Un café, s'il vous plaît — 東京 🚲 and a stop here.", add_special_tokens=False).input_ids
    one = TextStreamer(tok, ["stop"])
    each = "".join(one.push(t) for t in ids)
    grouped = TextStreamer(tok, ["stop"])
    groups = "".join(grouped.push(*ids[i : i + 3]) for i in range(0, len(ids), 3))
    assert each == groups == tok.decode(ids, skip_special_tokens=True).split("stop")[0].strip()
