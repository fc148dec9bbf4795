"""The reward server (``python -m dgpo_lightning.rewards.serve``, real subprocesses on loopback) and its
client, the ``remote`` reward: exact scores against the in-process rewards, batching under concurrent
clients, retries when the server dies, timeouts against a stalled loopback server, 4xx answers that
name the field at fault.

Three servers start once for the module, side by side: GenEval alone (the world's detector), GenEval
+ 0.5 · JPEG size (a weighted set), and a JPEG server that a test kills. Every one is killed (its
whole process group) when the module ends."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image

from dgpo_lightning import rewards
from dgpo_lightning.data.prompts import load_prompt_records
from dgpo_lightning.rewards import serve
from helpers import send_json
from dgpo_lightning.rewards.remote import (
    RemoteRequestError,
    RemoteReward,
    RemoteRewardError,
    encode_images,
    quantize_uint8,
)
from dgpo_lightning.world.scene import render_prompt

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 120.0  # seconds: three servers start at once on two cores
WEIGHTS = {"geneval": 1.0, "jpeg_incompressibility": 0.5}


# --------------------------------------------------------------------------- servers in subprocesses


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    args: list[str]
    port: int
    process: subprocess.Popen
    log: Path
    launched: float
    start_seconds: float = math.nan

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group (LitServe's worker, HTTP server and manager processes too)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


def launch(args: list[str], log_dir: Path) -> Server:
    port = free_port()
    log = log_dir / f"server-{port}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("LIT_SERVER_API_KEY", None)
    command = [sys.executable, "-m", "dgpo_lightning.rewards.serve", *args, "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--log-level", "warning"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return Server(args, port, process, log, time.monotonic())


def wait_ready(server: Server, deadline: float) -> None:
    """Poll ``GET /health`` until 200 (the test of /health answering once ready), bounded."""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"reward server {server.args} exited with {server.process.returncode}:\n{server.output()}")
        try:
            response = requests.get(server.url + "/health", timeout=2)
            if response.status_code == 200:
                assert response.text == "ok"
                server.start_seconds = time.monotonic() - server.launched
                return
            assert response.status_code == 503  # LitServe: up, worker not ready yet
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    pytest.fail(f"reward server {server.args} not ready after {READY_TIMEOUT} s:\n{server.output()}")


@pytest.fixture(scope="module")
def servers(request, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("reward-servers")
    started: dict[str, Server] = {}
    # Stopped whatever happens, even when a launch or a wait fails.
    request.addfinalizer(lambda: [server.kill() for server in started.values()])
    started["geneval"] = launch(["--reward", "geneval", "--max-batch-size", "4", "--batch-timeout", "0.05"], log_dir)
    started["weighted"] = launch(
        ["--reward", "geneval", "--reward", "jpeg_incompressibility", "--weights", json.dumps({"jpeg_incompressibility": 0.5}),
         "--max-batch-size", "1"],
        log_dir,
    )
    started["victim"] = launch(["--reward", "jpeg_incompressibility", "--max-batch-size", "1"], log_dir)
    deadline = time.monotonic() + READY_TIMEOUT
    for server in started.values():
        wait_ready(server, deadline)
    sys.stderr.write("reward server start (s, three at once): "
                     + ", ".join(f"{name} {s.start_seconds:.1f}" for name, s in started.items()) + "\n")
    return started


# --------------------------------------------------------------------------- world images and GenEval metadata


RECORDS = load_prompt_records("world:train")


def world_batch(count: int, seed: int, *, width: int = 32, mismatched: bool = True):
    """Rendered world images with their GenEval records; every other image paired with another
    prompt (so scores are a mix of 0 and 1); ``width < 32`` crops them to non-square images."""
    generator = torch.Generator().manual_seed(seed)
    picks = [RECORDS[int(i)] for i in torch.randint(len(RECORDS), (count,), generator=generator)]
    images = torch.stack([render_prompt(record, generator) for record in picks])[..., :width]
    records = list(picks)
    if mismatched:
        for i in range(0, count, 2):
            records[i] = RECORDS[(RECORDS.index(picks[i]) + 7) % len(RECORDS)]
    return images.contiguous(), [r["prompt"] for r in records], records


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


# --------------------------------------------------------------------------- (a) exact scores, (g) health, (h) registry


def test_remote_is_registered():
    assert "remote" in rewards.available()
    with pytest.raises(ValueError, match="remote.url="):
        rewards.build("remote", url="localhost:8000")
    with pytest.raises(ValueError, match="remote.encoding='jpeg'"):
        rewards.build("remote", url="http://127.0.0.1:1", encoding="jpeg")


def test_registry_does_not_import_the_serving_stack():
    # The registry imports every reward module: serve.py and remote.py must not pull LitServe in.
    code = ("import sys; from dgpo_lightning import rewards; rewards.available(); "
            "heavy = [m for m in ('litserve', 'fastapi', 'uvicorn', 'requests') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_health_and_info(servers):
    for name, server in servers.items():
        if name == "victim":
            continue
        response = requests.get(server.url + "/health", timeout=5)
        assert (response.status_code, response.text) == (200, "ok")
    info = requests.get(servers["weighted"].url + "/info", timeout=5).json()["model"]
    assert info["rewards"] == ["geneval", "jpeg_incompressibility"]
    assert info["weights"] == WEIGHTS
    assert RemoteReward(servers["geneval"].url).info()["weights"] == {"geneval": 1.0}
    assert RemoteReward(servers["geneval"].url).health()
    assert not RemoteReward(f"http://127.0.0.1:{free_port()}", timeout=1).health()


def test_float32_scores_are_the_in_process_scores_bitwise(servers):
    images, prompts, records = world_batch(24, seed=0)
    expected = rewards.build("geneval")(images, prompts, records)
    assert 0 < expected.sum() < len(expected)  # a mix of right and wrong pairs: order matters
    client = rewards.build("remote", url=servers["geneval"].url, timeout=30)
    scores = client(images, prompts, records)
    assert bitwise_equal(scores, expected)
    # In requests of 5 images (the last one shorter), and with the URL given as .../predict/.
    chunked = rewards.build("remote", url=servers["geneval"].url + "/predict/", batch_size=5)
    assert bitwise_equal(chunked(images, prompts, records), expected)
    assert chunked.stats == {"requests": 5, "retries": 0, "failures": 0}


def test_weighted_set_is_build_weighted_bitwise(servers):
    images, prompts, records = world_batch(12, seed=1, width=27)
    local = rewards.build_weighted(WEIGHTS)
    components = local.components(images, prompts, records)
    expected = local.total(components)
    assert len(set(components["jpeg_incompressibility"].tolist())) > 1
    client = rewards.build("remote", url=servers["weighted"].url)
    scores, remote_components = client.score(images, prompts, records)
    assert bitwise_equal(scores, expected)
    assert set(remote_components) == set(WEIGHTS)
    for name in WEIGHTS:
        assert bitwise_equal(remote_components[name], components[name])
    assert bitwise_equal(client(images, prompts, records), expected)


# --------------------------------------------------------------------------- (b) uint8 and PNG


@pytest.mark.parametrize("encoding", ["uint8", "png"])
def test_uint8_and_png_score_the_quantised_images(servers, encoding):
    images, prompts, records = world_batch(10, seed=2, width=29)
    images = (images + 0.003 * torch.randn(images.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    quantised = quantize_uint8(images).float() / 255
    assert not torch.equal(quantised, images)
    local = rewards.build_weighted(WEIGHTS)
    components = local.components(quantised, prompts, records)
    client = rewards.build("remote", url=servers["weighted"].url, encoding=encoding, batch_size=4)
    scores, remote_components = client.score(images, prompts, records)
    assert bitwise_equal(scores, local.total(components))
    for name in WEIGHTS:
        assert bitwise_equal(remote_components[name], components[name])


def test_request_bodies_and_sizes_of_the_encodings():
    images = torch.rand(2, 3, 16, 16)
    client = RemoteReward("http://127.0.0.1:1")
    for encoding in ("float32", "uint8", "png"):  # the spliced body is the plain JSON encoding
        client.encoding = encoding
        body = json.loads(client._body(images, ["a", "b"], [{"x": [1]}, None]))
        assert body == {**encode_images(images, encoding), "prompts": ["a", "b"], "metadata": [{"x": [1]}, None]}
    with pytest.raises(ValueError, match="JSON-serialisable"):
        client._body(images, ["a", "b"], [{"x": object()}, None])
    raw = {e: len(json.dumps(encode_images(images, e))) for e in ("float32", "uint8")}
    assert raw["uint8"] < raw["float32"] / 3.5
    flat = torch.full((2, 3, 64, 64), 0.5)
    assert len(json.dumps(encode_images(flat, "png"))) < len(json.dumps(encode_images(flat, "uint8"))) / 10


# --------------------------------------------------------------------------- (c) concurrent clients


def test_concurrent_clients_get_their_own_scores(servers):
    url = servers["geneval"].url
    shared = rewards.build("remote", url=url, timeout=60)  # one client shared by threads (a session each)
    jobs = []
    for job in range(8):
        images, prompts, records = world_batch(3 + job % 4, seed=100 + job, width=32 if job % 2 else 30)
        jobs.append((images, prompts, records, rewards.build("geneval")(images, prompts, records)))
    bad_images, bad_prompts, _ = world_batch(2, seed=99)
    bad_records = [{"prompt": p} for p in bad_prompts]  # no clauses: the reward rejects this one request

    def run(index: int):
        if index == len(jobs):
            with pytest.raises(RemoteRequestError, match="HTTP 422.*'include'"):
                shared(bad_images, bad_prompts, bad_records)
            return None
        images, prompts, records, _ = jobs[index]
        return [shared(images, prompts, records) for _ in range(3)]

    with ThreadPoolExecutor(max_workers=len(jobs) + 1) as pool:
        results = list(pool.map(run, range(len(jobs) + 1)))
    for (_, _, _, expected), got in zip(jobs, results[:-1]):
        for scores in got:
            assert bitwise_equal(scores, expected)
    assert sum(e.sum().item() for *_, e in jobs) > 0 and any((e == 0).any() for *_, e in jobs)


# --------------------------------------------------------------------------- (d) the server dies, (e) a stalled server


def test_server_killed_mid_call_retries_then_raises_naming_the_url(servers):
    victim = servers["victim"]
    images, prompts, _ = world_batch(6, seed=4)
    client = rewards.build("remote", url=victim.url, batch_size=2, retries=2, backoff=0.05, timeout=10)
    expected = rewards.build("jpeg_incompressibility")(images, prompts)
    assert bitwise_equal(client(images, prompts), expected)

    original, answered = client._post, []

    def post_then_kill(body):  # the server dies after the first request of the call was answered
        response = original(body)
        answered.append(response)
        if len(answered) == 1:
            victim.kill()
        return response

    client._post = post_then_kill
    client.stats.update(requests=0, retries=0)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=f"remote reward at {victim.url}/predict: no answer after 3 attempt") as raised:
        client(images, prompts)
    assert not isinstance(raised.value, ValueError)
    assert "ConnectionError" in str(raised.value)
    assert len(answered) == 1 and client.stats == {"requests": 4, "retries": 2, "failures": 1}
    assert time.monotonic() - started < 5  # backoffs 0.05 + 0.1 s; refused connections are immediate


class ScriptedServer:
    """A loopback HTTP server answering ``POST /predict`` from a script: ``(status, body)`` in turn
    (the last one repeats), or ``"stall"``: wait (at most 20 s) until the test ends."""

    def __init__(self, script):
        self.script, self.requests, self.release = list(script), [], threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append(json.loads(body))
                step = outer.script[min(len(outer.requests), len(outer.script)) - 1]
                if step == "stall":
                    outer.release.wait(20)
                    step = (200, {"scores": []})
                status, payload = step
                send_json(self, status, payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def scripted():
    made = []

    def make(*script):
        made.append(ScriptedServer(script))
        return made[-1]

    yield make
    for server in made:
        server.stop()


def test_a_stalled_server_times_out_naming_the_url(scripted):
    server = scripted("stall")
    client = rewards.build("remote", url=server.url, timeout=0.3, retries=1, backoff=0.0)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=f"{server.url}/predict: no answer after 2 attempt.*timeout of 0.3 s"):
        client(torch.rand(2, 3, 8, 8), ["a", "b"])
    assert time.monotonic() - started < 3
    assert len(server.requests) == 2 and client.stats["failures"] == 1


def test_5xx_is_retried_4xx_is_not_and_nan_comes_back_as_nan(scripted):
    ok = (200, {"scores": [0.5, None, "-inf"], "components": {"a": [0.5, None, "-inf"]}})
    server = scripted((503, {"detail": "warming up"}), (500, {"detail": "boom"}), ok)
    client = rewards.build("remote", url=server.url, retries=2, backoff=0.01, encoding="uint8")
    scores, components = client.score(torch.rand(3, 3, 4, 4), ["a", "b", "c"], [{"k": 1}, None, {"k": [2]}])
    assert scores.dtype == torch.float32 and scores[0] == 0.5 and math.isnan(scores[1]) and scores[2] == -math.inf
    assert math.isnan(components["a"][1])
    assert client.stats == {"requests": 3, "retries": 2, "failures": 0}
    assert server.requests[-1]["metadata"] == [{"k": 1}, None, {"k": [2]}]
    assert server.requests[-1]["images"]["dtype"] == "uint8"

    rejecting = scripted((422, {"detail": "prompts: 1 prompts for 2 images"}))
    client = rewards.build("remote", url=rejecting.url, retries=3, backoff=0.01)
    with pytest.raises(RemoteRequestError, match=r"rejected the request \(HTTP 422\): prompts: 1 prompts for 2 images"):
        client(torch.rand(2, 3, 4, 4), ["a", "b"])
    assert len(rejecting.requests) == 1 and client.stats["retries"] == 0

    down = scripted((503, {"detail": "still down"}))
    client = rewards.build("remote", url=down.url, retries=1, backoff=0.0)
    with pytest.raises(RemoteRewardError, match="last error: HTTP 503: still down"):
        client(torch.rand(1, 3, 4, 4), ["a"])

    short = scripted((200, {"scores": [1.0]}))
    with pytest.raises(RemoteRewardError, match="not a reward server's answer.*1 scores for 2 images"):
        rewards.build("remote", url=short.url)(torch.rand(2, 3, 4, 4), ["a", "b"])


def test_nothing_partial_when_a_later_request_fails(scripted):
    server = scripted((200, {"scores": [1.0, 2.0], "components": {}}), (400, {"detail": "bad"}))
    client = rewards.build("remote", url=server.url, batch_size=2, retries=0)
    with pytest.raises(RemoteRequestError, match="HTTP 400"):
        client(torch.rand(4, 3, 4, 4), ["a", "b", "c", "d"])
    assert len(server.requests) == 2


def test_scores_follow_the_images_device_and_the_client_pickles(scripted):
    server = scripted((200, {"scores": [3.0], "components": {"x": [3.0]}}))
    client = pickle.loads(pickle.dumps(rewards.build("remote", url=server.url)))
    images = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    scores = client(images, ["a"])
    assert scores.dtype == torch.float32 and scores.device == images.device and scores.tolist() == [3.0]
    assert client(torch.zeros(0, 3, 4, 4), []).shape == (0,) and len(server.requests) == 1
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        client(torch.rand(2, 3, 4, 4), ["a"])


# --------------------------------------------------------------------------- (f) malformed requests, raw HTTP


def _raw_body(images, prompts, records):
    data = base64.b64encode(images.numpy().astype("<f4").tobytes()).decode()
    return {"images": {"dtype": "float32", "shape": list(images.shape), "data": data}, "prompts": prompts, "metadata": records}


def _png(array) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_malformed_requests_get_422_naming_the_field(servers):
    url = servers["geneval"].url + "/predict"
    images, prompts, records = world_batch(2, seed=5)
    good = _raw_body(images, prompts, records)
    pixels = quantize_uint8(images).permute(0, 2, 3, 1).numpy()
    cases = {
        "images.data": {**good, "images": {**good["images"], "data": "not base64!"}},
        "images.data: 24576 bytes, but images.shape [2, 3, 32, 31]": {**good, "images": {**good["images"], "shape": [2, 3, 32, 31]}},
        "images.shape": {**good, "images": {**good["images"], "shape": [2, 32, 32]}},
        "images.dtype": {**good, "images": {**good["images"], "dtype": "float64"}},
        "prompts: 1 prompts for 2 images": {**good, "prompts": prompts[:1]},
        "metadata: 3 records for 2 images": {**good, "metadata": records + records[:1]},
        "prompts: Field required": {k: v for k, v in good.items() if k != "prompts"},
        "images: give exactly one of": {"prompts": prompts, "metadata": records},
        "png[1]: not an image file": {"png": [_png(pixels[0]), base64.b64encode(b"GIF89a").decode()], "prompts": prompts},
        "png[1]: 16x32 pixels": {"png": [_png(pixels[0]), _png(pixels[1][:, :16].copy())], "prompts": prompts},
        "png[0]: PNG mode 'L'": {"png": [_png(pixels[0][..., 0].copy())], "prompts": prompts[:1]},
        "body: not valid JSON": b'{"prompts": [',
        "the reward rejected the request: GenEval": {**good, "metadata": [{"prompt": p} for p in prompts]},
    }
    for expected, body in cases.items():
        kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
        response = requests.post(url, timeout=30, **kwargs)
        assert response.status_code == 422, (expected, response.status_code, response.text)
        detail = response.json()["detail"]
        assert detail.startswith(expected), (expected, detail)
        assert len(response.content) < 2000  # the input is not echoed back
    response = requests.post(url, json=good, timeout=30)  # the server still works
    assert response.status_code == 200
    assert response.json()["scores"] == rewards.build("geneval")(images, prompts, records).tolist()


def test_the_server_side_encoding_of_non_finite_scores():
    api = serve.RewardAPI({"a": 1.0}, {})
    out = api.encode_response({"scores": [math.nan, 1.5, math.inf], "components": {"a": [math.nan, 1.5, -math.inf]}})
    assert json.loads(json.dumps(out, allow_nan=False)) == {
        "scores": [None, 1.5, "inf"], "components": {"a": [None, 1.5, "-inf"]}
    }
    decoded = serve.decode_scores(out["scores"])
    assert math.isnan(decoded[0]) and decoded[1:] == [1.5, math.inf]
    with pytest.raises(ValueError, match="not a score"):
        serve.decode_scores([True])
    # LitServe formats every request into a debug message: the request's repr must stay short.
    body = json.loads(RemoteReward("http://127.0.0.1:1")._body(torch.rand(4, 3, 64, 64), list("abcd"), None))
    request = serve.ScoreRequest(**body)
    assert len(request.images.data) == 4 * 3 * 64 * 64 * 4 and len(f"{request}") < 100


def test_command_line_user_errors(capsys, tmp_path):
    def error_of(*argv):
        with pytest.raises(SystemExit) as raised:
            serve.main(list(argv))
        assert raised.value.code == 2
        return capsys.readouterr().err

    assert "unknown reward 'nope'" in error_of("--reward", "nope")
    assert "name the reward(s)" in error_of()
    assert "--weights names reward(s) ['jpeg_compressibility']" in error_of(
        "--reward", "geneval", "--weights", '{"jpeg_compressibility": 1}'
    )
    assert "--weights: not valid JSON" in error_of("--reward", "geneval", "--weights", "{geneval: 1}")
    assert "--weights: geneval='1' must be a finite number" in error_of("--reward", "geneval", "--weights", '{"geneval": "1"}')
    assert "--device 'tpu'" in error_of("--reward", "geneval", "--device", "tpu")
    assert "--host '10.0.0.1'" in error_of("--reward", "geneval", "--host", "10.0.0.1")
    options = tmp_path / "options.yaml"
    options.write_text("geneval: {detector: yolo}\n")
    assert "unknown detector 'yolo'" in error_of("--reward", "geneval", "--options", str(options))
    options.write_text("jpeg_compressibility: {quality: 90}\n")
    assert "no --reward asks for" in error_of("--reward", "geneval", "--options", str(options))
