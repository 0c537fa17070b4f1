"""`mlx-sdxl serve` under load: one FIFO queue and one worker. 16 concurrent requests all
complete, none lost or duplicated, each image equal to the same request run alone, while
/progress keeps answering within 200 ms; clients that disconnect do not stall the queue;
interrupt ends a job within one sampler step and returns its images so far; skip moves on;
previews are made only while a client polls for them."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from serve_harness import TINY, RunningServer, decode_png, info_of, make_config, pixels

BASE_ONLY = dict(TINY, refiner_checkpoint="None")


@pytest.fixture(scope="module")
def server(tiny_sdxl):
    srv = RunningServer(make_config(tiny_sdxl[0], tiny_sdxl[1]))
    with httpx.Client(base_url=srv.url, timeout=60, trust_env=False) as c:  # nothing timed pays a first-use cost:
        c.post("/sdapi/v1/txt2img", json=dict(TINY, prompt="warm up", steps=5, seed=0))  # the weights load,
        c.get("/sdapi/v1/progress")                                                      # and each route
        c.get("/sdapi/v1/options")                                                       # answers once
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=120, trust_env=False) as c:
        yield c


class ProgressWatch:
    """Polls /progress in a thread (and, with `options`, GET /options in turn): each answer's
    latency, and each progress answer."""

    def __init__(self, url, every=0.02, want_image=False, options=False):
        self.url, self.every, self.want_image, self.options = url, every, want_image, options
        self.latencies, self.option_latencies, self.seen = [], [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self):
        params = {} if self.want_image else {"skip_current_image": "true"}
        with httpx.Client(base_url=self.url, timeout=10, trust_env=False) as c:
            deadline = time.monotonic() + 120  # bounded even if the test forgets to stop it
            while not self._stop.is_set() and time.monotonic() < deadline:
                t0 = time.perf_counter()
                body = c.get("/sdapi/v1/progress", params=params).json()
                self.latencies.append(time.perf_counter() - t0)
                self.seen.append((time.perf_counter(), body))
                if self.options:
                    t0 = time.perf_counter()
                    assert c.get("/sdapi/v1/options").status_code == 200
                    self.option_latencies.append(time.perf_counter() - t0)
                time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)


def _when_step(url, at_least, timeout=60):
    """Wait until the running job has done `at_least` steps; returns that step."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=10, trust_env=False) as c:
        while time.monotonic() < deadline:
            state = c.get("/sdapi/v1/progress", params={"skip_current_image": "true"}).json()["state"]
            if state["job"] and state["sampling_step"] >= at_least:
                return state["sampling_step"]
            time.sleep(0.005)
    raise AssertionError(f"no job reached step {at_least}")


def test_16_concurrent_requests_all_complete_each_as_alone(server, client):
    seeds = list(range(100, 116))
    request = lambda seed: dict(BASE_ONLY, prompt="a photo of a cat", steps=2, seed=seed)  # noqa: E731
    started = server.service.worker.started
    with ProgressWatch(server.url, options=True) as watch, ThreadPoolExecutor(16) as pool:
        def post(seed):
            with httpx.Client(base_url=server.url, timeout=120, trust_env=False) as c:
                return c.post("/sdapi/v1/txt2img", json=request(seed))
        together = list(pool.map(post, seeds))
    assert [r.status_code for r in together] == [200] * 16
    assert sorted(info_of(r)["seed"] for r in together) == seeds             # none lost, none duplicated
    assert [info_of(r)["seed"] for r in together] == seeds                   # each got its own
    assert server.service.worker.started - started == 16
    assert len(watch.latencies) > 20 and max(watch.latencies) < 0.2, max(watch.latencies)
    assert max(watch.option_latencies) < 0.2, max(watch.option_latencies)
    print(f"\nunder 16 queued requests: progress max {max(watch.latencies) * 1000:.1f} ms, median "
          f"{sorted(watch.latencies)[len(watch.latencies) // 2] * 1000:.1f} ms (n={len(watch.latencies)}); "
          f"options max {max(watch.option_latencies) * 1000:.1f} ms")
    for seed, r in zip(seeds, together):
        alone = client.post("/sdapi/v1/txt2img", json=request(seed))
        assert np.array_equal(pixels(r.json()["images"][0]), pixels(alone.json()["images"][0])), seed


