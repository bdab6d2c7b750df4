"""Session files: an exact round trip (same cache, same next answer), and clear errors for
another model's file, a truncated or corrupt file; a failed or killed save leaves the old file."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import _tiny_llama, half_then_fail

import kvbudget as kb
from kvbudget.kv.ragged import RaggedEntries
from kvbudget.runtime import sessionfile
from kvbudget.errors import KVBudgetError, SessionFileError

SRC = str(Path(__file__).resolve().parents[1] / "src")
STORY = "Alice has a cat named Pepper. Bob's favourite city is Lisbon. Carol plays the oboe. " * 3


class CharTok:
    """A stand-in tokenizer for the tiny random models: one token per character, no template."""

    chat_template = None
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = ([1] if add_special_tokens else []) + [3 + ord(c) % 93 for c in text]
        return SimpleNamespace(input_ids=torch.tensor([ids]))

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(32 + (i - 3)) for i in ids if i >= 3)


def _untimed(value):
    """Metadata without measured durations (turns taken after a load time themselves anew)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if "seconds" not in k}
    return [_untimed(v) for v in value] if isinstance(value, list) else value


def _same_payload(a: kb.Session, b: kb.Session) -> None:
    """Two sessions hold the same cache, tensor for tensor, and the same conversation."""
    ta, ma = a.payload()
    tb, mb = b.payload()
    assert _untimed(ma) == _untimed(mb)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


def _round_trip(model, tok, policy, context, questions, path, max_new_tokens=12, block_size=32):
    session = kb.Session(model, tok, policy, block_size=block_size)
    session.add_context(context)
    session.ask(questions[0], max_new_tokens)
    session.save(path)
    loaded = kb.Session.load(path, model, tok)
    _same_payload(session, loaded)
    for q in questions[1:]:
        assert loaded.ask(q, max_new_tokens) == session.ask(q, max_new_tokens)
    _same_payload(session, loaded)
    return session


def test_real_model_round_trip_gives_the_same_answers(default_model, tmp_path):
    model, tok = default_model
    session = _round_trip(
        model, tok, kb.policy("snapkv", budget=64), STORY,
        ["What is the name of Alice's cat?", "Which city does Bob like?"], tmp_path / "conv.kvb",
    )
    assert session.cache.get_seq_length() > 64 and session.tokens_seen == len(session.input_ids)
    meta = sessionfile.read_metadata(tmp_path / "conv.kvb")
    assert meta["policy"]["name"] == "snapkv" and meta["policy"]["budget"] == "64"
    assert meta["messages"][1]["content"] == "What is the name of Alice's cat?"


def test_episodic_session_round_trip(default_model, tmp_path):
    """EpiCache: every episode's cache, centroid, patched prompt and routing history come back;
    the next question is routed to the same episode and answered the same."""
    model, tok = default_model
    chat = []
    for line in ["My dog Biscuit chewed the sofa.", "The vet said the puppy needs shots.",
                 "We booked flights to Lisbon for June.", "The hotel near the beach had a pool.",
                 "My manager moved the meeting to Friday.", "The quarterly report is due soon."]:
        chat += [{"role": "user", "content": line}, {"role": "assistant", "content": "I see."}]
    session = kb.Session(model, tok, kb.policy("epicache", budget=48, episodes=2, medoids=1,
                                               conv_window=2), block_size=64)
    session.add_context(chat)
    session.ask("What is my dog called?", 6)
    session.save(tmp_path / "e.kvb")
    loaded = kb.Session.load(tmp_path / "e.kvb", model, tok)
    assert type(loaded) is type(session) and len(loaded.episodes) == 2
    assert loaded.routed == session.routed and loaded.cache is loaded.episodes[session.routed[-1]].cache
    _same_payload(session, loaded)
    q = "When is the quarterly report due?"
    assert loaded.ask(q, 6) == session.ask(q, 6) and loaded.routed == session.routed
    _same_payload(session, loaded)
    assert sessionfile.read_metadata(tmp_path / "e.kvb")["kv_bytes"] > session.kv_bytes  # every episode counted


