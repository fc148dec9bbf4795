"""The VLM judge reward against a real chat-completions HTTP server on loopback, started here.

The fake judge decodes the PNG data URL of each request and answers from the pixels (``Final Score:
<mean brightness * 4 + 1>`` by default), so scores are checked against an independent computation
from the test's own images; it records every request (body, decoded image, in-flight count)."""

from __future__ import annotations

import base64
import io
import json
import math
import pickle
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from dgpo_lightning import rewards
from helpers import send_json
from dgpo_lightning.rewards.vlm_judge import DEQA_TEMPLATE, rating_expectation

MODEL = "fake-judge"
CAPTIONS = ["a red apple", "two blue cars", "a cat on a sofa", "a snowy mountain", "the word HELLO", "a bowl of soup"]


@dataclass
class Seen:
    """One chat request as the server saw it."""

    number: int  # 0-based order of arrival among chat requests
    body: dict
    text: str
    pixels: np.ndarray  # decoded image, uint8 [H, W, 3]

    @property
    def brightness(self) -> float:
        return float(self.pixels.astype(np.float64).mean() / 255)


def reply(content: str | None, logprobs: Any = None, finish_reason: str = "stop") -> dict:
    return {"content": content, "logprobs": logprobs, "finish_reason": finish_reason}


def brightness_answer(seen: Seen) -> dict:
    return reply(f"apple (object): 1\nFinal Score: {seen.brightness * 4 + 1:.2f}")


@dataclass
class JudgeState:
    behaviour: Callable[[Seen], dict | int] = brightness_answer
    seen: list[Seen] = field(default_factory=list)
    model_listings: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.behaviour = brightness_answer
            self.seen = []
            self.model_listings = 0
            self.max_in_flight = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: JudgeState  # set on the subclass made per server

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, payload: dict) -> None:
        send_json(self, status, payload)

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        with self.state.lock:
            self.state.model_listings += 1
        listing = [{"id": MODEL, "object": "model", "created": 0, "owned_by": "test"}]
        self._send(200, {"object": "list", "data": listing})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        parts = body["messages"][0]["content"]
        text = next(p["text"] for p in parts if p["type"] == "text")
        url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        assert url.startswith("data:image/png;base64,"), url[:40]
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
        state = self.state
        with state.lock:
            seen = Seen(len(state.seen), body, text, pixels)
            state.seen.append(seen)
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            behaviour = state.behaviour
        try:
            # Requests finish out of order, so the reward must put scores back in place.
            time.sleep(0.002 * ((seen.number * 7) % 5))
            answer = behaviour(seen)
        finally:
            with state.lock:
                state.in_flight -= 1
        if isinstance(answer, int):
            return self._send(answer, {"error": {"message": f"fake judge says {answer}", "type": "server_error"}})
        self._send(
            200,
            {
                "id": f"chatcmpl-{seen.number}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer["content"]},
                        "finish_reason": answer["finish_reason"],
                        "logprobs": answer["logprobs"],
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            },
        )


@pytest.fixture(scope="module")
def server():
    state = JudgeState()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def judge(server):
    state, url = server
    state.reset()
    return state, url


def _images(batch: int, seed: int = 0, size: tuple[int, int] = (24, 32)) -> torch.Tensor:
    """Multiples of 1/255 (so the PNG carries them exactly) with brightness rising over the batch."""
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(20, 200, batch).view(batch, 1, 1, 1)
    noise = torch.randint(0, 50, (batch, 3, *size), generator=g)
    return (base.round() + noise).clamp(0, 255) / 255


