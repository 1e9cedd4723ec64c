"""propulsion_ds.model: Hub ids through a local Hub cache (offline), rank-0-first download with a
barrier, and model.attn_implementation. No test reaches a hub: the "online" cases point
HF_ENDPOINT at a closed local port."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from helpers import ROOT
from propulsion_ds.config import ConfigError
from propulsion_ds.model import (download_ignore_patterns, load_base_model, resolve_model_path)

STORIES = ROOT / "assets" / "stories260K"
REPO = "test-org/stories260K"


def fake_hub_cache(root, repo=REPO, src=STORIES, revision="0123456789abcdef0123456789abcdef01234567"):
    """A Hub cache laid out as huggingface_hub writes it: blobs/<sha256>, snapshot symlinks, refs/main."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / revision
    (repo_dir / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return fake_hub_cache(tmp_path / "hub")


def model_cfg(name, attn="sdpa", dtype="fp32"):
    return SimpleNamespace(name_or_path=str(name), dtype=dtype, trust_remote_code=False,
                           gradient_checkpointing=False, attn_implementation=attn)


def logits(model):
    ids = torch.tensor([[1, 50, 300, 7, 99, 2]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_directory_passes_through_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    calls = []
    assert resolve_model_path(str(STORIES), barrier=lambda: calls.append(1)) == str(STORIES)
    assert calls == []  # a local directory needs no coordination between ranks


def test_hub_id_resolves_through_local_cache_and_loads(offline_cache):
    for rank in (0, 1):
        calls = []
        assert resolve_model_path(REPO, rank=rank, barrier=lambda: calls.append(1)) == str(offline_cache)
        assert calls == [1]     # every rank reaches the barrier exactly once
    by_id, _ = load_base_model(model_cfg(REPO), {})
    by_dir, _ = load_base_model(model_cfg(STORIES), {})
    assert torch.equal(logits(by_id), logits(by_dir))


def test_hub_id_missing_offline_is_one_line_error_naming_field(offline_cache):
    for field in ("model.name_or_path", "tokenizer.name_or_path"):
        with pytest.raises(ConfigError) as e:
            resolve_model_path("test-org/not-there", field=field)
        msg = str(e.value)
        assert msg.startswith(field + ":") and "\n" not in msg and "HF_HUB_OFFLINE" in msg


def test_not_a_directory_nor_hub_id(tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.name_or_path: directory not found"):
        resolve_model_path(str(tmp_path / "nope" / "deeper"))


@pytest.mark.parametrize("value", ["./smollm2", "../smollm2", "/nonexistent/smollm2", "~/nonexistent-smollm2",
                                   "models/llama/13b", "assets/smollm2"])
def test_local_looking_path_is_a_missing_directory_without_hub_or_barrier(value, monkeypatch):
    """Online (not offline) but never asked: the one-line error says the directory is missing, and
    no rank waits at the barrier (it is a local answer every rank gives alike)."""
    monkeypatch.chdir(ROOT)                     # assets/ exists here: assets/smollm2 looks local
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")     # closed: a lookup would say "cannot download"
    calls = []
    with pytest.raises(ConfigError) as e:
        resolve_model_path(value, barrier=lambda: calls.append(1))
    msg = str(e.value)
    assert msg.startswith(f"model.name_or_path: directory not found: {value!r}") and "\n" not in msg, msg
    assert calls == []


def test_hub_id_that_is_no_directory_is_sent_to_the_hub_only_then(tmp_path, monkeypatch):
    """``org/name`` with no ``org/`` here is a Hub id; an unreachable Hub fails at once, in one line
    saying it is not a local directory either, without the Hub client's retries."""
    script = textwrap.dedent("""
        from propulsion_ds.model import resolve_model_path
        try:
            resolve_model_path("no-such-org/smollm2")
        except Exception as e:
            print(type(e).__name__ + ": " + str(e))
    """)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path), PYTHONPATH=str(ROOT), HF_ENDPOINT="http://127.0.0.1:9")
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(key, None)
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.startswith("ConfigError: model.name_or_path: 'no-such-org/smollm2' is not a local "
                               "directory, and cannot download it from the Hugging Face Hub"), r.stdout + r.stderr
    assert "Retrying" not in r.stderr, r.stderr[-2000:]


def test_resolver_never_sets_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    fake_hub_cache(tmp_path)
    resolve_model_path(REPO)
    assert "HF_HUB_OFFLINE" not in os.environ


def test_online_failure_reaches_every_rank_without_a_hang(tmp_path):
    """Online, not cached, the "hub" a local server that knows no repo: rank 0's download fails,
    it still enters the barrier, and both ranks raise the field's one-line error (threads stand in
    for ranks; a hang fails the 60 s barrier timeout)."""
    script = textwrap.dedent("""
        import http.server, os, threading
        class NotFound(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(404); self.send_header("Content-Type", "application/json")
                self.send_header("X-Error-Code", "RepoNotFound"); self.end_headers()
                self.wfile.write(b'{"error": "Repository not found"}')
            do_HEAD = do_GET
            def log_message(self, *a): pass
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{srv.server_port}"
        from propulsion_ds.model import resolve_model_path
        bar = threading.Barrier(2, timeout=60)
        out = {}
        def rank(r):
            try:
                resolve_model_path("test-org/not-there", rank=r, barrier=bar.wait)
                out[r] = "returned"
            except Exception as e:
                out[r] = type(e).__name__ + ": " + str(e)
        ts = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
        [t.start() for t in ts]; [t.join() for t in ts]
        for r in (0, 1): print(out[r])
    """)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path), PYTHONPATH=str(ROOT))
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        env.pop(key, None)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 2, r.stderr[-2000:]
    for line in lines:
        assert line.startswith("ConfigError: model.name_or_path: 'test-org/not-there' is not a local "
                               "directory, and cannot download it"), line
        assert "RepositoryNotFoundError" in line