@pytest.mark.parametrize(
    "name, kwargs, check",
    [
        ("adakv", {"budget": 48}, lambda layer: isinstance(layer.entries, RaggedEntries)),  # ragged per-head storage
        ("kivi4", {"residual": 16}, lambda layer: layer.entries.body is not None and layer.entries.body.chunk_id is not None),
        ("h2o", {"budget": 40, "recent": 0.25}, lambda layer: "h2o" in layer.entries.state),
    ],
)
def test_tiny_model_round_trip(tiny_llama, tmp_path, name, kwargs, check):
    tok = CharTok()
    policy = kb.policy(name, **kwargs)
    session = _round_trip(tiny_llama, tok, policy, STORY, ["Who has a cat?", "And Bob?", "Oboe?"], tmp_path / "t.kvb")
    assert all(check(layer) for layer in session.cache.layers), "the layout under test was not used"


def test_ratio_budget_keeps_its_bytes_across_a_round_trip(tiny_llama, tmp_path):
    """A ratio budget's bytes (resolved against the first context) come back with the session,
    so its compressions keep fitting them (`compress.bytefit`), as the saved session's did."""
    policy = kb.policy("snapkv+kivi4", budget="4x", residual=16)
    session = _round_trip(tiny_llama, CharTok(), policy, STORY, ["Who has a cat?", "And Bob?"], tmp_path / "r.kvb")
    loaded = kb.Session.load(tmp_path / "r.kvb", tiny_llama, CharTok())
    assert session.target_bytes is not None and loaded.target_bytes == loaded.cache.target_bytes == session.target_bytes


def test_sliding_window_layers_round_trip(tiny_gemma, tmp_path):
    _round_trip(tiny_gemma, CharTok(), kb.policy("snapkv", budget=24), STORY[:120],
                ["Who?", "Where?"], tmp_path / "g.kvb", block_size=16)


def _saved(tiny_llama, path) -> kb.Session:
    session = kb.Session(tiny_llama, CharTok(), kb.policy("snapkv", budget=32), block_size=32)
    session.add_context(STORY)
    session.save(path)
    return session


def test_files_of_the_previous_version_load_and_unknown_versions_are_refused(tiny_llama, tmp_path, monkeypatch):
    """A version-1 file (its checksum one SHA-256 over the tensor bytes in sequence) loads and
    answers as the session saved; a flipped byte in it is caught by that checksum; a version this
    kvbudget does not read is a clear error."""
    monkeypatch.setattr(sessionfile, "VERSION", 1)
    old = _saved(tiny_llama, tmp_path / "v1.kvb")
    monkeypatch.setattr(sessionfile, "VERSION", 3)
    _saved(tiny_llama, tmp_path / "v3.kvb")
    monkeypatch.undo()
    assert sessionfile.read_metadata(tmp_path / "v1.kvb")["version"] == 1
    loaded = kb.Session.load(tmp_path / "v1.kvb", tiny_llama, CharTok())
    assert loaded.ask("Who walked?", max_new_tokens=6) == old.ask("Who walked?", max_new_tokens=6)
    data = (tmp_path / "v1.kvb").read_bytes()
    (tmp_path / "v1.kvb").write_bytes(data[:-50] + bytes([data[-50] ^ 0xFF]) + data[-49:])
    with pytest.raises(SessionFileError, match="checksum"):
        kb.Session.load(tmp_path / "v1.kvb", tiny_llama, CharTok())
    with pytest.raises(SessionFileError, match=r"version 3 \(this kvbudget reads 1, 2\)"):
        kb.Session.load(tmp_path / "v3.kvb", tiny_llama, CharTok())


def test_file_from_another_model_is_refused(tiny_llama, tmp_path):
    path = tmp_path / "a.kvb"
    _saved(tiny_llama, path)
    other = _tiny_llama()  # same config and seed: only the weights changed below differ
    with torch.no_grad():
        other.get_input_embeddings().weight.add_(1.0)
    with pytest.raises(SessionFileError, match="saved with model"):
        kb.Session.load(path, other, CharTok())
    bigger = _tiny_llama(layers=4)
    with pytest.raises(SessionFileError, match="saved with model"):
        kb.Session.load(path, bigger, CharTok())


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty", "header"])
def test_damaged_files_are_clear_errors(tiny_llama, tmp_path, damage):
    path = tmp_path / "d.kvb"
    _saved(tiny_llama, path)
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "flip":  # a byte inside the tensor data: only the checksum can notice
        data = data[:-50] + bytes([data[-50] ^ 0xFF]) + data[-49:]
    elif damage == "garbage":
        data = b"this is not a session file at all" * 10
    elif damage == "empty":
        data = b""
    elif damage == "header":
        data = data[:20] + b"#" + data[21:]
    path.write_bytes(data)
    with pytest.raises(SessionFileError, match=str(path.name)):
        kb.Session.load(path, tiny_llama, CharTok())


