"""Sweeps on the default model: multi-request mode, fidelity columns, resuming, the report.

Contexts are ~200 tokens and answers at most 4 tokens, so each cell takes a second or two.
"""

from __future__ import annotations

import json

import pytest
import torch

import kvbudget as kb
from kvbudget.errors import KVBudgetError
from kvbudget.eval import runner
from kvbudget.eval.fidelity import next_token_fidelity
from kvbudget.eval.generators import make_tasks
from kvbudget.eval.report import write_report
from kvbudget.eval.runner import EvalConfig, expand_policies, read_results, run_eval


@pytest.fixture(scope="module")
def tasks(default_model):
    _, tok = default_model
    task = make_tasks("needle", tok, 1, 200, seed=1)[0]  # 3 facts
    task.questions = task.questions[:2]
    return [task]


def test_fidelity_of_identical_and_different_distributions():
    ref = torch.log_softmax(torch.randn(5, 11), -1)
    assert next_token_fidelity(ref, ref.clone()) == (1.0, pytest.approx(0.0, abs=1e-6))
    other = torch.log_softmax(torch.randn(5, 11), -1)
    agreement, kl = next_token_fidelity(ref, other)
    expected = (ref.exp() * (ref - other)).sum(-1).mean()
    assert kl == pytest.approx(float(expected), rel=1e-5) and kl > 0
    assert agreement == pytest.approx(float((ref.argmax(-1) == other.argmax(-1)).float().mean()))
    with pytest.raises(ValueError, match="one shape"):
        next_token_fidelity(ref, other[:3])


def test_full_vs_full_fidelity_is_perfect(default_model, tasks):
    """Teacher-forcing the full cache on its own greedy answer gives back its decoding steps."""
    model, tok = default_model
    task, q = tasks[0], tasks[0].questions[0]
    a = kb.Session(model, tok, "full")
    a.add_context(task.context)
    turn = a.ask_detailed(q.question, 6, keep_steps=True)
    assert turn.step_logprobs.shape[0] in (len(turn.token_ids), len(turn.token_ids) + 1)
    assert turn.step_logprobs.argmax(-1).tolist()[: len(turn.token_ids)] == turn.token_ids
    b = kb.Session(model, tok, "full")
    b.add_context(task.context)
    forced = b.ask_detailed(q.question, 0, reference=turn.step_logprobs.argmax(-1).tolist())
    agreement, kl = next_token_fidelity(turn.step_logprobs, forced.reference_logprobs)
    assert agreement == 1.0 and kl < 1e-3


def test_fork_is_independent_and_equals_a_fresh_session(default_model, tasks):
    model, tok = default_model
    task = tasks[0]
    policy = kb.policy("snapkv", budget=64)
    base = kb.Session(model, tok, policy, block_size=64)
    base.add_context(task.context)
    held, fed = base.kv_bytes, list(base.input_ids)
    answers = [base.fork().ask_detailed(q.question, 4, gold=q.answers[0]) for q in task.questions]
    assert base.kv_bytes == held and base.input_ids == fed and len(base.messages) == 1  # untouched
    fresh = kb.Session(model, tok, policy, block_size=64)
    fresh.add_context(task.context)
    again = fresh.ask_detailed(task.questions[1].question, 4, gold=task.questions[1].answers[0])
    assert answers[1].token_ids == again.token_ids
    assert answers[1].answer_logprob == pytest.approx(again.answer_logprob, abs=1e-4)


def _count_calls(monkeypatch) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []
    real = runner.run_task

    def counting(model, tok, task, name, budget, cfg, references=None):
        calls.append((name, cfg.mode))
        return real(model, tok, task, name, budget, cfg, references)

    monkeypatch.setattr(runner, "run_task", counting)
    return calls