def _expected_brightness_scores(images: torch.Tensor) -> torch.Tensor:
    values = []
    for image in images:
        levels = (image * 255).round().double()
        values.append(round(float(levels.mean() / 255) * 4 + 1, 2))
    return torch.tensor(values, dtype=torch.float32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scores_match_the_pixels_in_order_with_concurrency(judge):
    state, url = judge
    images = _images(6)
    reward = rewards.build("vlm_judge", base_url=url, preset="unified_reward", concurrency=4, retries=0)
    scores = reward(images, CAPTIONS)
    assert scores.dtype == torch.float32 and scores.shape == (6,)
    torch.testing.assert_close(scores, _expected_brightness_scores(images), rtol=0, atol=0)
    assert reward.model == MODEL and state.model_listings == 1  # model=None: asked the server once
    assert len(state.seen) == 6 and state.max_in_flight > 1  # really concurrent
    # 6 chat requests + the model listing.
    assert reward.stats == {"requests": 7, "retries": 0, "failures": 0, "text_fallbacks": 0}
    for seen in state.seen:
        body = seen.body
        assert body["model"] == MODEL and body["temperature"] == 0 and body["max_tokens"] == 1024
        assert [p["type"] for p in body["messages"][0]["content"]] == ["image_url", "text"]
        assert seen.pixels.shape == (24, 32, 3)
        assert "assign a score from 1 to 5 after 'Final Score:'" in seen.text
        assert "logprobs" not in body
    # Each caption reached the server inside the template, next to its own image.
    by_brightness = {round(s.brightness * 4 + 1, 2): s.text for s in state.seen}
    for caption, score in zip(CAPTIONS, scores.tolist()):
        assert by_brightness[round(score, 2)].endswith(f"Text Caption: [{caption}]")
    # A second call reuses the model name and the client.
    reward(images[:2], CAPTIONS[:2])
    assert state.model_listings == 1 and reward.stats["requests"] == 9


def test_custom_template_parse_scale_offset_and_resize(judge):
    state, url = judge

    def answer(seen: Seen) -> dict:
        assert seen.text.startswith("Judge {this} ")  # other braces are kept
        return reply(f"Brightness = {seen.brightness:.4f}. Verdict: Brightness = {seen.brightness:.4f}")

    state.behaviour = answer
    images = _images(3, seed=1, size=(24, 32))
    reward = rewards.build(
        "vlm_judge", base_url=url, model=MODEL, template="Judge {this} {prompt}!", parse=r"Brightness = ([0-9.]+)",
        scale=2.0, offset=-1.0, image_size=16, concurrency=2, max_tokens=7, temperature=0.5,
    )
    scores = reward(images, CAPTIONS[:3])
    assert sorted(s.text for s in state.seen) == sorted(f"Judge {{this}} {c}!" for c in CAPTIONS[:3])
    assert all(s.pixels.shape == (12, 16, 3) for s in state.seen)  # longest side 16, aspect kept
    assert all(s.body["max_tokens"] == 7 and s.body["temperature"] == 0.5 for s in state.seen)
    # The server saw resized pixels: recompute from what it decoded, in the order of the captions.
    brightness = {s.text: s.brightness for s in state.seen}
    expected = torch.tensor([2 * round(brightness[f"Judge {{this}} {c}!"], 4) - 1 for c in CAPTIONS[:3]])
    torch.testing.assert_close(scores, expected.float())
    state.reset()
    state.behaviour = answer
    rewards.build("vlm_judge", base_url=url, model=MODEL, template="Judge {this} {prompt}", parse=r"= ([0-9.]+)",
                  image_size=[8, 10])(images[:1], CAPTIONS[:1])
    assert state.seen[0].pixels.shape == (8, 10, 3)


def _token(token: str, logprob: float, top: dict[str, float]) -> dict:
    return {
        "token": token, "logprob": logprob, "bytes": None,
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top.items()],
    }


# At the rating position: excellent .2, good .5 + .05 ("Good"), fair .1, poor .03, bad absent; " nice" is
# no rating word. Before it, " is" has rating words among its alternatives: not the rating position.
DEQA_TOP = {" good": math.log(0.5), " excellent": math.log(0.2), " fair": math.log(0.1), " nice": math.log(0.07),
            "Good": math.log(0.05), " poor": math.log(0.03)}