def test_session_files_are_safetensors_both_ways(tiny_llama, tmp_path):
    """A session file is a safetensors file: safetensors reads what kvbudget writes, and kvbudget
    reads a session file that safetensors wrote (same tensors, same metadata); a tensor table
    naming an unknown type is a clear error."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "s.kvb"
    session = _saved(tiny_llama, path)
    ours, meta = sessionfile.read_session_file(path)
    theirs = load_file(path)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    with safe_open(path, "pt") as f:
        assert sessionfile.json.loads(f.metadata()[sessionfile.META_KEY]) == meta
    written = tmp_path / "by-safetensors.kvb"
    save_file(theirs, written, metadata={sessionfile.META_KEY: sessionfile.json.dumps(meta)})
    loaded = kb.Session.load(written, tiny_llama, CharTok())
    assert loaded.ask("Who has a cat?", 6) == session.ask("Who has a cat?", 6)
    data = path.read_bytes().replace(b'"dtype":"BF16"', b'"dtype":"BX16"').replace(b'"dtype":"F32"', b'"dtype":"FX2"')
    path.write_bytes(data)
    with pytest.raises(SessionFileError, match="corrupt session file"):
        sessionfile.read_session_file(path)


def test_failed_save_leaves_the_previous_file(tiny_llama, tmp_path, monkeypatch):
    path = tmp_path / "s.kvb"
    old = _saved(tiny_llama, path)
    before = path.read_bytes()
    old.ask("Who has a cat?", 4)
    real = sessionfile.atomic_open
    monkeypatch.setattr(sessionfile, "atomic_open", half_then_fail(real))
    with pytest.raises(OSError, match="No space"):
        old.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.kvb"], "the temp file must be removed"
    kb.Session.load(path, tiny_llama, CharTok())


_SAVE_LOOP = """
import sys, kvbudget as kb
model, tok = kb.load_model()
out = sys.argv[1]
sessions = []
for n in (1, 2):
    s = kb.Session(model, tok, kb.policy("full"), block_size=128)
    s.add_context("The quick brown fox jumps over the lazy dog. " * (30 * n))
    s.save(f"{out}/ref{n}.kvb")
    sessions.append(s)
print("ready", flush=True)
i = 0
while True:
    sessions[i % 2].save(f"{out}/target.kvb")
    i += 1
    print("saved", i, flush=True)
"""


def test_killed_during_save_leaves_a_readable_file(default_model, tmp_path):
    """A process killed (SIGKILL) while it keeps saving over one file leaves that file whole:
    one of the two versions it was writing, never a mix."""
    model, tok = default_model
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while len(lines) < 3:  # ready + two saves: the target exists, a third save is under way
            line = proc.stdout.readline()
            assert line, "the save loop died"
            lines.append(line)
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    loaded = kb.Session.load(tmp_path / "target.kvb", model, tok)
    refs = [sessionfile.read_metadata(tmp_path / f"ref{n}.kvb")["checksum"] for n in (1, 2)]
    assert sessionfile.read_metadata(tmp_path / "target.kvb")["checksum"] in refs
    assert loaded.tokens_seen > 0


def test_unsupported_cases_are_clear_errors(tiny_llama, tmp_path):
    session = kb.Session(tiny_llama, CharTok(), kb.policy("minicache", residual=8), block_size=32)
    session.add_context(STORY)
    with pytest.raises(KVBudgetError, match="not supported yet"):
        session.save(tmp_path / "m.kvb")
    assert not (tmp_path / "m.kvb").exists()
    from kvbudget.methods.scorers.full import Full

    hand = kb.Session(tiny_llama, CharTok(), kb.Policy(Full(), None))
    hand.add_context("abc")
    with pytest.raises(KVBudgetError, match="kb.policy"):
        hand.save(tmp_path / "h.kvb")
    with pytest.raises(SessionFileError, match="no such session file"):
        kb.Session.load(tmp_path / "missing.kvb", tiny_llama, CharTok())
