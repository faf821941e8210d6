"""bloom.hub's errors: an unreachable hub fails fast with one line naming the way out, and a local-looking
name that is not a directory is a missing directory, never a hub lookup. No real network: the hub
endpoint points at a closed local port (refused) or at a local socket that never answers (timeout)."""

import http.server
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

import bloom.hub
from bloom import BloomConfig, BloomForCausalLM, BloomTokenizerFast
from bloom.cli import main
from bloom.hub import ModelNotFoundError

CFG = dict(vocab_size=101, hidden_size=32, n_layer=2, n_head=4)
LOADERS = {
    "config": BloomConfig.from_pretrained,
    "model": BloomForCausalLM.from_pretrained,
    "tokenizer": BloomTokenizerFast.from_pretrained,
}
# The whole failure, imports excluded, must take about 2 s (the check waits PROBE_TIMEOUT_S at most).
FAST_S = 3.0


def within(seconds, fn, *args, **kwargs):
    """(exception raised or None, elapsed s) of fn(*args, **kwargs); fails the test if it runs past
    `seconds` (then it is left running on a daemon thread rather than hanging the suite)."""
    outcome = {}

    def run():
        start = time.monotonic()
        try:
            fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            outcome["error"] = err
        outcome["elapsed"] = time.monotonic() - start

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        pytest.fail(f"still running after {seconds} s (hub retries?)")
    return outcome.get("error"), outcome["elapsed"]


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """An empty hub cache, online mode, the default etag timeout, and no remembered reachability.

    huggingface_hub reads HF_* variables at import: the env is set for completeness, its constants patched.
    """
    from huggingface_hub import constants

    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_ETAG_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", constants.DEFAULT_ETAG_TIMEOUT)
    monkeypatch.setattr(bloom.hub, "_reachability", {}, raising=False)
    # As in a fresh process: huggingface_hub 2.x fetches an agent registry from the hub (3 s timeout) on its
    # first User-Agent, unless cached in HF_HOME within the last day.
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"), raising=False)
    try:
        from huggingface_hub.utils import _detect_agent
    except ImportError:
        pass
    else:
        monkeypatch.setattr(_detect_agent, "_registry", None, raising=False)
    monkeypatch.chdir(tmp_path)  # no ./org: 'org/name' is a hub id
    return cache