DEQA_EXPECTED = (5 * 0.2 + 4 * 0.55 + 3 * 0.1 + 2 * 0.03 + 1 * 0.0) / (0.2 + 0.55 + 0.1 + 0.03)


def _deqa_answer(seen: Seen) -> dict:
    tokens = [_token("The", -0.01, {"The": -0.01}), _token(" quality", -0.02, {" quality": -0.02}),
              _token(" is", -0.1, {" is": -0.1, " good": -3.0, " bad": -4.0}),
              _token(" good", math.log(0.5), DEQA_TOP), _token(".", -0.01, {".": -0.01})]
    return reply("The quality is good.", logprobs={"content": tokens, "refusal": None})


def test_deqa_logprob_expectation(judge):
    state, url = judge
    state.behaviour = _deqa_answer
    reward = rewards.build("vlm_judge", base_url=url, model=MODEL, preset="deqa", scale=0.2, retries=0)
    scores = reward(_images(2), CAPTIONS[:2])
    assert DEQA_EXPECTED == pytest.approx(3.56 / 0.88)
    torch.testing.assert_close(scores, torch.full((2,), 0.2 * DEQA_EXPECTED), rtol=1e-6, atol=1e-6)
    for seen in state.seen:
        assert seen.text == DEQA_TEMPLATE == "How would you rate the quality of this image?"
        assert seen.body["logprobs"] is True and seen.body["top_logprobs"] == 20 and seen.body["max_tokens"] == 32
        assert "continue_final_message" not in seen.body
    assert reward.stats["text_fallbacks"] == 0
    # The same from the plain function (dict items).
    assert rating_expectation(_deqa_answer(state.seen[0])["logprobs"]["content"], {"excellent": 5, "good": 4, "fair": 3,
                              "poor": 2, "bad": 1}) == pytest.approx(DEQA_EXPECTED)


def test_deqa_assistant_prefix_and_text_fallback(judge):
    state, url = judge
    state.behaviour = lambda seen: reply("The quality of the image is Fair, rather.")  # no logprobs
    reward = rewards.build("vlm_judge", base_url=url, model=MODEL, preset="deqa", retries=0,
                           assistant_prefix="The quality of the image is", extra_body={"top_k": 1})
    with pytest.warns(UserWarning, match=r"no log-probabilities .* rating word itself"):
        scores = reward(_images(3), CAPTIONS[:3])
    torch.testing.assert_close(scores, torch.full((3,), 3.0))
    assert reward.stats["text_fallbacks"] == 3
    body = state.seen[0].body
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False and body["top_k"] == 1
    assert body["messages"][-1] == {"role": "assistant", "content": "The quality of the image is"}


def test_unparsable_answers_give_nan_and_a_warning_naming_them(judge):
    state, url = judge

    def answer(seen: Seen) -> dict | int:
        if "cat" in seen.text:
            return reply("I cannot rate this image, sorry. " + "x" * 500, finish_reason="length")
        if "mountain" in seen.text:
            return reply("Final Score: 7")  # outside UnifiedReward's 1..5
        if "HELLO" in seen.text:
            return 400  # a client error is not retried
        return brightness_answer(seen)

    state.behaviour = answer
    images = _images(6, seed=2)
    reward = rewards.build("vlm_judge", base_url=url, model=MODEL, concurrency=3, retries=2, backoff=0.01)
    with pytest.warns(UserWarning) as record:
        scores = reward(images, CAPTIONS)
    bad = [2, 3, 4]
    assert torch.isnan(scores[bad]).all()
    good = [0, 1, 5]
    torch.testing.assert_close(scores[good], _expected_brightness_scores(images)[good], rtol=0, atol=0)
    message = str(next(w.message for w in record if "could not be scored" in str(w.message)))
    assert "'vlm_judge'" in message and url in message and "3 of 6 image(s)" in message
    assert "[2] prompt 'a cat on a sofa'" in message and "I cannot rate this image, sorry." in message
    assert "more chars]" in message and "x" * 300 not in message  # the answer is truncated
    assert "finish_reason='length'; max_tokens=1024" in message
    assert "[3] prompt 'a snowy mountain'" in message and "outside [1, 5]" in message
    assert "[4] prompt 'the word HELLO'" in message and "400" in message
    assert len(state.seen) == 6 and reward.stats["retries"] == 0 and reward.stats["failures"] == 3


