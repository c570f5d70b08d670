"""Engine request deadlines and hang detection against scripted HTTP servers: the deadline is
sized from rows x n x max_new_tokens; a slow engine (answers /health) fails its request at the
deadline, not before; a hung one (no /health answer) is named within seconds, long before the
deadline; an engine that answers 503 (SGLang warming up) is not hung; 256 requests in flight on
2 engines share one prober per engine (at most one probe per engine per probe interval)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rollout_sglang.sglang.client import EngineError, SGLangClient
from rollout_sglang.engines.watchdog import EngineHung, Probers, WatchPolicy, call_watched, tokens_requested

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


class _Counting(BaseHTTPRequestHandler):
    """/health answers `health_status` and is counted per server; /generate answers after
    `generate_s`."""
    health_status = 200
    generate_s = 0.0

    def do_GET(self):
        self.server.health_calls += 1
        self._reply(self.health_status)

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        time.sleep(self.generate_s)
        self._reply(200)

    def _reply(self, status):
        self.send_response(status)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # 256 requests connect at once


@pytest.fixture
def counting():
    servers = []

    def start(health_status=200, generate_s=0.0):
        handler = type("Handler", (_Counting,), {"health_status": health_status, "generate_s": generate_s})
        srv = _Server(("127.0.0.1", 0), handler)
        srv.health_calls = 0
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()


def test_a_warming_engine_answering_503_is_slow_not_hung(counting):
    """SGLang answers /health with 503 until its warmup request finished: an answer, so the
    engine is not killed; its request completes."""
    srv, url = counting(health_status=503, generate_s=2.0)
    policy = WatchPolicy(0.0, 30.0, probe_interval_s=0.2, probe_timeout_s=1.0, probe_failures=2)
    client = SGLangClient(url, timeout_s=30)
    assert call_watched(client, lambda: client._request("POST", "/generate", {}), policy, 30.0,
                        "a /generate") == {}
    assert srv.health_calls >= 3  # probed (and answered 503) several times meanwhile


def test_256_requests_on_2_engines_share_one_prober_per_engine(counting):
    """The manager has up to 256 group requests in flight: each engine still gets at most one
    /health probe per probe interval (it was one per request: ~128 probes/s at 2 s)."""
    interval = 0.5
    engines = [counting(generate_s=3.0) for _ in range(2)]
    policy = WatchPolicy(0.0, 60.0, probe_interval_s=interval, probe_timeout_s=2.0, probe_failures=2)
    probers = Probers(policy)
    results: list = []

    def one(i: int) -> None:
        url = engines[i % 2][1]
        client = SGLangClient(url, timeout_s=60)
        results.append(call_watched(client, lambda: client._request("POST", "/generate", {}), policy, 60.0,
                                    "a /generate", probers))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(256)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall_s = time.monotonic() - t0
    assert len(results) == 256
    for srv, url in engines:
        # One probe per interval from when the first request began watching: the bound is
        # wall / interval (+1 for the probe that may start just before the last request ends).
        assert 1 <= srv.health_calls <= wall_s / interval + 1, (url, srv.health_calls, wall_s)
        assert probers.probes_sent()[url] == srv.health_calls


class _Killed(Exception):
    pass


class _ActorStub:
    """The engine actor's kill, as the pool calls it (ray.get(actor.kill.remote()))."""

    class kill:  # noqa: N801 - mirrors the actor method's name
        @staticmethod
        def remote():
            raise _Killed


def test_the_pool_probe_before_a_sync_keeps_a_warming_engine_and_kills_a_silent_one(counting):
    """restart_dead_engines probes every live engine before a weight sync: an engine whose
    /health answers 503 (SGLang still warming up) stays; one that answers nothing is killed.
    (Today's main killed the 503 engine as 'hung ... for 0.0 s during a health probe'.)"""
    from rollout_sglang.config import EngineConfig
    from rollout_sglang.engines.pool import EnginePool, _Engine

    _, warming = counting(health_status=503)
    pool = EnginePool()
    pool.engine_cfg, pool.api_key = EngineConfig(health_timeout_s=0.5, health_failures=2), None
    pool._supervise([])
    en = _Engine(_ActorStub, warming, 1)
    pool._probe(en)
    assert not en.dead and pool.take_warnings() == []

    silent = _Engine(_ActorStub, "http://127.0.0.1:9", 1)  # nothing listens on the discard port
    with pytest.raises(_Killed):
        pool._probe(silent)
    assert silent.dead and "hung" in pool.take_warnings()[0]