def _raw_request(port, payload: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    return sock


def test_killed_clients_do_not_stall_the_queue(server, client):
    import json

    worker = server.service.worker
    started, dropped = worker.started, worker.dropped
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.post, "/sdapi/v1/txt2img", json=dict(BASE_ONLY, prompt="a", steps=20, seed=1))
        _when_step(server.url, 1)
        waiting = _raw_request(server.port, json.dumps(dict(BASE_ONLY, prompt="b", steps=20, seed=2)).encode())
        deadline = time.monotonic() + 10
        while worker.waiting() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.waiting() == 1
        waiting.close()                                    # the client dies while its job waits
        last = client.post("/sdapi/v1/txt2img", json=dict(BASE_ONLY, prompt="c", steps=2, seed=3))
        assert running.result().status_code == 200 and last.status_code == 200
    assert worker.dropped - dropped == 1 and worker.started - started == 2   # b never ran
    gone = _raw_request(server.port, json.dumps(dict(BASE_ONLY, prompt="d", steps=8, seed=4)).encode())
    _when_step(server.url, 1)
    gone.close()                                           # the client dies while its job runs
    after = client.post("/sdapi/v1/txt2img", json=dict(BASE_ONLY, prompt="e", steps=2, seed=5))
    assert after.status_code == 200 and worker.waiting() == 0


def test_interrupt_returns_within_one_step_with_the_image_so_far(server, client):
    with ThreadPoolExecutor(1) as pool, ProgressWatch(server.url, every=0.005) as watch:
        job = pool.submit(client.post, "/sdapi/v1/txt2img", json=dict(TINY, prompt="a", steps=20, seed=8))
        _when_step(server.url, 3)
        t0 = time.perf_counter()
        assert client.post("/sdapi/v1/interrupt").json() == {}
        r = job.result()
        latency = time.perf_counter() - t0
    info = info_of(r)
    assert r.status_code == 200 and info["interrupted"] and len(r.json()["images"]) == 1
    arrived, stopped = info["interrupt_arrived_at_step"], info["interrupted_at_step"]
    assert arrived >= 3 and stopped - arrived <= 1, (arrived, stopped)
    steps = sorted({(b["state"]["sampling_step"], t) for t, b in watch.seen if b["state"]["job"]})
    firsts = {}
    for step, t in steps:
        firsts.setdefault(step, t)
    durations = [firsts[s + 1] - firsts[s] for s in firsts if s + 1 in firsts and s >= 1]
    step_time = max(durations)
    print(f"\ninterrupt: arrived at step {arrived}, stopped at step {stopped} of 20; response {latency * 1000:.0f} ms "
          f"after the interrupt; one step takes {step_time * 1000:.0f} ms (max seen)")
    assert latency < step_time + 1.0   # one step at most, plus the decode of the image so far
    image = decode_png(r.json()["images"][0])
    assert image.size == (64, 64) and '"interrupted_at": "' in image.info["mlx_sdxl"]
    assert client.get("/sdapi/v1/progress").json()["state"]["job"] == ""
    assert info_of(client.post("/sdapi/v1/txt2img", json=dict(BASE_ONLY, prompt="a", steps=2, seed=8)))[
        "interrupted"] is False   # the next job is not interrupted


def test_skip_ends_the_iteration_and_goes_on(server, client):
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(client.post, "/sdapi/v1/txt2img", json=dict(BASE_ONLY, prompt="a", steps=12, seed=20,
                                                                      n_iter=2))
        _when_step(server.url, 2)
        client.post("/sdapi/v1/skip")
        r = job.result()
    info = info_of(r)
    assert r.status_code == 200 and info["all_seeds"] == [20, 21] and not info["interrupted"]
    assert '"interrupted_at"' in decode_png(r.json()["images"][0]).info["mlx_sdxl"]
    assert '"interrupted_at"' not in decode_png(r.json()["images"][1]).info["mlx_sdxl"]


def test_previews_only_while_a_client_polls_for_them(server, client):
    state = server.service.state
    before = state.previews_made
    client.post("/sdapi/v1/txt2img", json=dict(BASE_ONLY, prompt="a", steps=6, seed=30))
    assert state.previews_made == before                     # nobody polled
    with ProgressWatch(server.url, every=0.01, want_image=False):
        client.post("/sdapi/v1/txt2img", json=dict(BASE_ONLY, prompt="a", steps=6, seed=30))
    assert state.previews_made == before                     # polled with skip_current_image
    with ProgressWatch(server.url, every=0.01, want_image=True) as watch:
        client.post("/sdapi/v1/txt2img", json=dict(BASE_ONLY, prompt="a", steps=6, seed=30))
    made = state.previews_made - before
    assert 1 <= made <= 6                                    # at most one per step (--preview-every 1)
    images = [b["current_image"] for _, b in watch.seen if b["current_image"]]
    assert images and decode_png(images[-1]).size == (8, 8)  # the linear preview: 1/8 of the image