def test_every_image_failing_raises_and_on_error_raise(judge):
    state, url = judge
    state.behaviour = lambda seen: reply("no idea")
    reward = rewards.build("vlm_judge", base_url=url, model=MODEL, retries=0)
    with pytest.raises(RuntimeError, match=rf"all 3 image\(s\) failed at {re.escape(url)}.*no match.*'no idea'"):
        reward(_images(3), CAPTIONS[:3])
    state.behaviour = lambda seen: reply("no idea") if "cars" in seen.text else brightness_answer(seen)
    strict = rewards.build("vlm_judge", base_url=url, model=MODEL, retries=0, on_error="raise", concurrency=1)
    with pytest.raises(RuntimeError, match=r"failed at .*image 1, prompt 'two blue cars'.*'no idea'"):
        strict(_images(3), CAPTIONS[:3])


def test_server_errors_are_retried_with_backoff(judge):
    state, url = judge
    state.behaviour = lambda seen: 500 if seen.number < 2 else brightness_answer(seen)
    images = _images(1, seed=3)
    reward = rewards.build("vlm_judge", base_url=url, model=MODEL, retries=3, backoff=0.05)
    start = time.perf_counter()
    scores = reward(images, CAPTIONS[:1])
    elapsed = time.perf_counter() - start
    torch.testing.assert_close(scores, _expected_brightness_scores(images), rtol=0, atol=0)
    assert len(state.seen) == 3 and reward.stats["requests"] == 3 and reward.stats["retries"] == 2
    assert elapsed >= 0.05 + 0.1  # waited backoff, then 2 x backoff


def test_server_always_failing_raises_naming_the_url(judge):
    state, url = judge
    state.behaviour = lambda seen: 500
    reward = rewards.build("vlm_judge", base_url=url, model=MODEL, retries=2, backoff=0.01, concurrency=2)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=rf"all 2 image\(s\) failed at {re.escape(url)}.*500"):
        reward(_images(2), CAPTIONS[:2])
    assert time.perf_counter() - start < 3
    assert len(state.seen) == 6 and reward.stats["retries"] == 4  # (1 + 2 retries) per image


def test_nothing_listening_raises_quickly(judge):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    reward = rewards.build("vlm_judge", base_url=url, model=MODEL, retries=2, backoff=0.01, concurrency=2)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=rf"cannot be reached at {re.escape(url)}.*APIConnectionError"):
        reward(_images(8), CAPTIONS + CAPTIONS[:2])
    assert time.perf_counter() - start < 3
    assert 3 <= reward.stats["requests"] <= 6  # stops after the first request's retries; queued images not sent
    no_model = rewards.build("vlm_judge", base_url=url, retries=0)
    with pytest.raises(RuntimeError, match=rf"could not list the served models at {re.escape(url)}/models"):
        no_model(_images(1), CAPTIONS[:1])


def test_slow_server_times_out(judge):
    state, url = judge
    state.behaviour = lambda seen: time.sleep(3) or brightness_answer(seen)
    reward = rewards.build("vlm_judge", base_url=url, model=MODEL, timeout=0.25, retries=1, backoff=0.01)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=rf"failed at {re.escape(url)}.*(?i:timed out)"):
        reward(_images(1), CAPTIONS[:1])
    assert time.perf_counter() - start < 2.5  # 2 x 0.25 s + backoff, well before the server's answer
    assert reward.stats["requests"] == 2  # timeouts are retried