def test_download_skips_duplicate_weights():
    with_st = download_ignore_patterns(["config.json", "model.safetensors", "pytorch_model.bin",
                                        "original/consolidated.00.pth"])
    assert "*.bin" in with_st and "*.pth" in with_st and "original/*" in with_st
    # A repo with only torch weights must still download them.
    assert "*.bin" not in download_ignore_patterns(["config.json", "pytorch_model.bin"])


def test_attn_implementation_reaches_the_model():
    eager, _ = load_base_model(model_cfg(STORIES, attn="eager"), {})
    sdpa, _ = load_base_model(model_cfg(STORIES, attn="sdpa"), {})
    assert eager.config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits(eager), logits(sdpa), rtol=1e-4, atol=1e-4)


def test_flash_attention_2_unavailable_is_one_line_error_naming_field():
    # Here (CPU, no flash_attn) flash_attention_2 cannot run; the error names the field.
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: flash_attention_2 may be usable")
    for dtype in ("bf16", "fp32"):
        with pytest.raises(ConfigError) as e:
            load_base_model(model_cfg(STORIES, attn="flash_attention_2", dtype=dtype), {})
        assert str(e.value).startswith("model.attn_implementation: flash_attention_2 needs")
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_hub_download_waits_on_the_patient_barrier(tmp_path):
    """The trainer on 2 ranks with a 3 s collective timeout and a Hub that takes 6 s to answer
    (then: no such repo). Rank 1 waits for rank 0's download on the patient barrier, not the
    3 s one: both ranks end with the download's own one-line error (exit 2), not a lost peer."""
    import http.server
    import threading
    import time

    from helpers import run_train

    class SlowNotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(6)
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
            self.wfile.write(b'{"error": "Repository not found"}')
        do_HEAD = do_GET

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowNotFound)
    srv.handle_error = lambda *a: None        # a client that gave up first: nothing to report
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        r = run_train(["--config", "configs/tiny.json", "--set", "model.name_or_path=test-org/slow-hub",
                       "--set", "distributed.timeout_minutes=0.05", "--set", f"output_dir={tmp_path / 'out'}"],
                      nproc=2, timeout=300,
                      env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{srv.server_port}",
                           "HF_HUB_CACHE": str(tmp_path / "hub")})
    finally:
        srv.shutdown()
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert r.returncode != 0 and "lost contact" not in r.stderr, r.stderr[-3000:]
    assert any("model.name_or_path: 'test-org/slow-hub' is not a local directory, and cannot download it" in e
               for e in errors), r.stderr[-3000:]
