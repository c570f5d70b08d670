"""Engine request deadlines and hang detection against a scripted HTTP server: the deadline is
sized from rows x n x max_new_tokens; a slow engine (answers /health) fails its request at the
deadline, not before; a hung one (no /health answer) is named within seconds, long before the
deadline."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rollout_sglang.sglang.client import EngineError, SGLangClient
from rollout_sglang.engines.watchdog import EngineHung, WatchPolicy, call_watched, tokens_requested

pytestmark = pytest.mark.faults


def test_deadline_is_sized_from_rows_n_and_max_new_tokens():
    assert tokens_requested(3, {"max_new_tokens": 100, "n": 4}) == 1200
    assert tokens_requested(2, [{"max_new_tokens": 10}, {"max_new_tokens": 30, "n": 2}]) == 70
    assert tokens_requested(1, {}) == 128  # SGLang's default max_new_tokens
    assert WatchPolicy(0.01, 60.0).deadline_s(1200) == pytest.approx(72.0)


class _Scripted(BaseHTTPRequestHandler):
    health_hangs = threading.Event()

    def do_GET(self):  # /health
        if self.health_hangs.is_set():
            time.sleep(30)
        self._reply()

    def do_POST(self):  # /generate: never answers in time
        self.rfile.read(int(self.headers["content-length"]))
        time.sleep(30)

    def _reply(self):
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Scripted.health_hangs.clear()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def _generate(url: str, policy: WatchPolicy, deadline_s: float):
    client = SGLangClient(url, timeout_s=60)
    return call_watched(client, lambda: client.generate([[1, 2]], {"max_new_tokens": 4}), policy, deadline_s,
                        "a /generate")


def test_slow_engine_fails_its_request_at_the_deadline_not_before(server):
    policy = WatchPolicy(0.0, 3.0, probe_interval_s=0.5, probe_timeout_s=1.0, probe_failures=2)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="within its deadline of 3 s .* answers /health, so it is slow") as err:
        _generate(server, policy, 3.0)
    assert not isinstance(err.value, EngineHung)
    assert 3.0 <= time.monotonic() - t0 < 6.0


def test_hung_engine_is_named_within_seconds_long_before_the_deadline(server):
    _Scripted.health_hangs.set()
    policy = WatchPolicy(0.0, 300.0, probe_interval_s=0.5, probe_timeout_s=1.0, probe_failures=2)
    t0 = time.monotonic()
    with pytest.raises(EngineHung, match=rf"engine {server} is hung: no answer to /health for") as err:
        _generate(server, policy, 300.0)
    assert time.monotonic() - t0 < 6.0
    assert err.value.url == server and 1.5 <= err.value.stuck_s < 6.0