def test_registry_weighted_reward_and_labels(judge):
    state, url = judge
    assert "vlm_judge" in rewards.available()
    options = {"base_url": url, "model": MODEL, "retries": 0}
    weighted = rewards.build_weighted({"vlm_judge": 1.0, "test_brightness": 2.0}, vlm_judge=options)
    images = _images(4, seed=4)
    total = weighted(images, CAPTIONS[:4])
    expected = _expected_brightness_scores(images) + 2 * images.mean(dim=(1, 2, 3))
    torch.testing.assert_close(total, expected)
    # A NaN from the judge is kept where rollouts ask for it, and names the reward otherwise.
    state.behaviour = lambda seen: reply("?") if "cars" in seen.text else brightness_answer(seen)
    with pytest.warns(UserWarning, match="could not be scored"):
        parts = weighted.components(images, CAPTIONS[:4], allow_non_finite=True, batch_size=2)
    assert torch.isnan(parts["vlm_judge"]).tolist() == [False, True, False, False]
    strict = r"reward 'vlm_judge' returned non-finite scores at indices \[1\]"
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=strict):
        weighted.components(images, CAPTIONS[:4])
    # Two judges under labels of one's own (the 'kind' option).
    state.behaviour = lambda seen: _deqa_answer(seen) if seen.text == DEQA_TEMPLATE else brightness_answer(seen)
    both = rewards.build_weighted(
        {"deqa": 0.5, "unified": 1.0},
        deqa={"kind": "vlm_judge", "preset": "deqa", **options},
        unified={"kind": "vlm_judge", "preset": "unified_reward", **options},
    )
    torch.testing.assert_close(both(images, CAPTIONS[:4]), 0.5 * DEQA_EXPECTED + _expected_brightness_scores(images))
    # Picklable (reward servers, worker processes), and works after unpickling.
    clone = pickle.loads(pickle.dumps(both.rewards["unified"]))
    torch.testing.assert_close(clone(images[:1], CAPTIONS[:1]), _expected_brightness_scores(images[:1]))


def test_option_errors_name_the_option():
    with pytest.raises(ValueError, match="base_url"):
        rewards.build("vlm_judge")
    with pytest.raises(ValueError, match="base_url="):
        rewards.build("vlm_judge", base_url="localhost:8000")
    assert rewards.build("vlm_judge", base_url="http://127.0.0.1:8000/").base_url == "http://127.0.0.1:8000/v1"
    assert rewards.build("vlm_judge", base_url="http://h:1/api/v1/").base_url == "http://h:1/api/v1"
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        rewards.build("vlm_judge", base_url="http://h:1/v1", preset="nope")
    with pytest.raises(ValueError, match="exactly one capturing group"):
        rewards.build("vlm_judge", base_url="http://h:1/v1", parse=r"Score: \d+")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        rewards.build("vlm_judge", base_url="http://h:1/v1", parse=r"(")
    with pytest.raises(ValueError, match="on_error"):
        rewards.build("vlm_judge", base_url="http://h:1/v1", on_error="ignore")
    for option, value in (("concurrency", 0), ("retries", -1), ("timeout", 0), ("backoff", -1), ("image_size", 0)):
        with pytest.raises(ValueError, match=option):
            rewards.build("vlm_judge", base_url="http://h:1/v1", **{option: value})
    reward = rewards.build("vlm_judge", base_url="http://h:1/v1", preset="deqa", parse=r"(\d)")
    assert reward.logprobs is False and reward.score_range is None  # a custom parse drops the preset's reader
    assert rewards.build("vlm_judge", base_url="http://h:1/v1", api_key="k").api_key == "k"
    with pytest.raises(ValueError, match="expected images"):
        rewards.build("vlm_judge", base_url="http://h:1/v1")(torch.zeros(1, 1, 4, 4), ["x"])