def point_hub_at(monkeypatch, endpoint):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def refused(hf_env, monkeypatch):
    """The hub at a closed local port: connections are refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    point_hub_at(monkeypatch, f"http://127.0.0.1:{port}")
    return "refused"


@pytest.fixture
def silent(hf_env, monkeypatch):
    """The hub at a local socket that accepts connections (the kernel's backlog) but never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    point_hub_at(monkeypatch, f"http://127.0.0.1:{sock.getsockname()[1]}")
    yield "no answer"
    sock.close()


@pytest.fixture(params=["refused", "silent"])
def unreachable(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def hub_warnings():
    """WARNING+ records huggingface_hub logs (its retries log one each)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("huggingface_hub")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


# --------------------------------------------------------------------------------------------------
# An unreachable hub
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loader", LOADERS)
def test_unreachable_hub_fails_fast_with_one_line(unreachable, loader, capfd, hub_warnings):
    err, elapsed = within(15, LOADERS[loader], "org/name")
    assert elapsed < FAST_S
    message = str(err)
    assert "\n" not in message
    assert message.startswith("cannot reach the Hugging Face hub to fetch ")
    for part in ("'org/name'", unreachable, "pass a local directory", "HF_HUB_OFFLINE=1"):
        assert part in message
    assert isinstance(err, bloom.hub.HubUnreachableError) and isinstance(err, ModelNotFoundError), repr(err)
    # No retry noise: nothing on stderr, no warning logged.
    assert capfd.readouterr().err == "" and hub_warnings == []


def test_cli_prints_one_error_line(refused, capfd):
    status = None

    def run():
        nonlocal status
        status = main(["generate", "org/name", "hi"])

    err, elapsed = within(15, run)
    assert err is None and status == 1
    assert elapsed < FAST_S
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bloom: error: cannot reach the Hugging Face hub")
    assert "'org/name'" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def write_cached_repo(cache, repo_id, files):
    """A hub cache entry for repo_id at 'main' holding `files` (a function writing into a directory)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    files(snapshot)
    return snapshot


def test_cached_files_are_used_when_the_hub_is_unreachable(unreachable, hf_env, capfd, hub_warnings):
    # Only tokenizer.json and config.json are cached: the optional tokenizer files count as absent, as
    # they do offline.
    from helpers import train_bloom_like_tokenizer

    def files(directory):
        BloomConfig(**CFG).save_pretrained(directory)
        train_bloom_like_tokenizer().save(str(directory / "tokenizer.json"))

    write_cached_repo(hf_env, "org/name", files)
    err, elapsed = within(15, lambda: (BloomConfig.from_pretrained("org/name"),
                                       BloomTokenizerFast.from_pretrained("org/name")))
    assert err is None, repr(err)
    assert elapsed < FAST_S
    assert BloomConfig.from_pretrained("org/name").vocab_size == CFG["vocab_size"]
    assert capfd.readouterr().err == "" and hub_warnings == []


def test_offline_mode_uses_the_cache_and_never_asks_the_hub(hf_env, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    def no_network(*args, **kwargs):
        raise AssertionError("offline: the hub must not be asked")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_network)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    write_cached_repo(hf_env, "org/name", lambda d: BloomConfig(**CFG).save_pretrained(d))
    assert BloomConfig.from_pretrained("org/name").vocab_size == CFG["vocab_size"]
    with pytest.raises(ModelNotFoundError, match="not in the local cache"):
        BloomForCausalLM.from_pretrained("org/other")


def test_an_endpoint_that_is_not_a_hub_is_named_not_called_offline(hf_env, monkeypatch):
    # HF_ENDPOINT answers, but 404 without the hub's headers: the error gives that answer instead of
    # calling the hub unreachable or the session offline.
    class NotAHub(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotAHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        point_hub_at(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
        err, elapsed = within(15, BloomConfig.from_pretrained, "org/name")
    finally:
        server.shutdown()
        server.server_close()
    message = str(err)
    assert isinstance(err, ModelNotFoundError) and elapsed < FAST_S
    assert "config.json of 'org/name'" in message and "404" in message and "\n" not in message
    assert "offline" not in message and "cannot reach" not in message


def test_a_user_set_etag_timeout_bounds_the_check(hf_env, monkeypatch):
    from huggingface_hub import constants

    assert bloom.hub._probe_timeout() == bloom.hub.PROBE_TIMEOUT_S <= 2
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "7")
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 7)
    assert bloom.hub._probe_timeout() == 7


# --------------------------------------------------------------------------------------------------
# Local-looking names
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def no_hub(hf_env, tmp_path, monkeypatch):
    """Any hub access fails the test; HOME is tmp_path/home and ./existingdir exists."""
    import huggingface_hub
    import huggingface_hub.file_download

    def no_hub_access(*args, **kwargs):
        pytest.fail(f"the hub was asked: {args} {kwargs}")

    for module, name in ((huggingface_hub, "hf_hub_download"), (huggingface_hub.file_download, "hf_hub_download"),
                         (huggingface_hub, "get_hf_file_metadata")):
        monkeypatch.setattr(module, name, no_hub_access)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "existingdir").mkdir()
    return tmp_path


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("name, shown", [
    ("./x", "./x"),
    ("/nonexistent/x", "/nonexistent/x"),
    ("~/nonexistent_xyz", "home/nonexistent_xyz"),  # ~ expanded
    ("existingdir/sub", "existingdir/sub"),  # ./existingdir exists: a path, not the hub id 'existingdir/sub'
    (Path("org/name"), "org/name"),  # a path object is a path
])
def test_local_looking_names_are_missing_directories(no_hub, loader, name, shown):
    with pytest.raises(ModelNotFoundError) as raised:
        LOADERS[loader](name)
    message = str(raised.value)
    assert message.startswith(f"no such directory: {name}") and shown in message and "\n" not in message
    assert ("./existingdir exists" in message) == (name == "existingdir/sub")
    assert isinstance(raised.value, bloom.hub.LocalDirectoryNotFoundError)


def test_tilde_is_expanded_for_an_existing_directory(no_hub):
    BloomConfig(**CFG).save_pretrained(no_hub / "home" / "tiny")
    assert BloomConfig.from_pretrained("~/tiny").vocab_size == CFG["vocab_size"]


def test_cli_names_the_missing_directory(no_hub, capsys):
    assert main(["generate", "existingdir/sub", "hi"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bloom: error: no such directory: existingdir/sub")
