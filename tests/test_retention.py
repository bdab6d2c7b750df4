"""Pooled answer retention with a bootstrap interval, and what the tables and report say of it."""

import json

from kvbudget.eval.report import separations, write_report
from kvbudget.eval.retention import MIN_GAIN, pooled, question_retention
from kvbudget.eval.summary import format_table, summarize


def _row(policy: str, lp: float, full: float, none: float = -5.0, i: int = 0, budget: str = "4x") -> dict:
    return {"task": f"t{i}", "question_index": 0, "mode": "multi-turn", "policy": policy, "budget": budget,
            "score": 0.0, "answer_logprob": lp, "lp_full": full, "lp_none": none, "metric": "contains",
            "kv_bytes": 100 if policy == "full" else 25, "peak_bytes": 200, "prefill_s": 1.0, "compress_s": 0.1,
            "decode_s": 1.0, "new_tokens": 4, "compression": 1.0 if policy == "full" else 4.0,
            "entries_kept": 1.0 if policy == "full" else 0.5}


def test_pooled_is_summed_gains_over_questions_that_pass_the_threshold():
    rows = [_row("p", -3.0, -1.0), _row("p", -4.0, -3.0), _row("p", 10.0, -4.9)]  # the last gains 0.1 nat
    assert question_retention(rows[2]) is None and MIN_GAIN == 1.0
    p = pooled(rows)
    assert (p.n, p.total) == (2, 3)
    assert abs(p.value - (2.0 + 1.0) / (4.0 + 2.0)) < 1e-12  # not the mean of 0.5 and 0.5 by luck: see below
    assert p.low <= p.value <= p.high
    skewed = pooled([_row("p", -4.9, -3.5), _row("p", 5.0, 5.0)])  # one small gain, one big
    assert abs(skewed.value - (0.1 + 10.0) / (1.5 + 10.0)) < 1e-12  # a per-question mean would give 0.53
    assert pooled(rows, seed=0) == pooled(rows, seed=0)  # seeded


def test_intervals_separate_only_for_a_real_difference():
    good = [_row("good", -1.0 - 0.05 * (i % 3), -1.0, i=i) for i in range(20)]
    bad = [_row("bad", -4.5 + 0.05 * (i % 3), -1.0, i=i) for i in range(20)]
    noisy = [_row("noisy", -1.0 if i % 2 else -5.0, -1.0, i=i) for i in range(20)]
    g, b, n = pooled(good), pooled(bad), pooled(noisy)
    assert g.separates(b) and b.separates(g)
    assert g.low > 0.9 and b.high < 0.2 and not n.separates(pooled(noisy[::-1]))
    summary = summarize([*good, *bad, *[_row("full", -1.0, -1.0, i=i) for i in range(20)]])
    assert "good > bad (multi-turn, 4x)" in separations(summary["rows"]) and "bad > good" not in separations(summary["rows"])
    table = format_table(summary)
    assert "retain [95% CI]" in table and ">= 1 nat (multi-turn 20 of 20)" in table and "kept" in table


def test_report_states_the_threshold_and_intervals(tmp_path):
    rows = [_row(p, lp, -1.0, i=i) for i in range(6) for p, lp in (("full", -1.0), ("snapkv", -3.0))]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md, _ = write_report(tmp_path)
    text = md.read_text()
    assert "0.50 [0.50,0.50]" in text and ">= 1 nat" in text and "intervals separate" in text


def test_table_shows_what_an_episodic_session_stores_beside_its_device_cache():
    epi = [dict(_row("epicache", -2.0, -1.0, i=i), stored_bytes=100) for i in range(3)]
    table = format_table(summarize([*epi, *[_row("snapkv", -2.0, -1.0, i=i) for i in range(3)]]))
    assert "epicache 4x: stores 0.00 MB (every episode), 0.00 MB on the device" in table
    assert "snapkv 4x: stores" not in table and summarize(epi)["rows"][0]["stored_bytes"] == 100
