"""The field's benchmarks end to end: a tiny RULER file through `kvbudget tasks make ruler`, `eval`
and `report`; each published-dataset fixture through eval and report; and the second real model
(Gemma 3 270M, a base model without a chat template) on RULER, its name on every table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kvbudget as kb
from kvbudget.cli import main
from kvbudget.eval.loaders.registry import load_tasks
from kvbudget.eval.report import write_report
from kvbudget.eval.ruler import make_ruler
from kvbudget.eval.runner import EvalConfig, run_eval

FIXTURES = Path(__file__).parent / "fixtures"


def test_ruler_through_tasks_make_eval_and_report(tmp_path, capsys):
    tasks = tmp_path / "ruler.jsonl"
    assert main(["tasks", "make", "ruler", "--task", "niah_single_1", "--length", "300", "--n", "1",
                 "--seed", "5", "--out", str(tasks)]) == 0
    out = tmp_path / "out"
    assert main(["eval", "--tasks", str(tasks), "--policy", "snapkv", "--budget", "2x", "--mode", "multi-turn",
                 "--max-new-tokens", "4", "--block-size", "64", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[multi-turn — model smollm2-135m]" in printed
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["policy"], r["category"], r["metric"]) for r in rows} == {
        ("full", "niah_single_1", "string_match_all"), ("snapkv", "niah_single_1", "string_match_all")}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sources"] == [{"benchmark": "ruler", "task": "niah_single_1", "length": 300, "answer_tokens": 128,
                                   "seed": 5, "haystack": "noise", "tokenizer": "smollm2-135m", "tasks": 1}]
    assert summary["prompt"] == "chat template" and summary["config"]["model"] == "smollm2-135m"
    report = (out / "report.md").read_text()
    assert "# kvbudget report — model smollm2-135m" in report
    assert "| ruler | niah_single_1 | 300 | 128 | 5 | noise | smollm2-135m | 1 |" in report  # how to regenerate
    assert "| chat template |" in report


@pytest.mark.parametrize("fixture, categories", [
    ("scbench_kv.jsonl", {"scbench_kv"}),
    ("longmemeval_oracle.json", {"single-session-user", "temporal-reasoning"}),
    ("locomo10.json", {"cat1-multi-hop", "cat2-temporal", "cat3-open-domain", "cat4-single-hop", "cat5-adversarial"}),
])
def test_published_fixture_through_eval_and_report(default_model, tmp_path, fixture, categories):
    model, tok = default_model
    tasks = load_tasks(str(FIXTURES / fixture))
    cfg = EvalConfig(["snapkv"], ["2x"], block_size=64, max_new_tokens=4, mode="multi-turn", model="smollm2-135m")
    summary = run_eval(model, tok, tasks, cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["category"] for r in rows} == categories
    assert len(rows) == 2 * sum(len(t.questions) for t in tasks)  # full + snapkv, every question in order
    assert all(r["kv_bytes"] < r["full_kv_bytes"] for r in rows if r["policy"] == "snapkv")
    benchmark = tasks[0].meta["benchmark"]
    assert [s["benchmark"] for s in summary["sources"]] == [benchmark]
    md, _ = write_report(tmp_path, env={"model": "smollm2-135m"})
    text = md.read_text()
    for cat in categories:
        assert f"## Task: {cat} — model smollm2-135m" in text
    metrics = {r["metric"] for r in rows}
    assert all(f"Metric: {m}." in text for m in metrics)


@pytest.fixture(scope="module")
def gemma():
    return kb.load_model("gemma3-270m")


def test_gemma_runs_ruler_with_a_completion_prompt(gemma, tmp_path):
    model, tok = gemma
    assert not tok.chat_template  # a base model: the session writes "Question: ...\nAnswer:"
    tasks = make_ruler(tok, "niah_multikey_2", n=1, length=320, seed=0, tokenizer_name="gemma3-270m")
    cfg = EvalConfig(["snapkv"], ["2x"], block_size=64, max_new_tokens=4, mode="multi-turn", model="gemma3-270m")
    summary = run_eval(model, tok, tasks, cfg, tmp_path, progress=False)
    assert summary["prompt"].startswith("plain completion") and summary["sources"][0]["tokenizer"] == "gemma3-270m"
    assert {r["policy"] for r in summary["rows"]} == {"full", "snapkv"}
    md, page = write_report(tmp_path, env={"model": "gemma3-270m", "prompt": summary["prompt"]})
    text = md.read_text()
    assert "# kvbudget report — model gemma3-270m" in text and "## All tasks — model gemma3-270m" in text
    assert "gemma3-270m" in page.read_text()
