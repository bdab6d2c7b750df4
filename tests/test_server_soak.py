"""A short soak of `kvbudget serve` (its own process, loopback, a tiny random-weight model):
clients with two API keys send for SOAK_SECONDS (20 by default) a random mix of turns, streamed
turns, streams closed after their first token, invalid requests, other keys' sessions, reads,
new sessions and deletions, on a memory bound that holds a few sessions. Afterwards: no 5xx,
every refused request refused as expected, the memory bound held, the resident size flat after
the warm-up, every session's history exactly its answered turns, no temp file, every file
loads. benchmarks/soak_server.py runs the long version."""

import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import httpx
from server_kit import Process, Sampler, check_soak, parse_metrics, save_tiny_model, soak, soak_report

import kvbudget as kb
from kvbudget.runtime.models import load_model, load_tokenizer

SECONDS = float(os.environ.get("SOAK_SECONDS", "20"))
KEYS = ["soak-key-one-" + "1" * 20, "soak-key-two-" + "2" * 20]
MEMORY = 150_000  # KV bytes: a few of the tiny model's sessions


def test_soak(tmp_path):
    model_dir = save_tiny_model(load_tokenizer(), tmp_path / "model")
    keys = tmp_path / "keys"
    keys.write_text("# soak keys\n" + "\n".join(KEYS) + "\n")
    store = tmp_path / "store"
    server = Process(["--model", str(model_dir), "--store", str(store), "--api-key-file", str(keys),
                      "--policy", "snapkv", "--budget", "64", "--block-size", "64", "--memory", str(MEMORY),
                      "--max-tokens", "16", "--max-sessions-per-key", "6"])
    try:
        server.wait_ready()
        headers = {"Authorization": f"Bearer {KEYS[0]}"}
        sampler = Sampler(server.url, headers)
        log = soak(server.url, KEYS, SECONDS, clients=4, sessions_per_client=3, max_tokens=8)
        samples = sampler.stop()

        metrics = parse_metrics(httpx.get(server.url + "/metrics", headers=headers, timeout=60).text)
        report = soak_report(log, samples, metrics, SECONDS, warmup=SECONDS / 3)
        print("\nsoak:", report)
        assert not log.unexpected, log.unexpected[:10]
        assert report["server_5xx"] == 0 and report["internal_errors"] == 0
        assert report["requests"] >= 50 and report["turns_answered"] >= 10 and log.cut >= 1, report
        assert {"200", "400", "401", "404", "413"} <= set(log.statuses), log.statuses
        assert 0 < report["kv_bytes_peak"] <= MEMORY, "the memory bound held"
        assert report["evictions"] > 0 and report["loads"] > 0, "sessions went to disk and came back"
        growth = report["rss_max_after_warmup"] - report["rss_after_warmup"]
        assert growth <= 0.10 * report["rss_after_warmup"], f"RSS grew {growth / 2**20:.1f} MiB after the warm-up"
        assert check_soak(server.url, log) == []
    finally:
        server.stop()
    assert server.proc.returncode in (0, -15), "SIGTERM stops the server cleanly (uvicorn exits by the signal after shutdown)"
    assert not list(store.rglob("*.tmp"))
    model, tok = load_model(str(model_dir))
    files = sorted(store.rglob("*.kvb"))
    assert len(files) == len(log.sessions)
    for path in files:
        kb.Session.load(path, model, tok)
