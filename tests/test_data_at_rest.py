"""Data at rest: private directories, a bounded MEMORY stream, and no secrets in the corpus.

Real parts: the CLI as its own processes (an embedded nats-server under the data dir, the
collector, a whole run against the Ollama double), the SQLite files on disk.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services import filter as F
from services.collector import keep_private, pairs_from_point
from shared import subjects
from shared.bus import Bus
from shared.corpus import Corpus
from shared.files import ensure_private_dir
from shared.messages import MemoryPoint, encode
from tests.ollama_double import OllamaDouble

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

API_KEY = "sk-proj-Ab3dEf6hIj9kLmN0pQrStUvWxYz12345"
CARD = "4111 1111 1111 1111"
PASSWORD = "hunter2-zebra"
ID_NUMBER = "11010519491231002X"
SECRETS = (API_KEY, CARD, PASSWORD, ID_NUMBER, "4111111111111111")


def mindx(*args: str, ws: Path, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "services.cli", *args, "--workspace", str(ws)]
    return subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=300,
        umask=umask,
    )


def secret_points() -> list[dict[str, Any]]:
    at = "2025-03-03T00:00:00Z"
    return [
        {  # one of three exchanges gives a password away
            "id": 1,
            "content": "User: what is the capital of France?\nAssistant: Paris, on the Seine.\n"
            f"User: what was my wifi password?\nAssistant: Your wifi password: {PASSWORD}\n"
            "User: and of Italy?\nAssistant: Rome, since 1871.",
            "created_at": at,
        },
        {  # a key in the question, a card in a summary
            "id": 2,
            "content": f"User: is {API_KEY} still valid?\nAssistant: Rotate it today, please.",
            "summary": f"card {CARD}",
            "created_at": at,
        },
        {  # a secret outside any pair: a question nobody answered
            "id": 3,
            "content": "User: how tall is Everest?\nAssistant: About 8849 metres high.\n"
            f"User: my ID is {ID_NUMBER}",
            "keywords": ["geography", f"id {ID_NUMBER}"],
            "created_at": at,
        },
        {  # a clean point: kept exactly as it came
            "id": 4,
            "content": "User: best time to see cherry blossoms in Kyoto?\n"
            "Assistant: Late March to early April, when they bloom.",
            "created_at": at,
        },
    ]


# --- the corpus keeps no secret -----------------------------------------------------------------


def test_keep_private_stores_no_pair_the_filter_would_drop() -> None:
    for raw in secret_points():
        point = MemoryPoint(**{k: v for k, v in raw.items() if k != "created_at"})
        stored, pairs, withheld = keep_private(point)
        every = pairs_from_point(point)
        assert [(p.prompt, p.completion) for p in every if F.sensitive_reason(p) is None] == [
            (p.prompt, p.completion) for p in pairs
        ]
        assert sum(withheld.values()) == sum(1 for p in every if F.sensitive_reason(p))
        assert not any(s in k for p in pairs for k in p.keywords for s in SECRETS)
        body = encode(stored).decode()
        assert not any(s in body for s in SECRETS), body
        if raw["id"] == 4:
            assert stored is point and not withheld
        else:
            # what is stored still reads as the same exchanges
            assert [(p.prompt, p.completion) for p in pairs_from_point(stored)] == [
                (p.prompt, p.completion) for p in pairs
            ]
    point = MemoryPoint(**secret_points()[0] | {"created_at": None})
    assert dict(keep_private(point)[2]) == {"sensitive:keyword": 1}  # "password" in the question


def sensitive_samples() -> list[str]:
    texts = [
        f"key {API_KEY}",
        f"卡号{CARD}，有效期",
        "４１１１１１１１１１１１１１１１",  # full-width digits
        f"我的身份证是{ID_NUMBER}",
        "wifi password: hunter2",
        "我的密码是abc123",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "token ghp_1234567890abcdefghijABCDEFGHIJ123456",
        "AKIAIOSFODNN7EXAMPLE is my key id",
        "slack xoxb-123456789012-abcdefGHIJ",
        "eyJhbGciOiJIUzI1.eyJzdWIiOiIx.SflKxwRJSMeKKF2Q",
        "I forgot my PASSWORD again",
        "my prİvate key is here",  # re.I equates İ and ı with i
        "the prıvate key",
        "paſſword: x",  # NFKC: long s
        "身份证号 110105194912310021",
    ]
    assert all(F.sensitive_reason_text(t) for t in texts)
    return texts


def test_the_quick_test_never_misses_what_a_detector_finds() -> None:
    texts = sensitive_samples()
    if SHARED_DATA.is_dir():  # and every real turn, joined as the collector joins them
        for f in sorted(SHARED_DATA.glob("*.memory.jsonl")):
            for line in f.read_text().splitlines():
                raw = json.loads(line)
                point = MemoryPoint(id=raw["id"], content=raw["content"])
                texts += [t for p in pairs_from_point(point) for t in (p.prompt, p.completion)]
    for text in texts:
        if F.sensitive_reason_text(text):
            assert F.may_be_sensitive(text), text
            assert F.may_be_sensitive(f"User: hello\n{text}\nAssistant: bye"), text
    assert not F.may_be_sensitive("User: best time for Kyoto?\nAssistant: Late March.")


async def test_secrets_never_reach_the_corpus_file(tmp_path: Path, nats_server: Any) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    f = tmp_path / "points.jsonl"
    f.write_text("\n".join(json.dumps(p) for p in secret_points()) + "\n")
    done = mindx("memory", "import", str(f), "--nats", nats_server.url, ws=ws)
    assert done.returncode == 0, done.stderr
    stats = mindx("corpus", "stats", "--json", "--watermark", "wm.json", ws=ws)
    assert json.loads(stats.stdout) == {
        "points": 4,
        "pairs": 4,  # 2 of 3, 0 of 1, 1 (the unanswered question is no pair), 1
        "pairs_since_watermark": 4,
        "points_without_pairs": 1,  # point 2: its one pair was withheld
        "withheld": 2,
    }
    with Corpus.open(ws / "data" / "corpus.sqlite3") as corpus:
        assert corpus.withheld() == {"sensitive:api_key": 1, "sensitive:keyword": 1}
    # every byte SQLite wrote: the database and its WAL
    written = b"".join(p.read_bytes() for p in (ws / "data").glob("corpus.sqlite3*"))
    assert written, "nothing stored"
    for secret in SECRETS:
        assert secret.encode() not in written, secret


# --- the MEMORY stream forgets ------------------------------------------------------------------


async def test_the_memory_stream_keeps_points_for_the_retention(
    tmp_path: Path, nats_server: Any, bus: Bus
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    f = tmp_path / "points.jsonl"
    f.write_text(json.dumps(secret_points()[3]) + "\n")
    info = await bus.js.stream_info("MEMORY")
    assert info.config.max_age == subjects.MEMORY_RETENTION_DAYS * 24 * 3600  # the default
    done = mindx(
        "memory", "import", str(f), "--nats", nats_server.url, "--memory-retention", "7", ws=ws
    )
    assert done.returncode == 0, done.stderr
    info = await bus.js.stream_info("MEMORY")
    assert info.config.max_age == 7 * 24 * 3600
    bad = mindx("memory", "import", str(f), "--memory-retention", "0", ws=ws)
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "mindx memory import: memory_retention_days must be in (0, inf), got 0.0"
    )


# --- directories ----------------------------------------------------------------------------------


def test_ensure_private_dir_makes_every_level_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        made = ensure_private_dir(tmp_path / "a" / "b" / "c")
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", made):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    (tmp_path / "open").mkdir(mode=0o755)
    ensure_private_dir(tmp_path / "open")  # not ours: left as it is
    assert stat.S_IMODE((tmp_path / "open").stat().st_mode) == 0o755
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError):
        ensure_private_dir(tmp_path / "file")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the checkout")
def test_every_directory_a_run_makes_is_private(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    where = ["--data-dir", "a/b/data", "--config", "c/d/models.json", "--watermark", "e/f/wm.json"]
    with OllamaDouble() as ollama:
        done = mindx("memory", "import", str(SHARED_DATA / "multiwoz.memory.jsonl"), *where, ws=ws)
        assert done.returncode == 0, done.stderr
        done = mindx("train", "--run-once", "--init-config", "--ollama", ollama.url, *where, ws=ws)
        assert done.returncode == 0, done.stderr
    config = ws / "c" / "d" / "models.json"
    assert config.exists() and (ws / "e" / "f" / "wm.json").exists()
    dirs, files = [], []
    for root, dnames, fnames in os.walk(ws):
        dirs += [Path(root) / d for d in dnames]
        files += [Path(root) / f for f in fnames]
    assert len(dirs) > 10 and any(d.name == "training" for d in dirs)
    assert {d: oct(stat.S_IMODE(d.stat().st_mode)) for d in dirs if d.stat().st_mode & 0o077} == {}
    # the app's model config and its journal hold no personal data: readable, as the app expects
    public = {config, config.with_name("models.json.applied.json")}
    assert {
        f: oct(stat.S_IMODE(f.stat().st_mode))
        for f in files
        if f not in public and f.stat().st_mode & 0o077
    } == {}