def test_sweep_modes_fidelity_and_resume(default_model, tasks, tmp_path, monkeypatch):
    model, tok = default_model
    cfg = EvalConfig(["streaming", "kivi4"], ["64"], block_size=64, max_new_tokens=4,
                     mode="multi-turn,multi-request,query-aware")
    calls = _count_calls(monkeypatch)
    summary = run_eval(model, tok, tasks, cfg, tmp_path, progress=False)
    rows = read_results(tmp_path / "results.jsonl")
    cells = {(r["mode"], r["policy"], r["budget"]) for r in rows}
    assert cells == {(m, p, b) for m in runner.MODES for p, b in [("full", "-"), ("streaming", "64"), ("kivi4", "-")]}
    assert len(rows) == 3 * 3 * 2
    for r in rows:
        assert 0.0 <= r["agreement"] <= 1.0 and r["kl"] >= 0.0
        if r["policy"] == "full":
            assert (r["agreement"], r["kl"]) == (1.0, 0.0) and r["retention"] in (1.0, None)
    streaming = [r for r in rows if r["policy"] == "streaming"]
    assert all(r["kv_bytes"] < r["full_kv_bytes"] for r in streaming)
    # One cache per session: it stores what it holds after the context, whatever the turns add.
    assert all(r["stored_bytes"] == r["kv_bytes"] for r in rows)
    assert {r["mode"] for r in summary["rows"]} == set(runner.MODES)
    assert all("agreement" in r and "kl" in r for r in summary["rows"])
    assert len(calls) == 3  # full, streaming, kivi4: each runs every mode in one call

    # Rerun with one more policy: only it runs (and the full cache, rerun as the in-memory reference).
    calls.clear()
    cfg.policies = ["streaming", "kivi4", "knorm"]
    run_eval(model, tok, tasks, cfg, tmp_path, progress=False)
    assert [name for name, _ in calls] == ["full", "knorm"]
    again = read_results(tmp_path / "results.jsonl")
    assert again[: len(rows)] == rows and len(again) == len(rows) + 3 * 2
    # Nothing left: nothing runs, not even the reference.
    calls.clear()
    run_eval(model, tok, tasks, cfg, tmp_path, progress=False)
    assert calls == [] and len(read_results(tmp_path / "results.jsonl")) == len(again)

    # A crash mid-write leaves a cut line: it is dropped, and the rest of its cell, which runs again.
    text = (tmp_path / "results.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "results.jsonl").write_text("".join(text[:-1]) + text[-1][:40])
    calls.clear()
    run_eval(model, tok, tasks, cfg, tmp_path, progress=False)
    assert calls == [("full", cfg.mode), ("knorm", "query-aware")]  # the cut row's cell, that mode only
    assert len(read_results(tmp_path / "results.jsonl")) == len(again)

    # Other settings in the same directory: refused, not mixed.
    with pytest.raises(KVBudgetError, match="max_new_tokens=4"):
        run_eval(model, tok, tasks, EvalConfig(["streaming"], ["64"], block_size=64, max_new_tokens=8), tmp_path,
                 progress=False)

    md, page = write_report(tmp_path, env={"model": "smollm2-135m", "command": "kvbudget eval ..."})
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 1 and "OPTIMISTIC" in html and "<table>" in html
    text = md.read_text()
    assert "| multi-request | streaming | 64 |" in text and "![plot](plot.png)" in text


def test_report_has_a_section_and_plot_per_task_family(tmp_path):
    rows = []
    for fam in ("needle", "kv"):
        for policy, budget, kv in (("full", "-", 100), ("snapkv", "64", 25)):
            rows.append({"task": f"{fam}-0", "question_index": 0, "category": fam, "mode": "multi-turn",
                         "policy": policy, "budget": budget, "score": 1.0, "retention": 0.5, "agreement": 1.0,
                         "kl": 0.0, "kv_bytes": kv, "full_kv_bytes": 100, "compression": 100 / kv, "peak_bytes": 200,
                         "prefill_s": 1.0, "compress_s": 0.1, "decode_s": 1.0, "new_tokens": 4})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md, page = write_report(tmp_path)
    assert (tmp_path / "plot-needle.png").exists() and (tmp_path / "plot-kv.png").exists()
    assert page.read_text().count("data:image/png;base64,") == 3
    assert "## Task: needle" in md.read_text() and "## Task: kv" in md.read_text()


def test_all_policies():
    names = expand_policies(["all"])
    assert {"snapkv", "pyramidkv", "adakv", "kivi4", "kivi2", "mikv", "think"} <= set(names)
    assert "full" not in names and "kivi" not in names and "rotate" not in names  # kivi = kivi2
    assert len(names) == len(set(names))
    assert expand_policies(["snapkv", "all"])[0] == "snapkv"
    assert runner.parse_modes("all") == list(runner.MODES)
    with pytest.raises(KVBudgetError, match="unknown mode 'single-shot'"):
        runner.parse_modes("multi-turn,single-shot")
