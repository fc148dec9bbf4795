"""The ``remote`` reward: a client of the reward server (:mod:`dgpo_lightning.rewards.serve`).

``rewards.build("remote", url="http://host:8000", timeout=120, retries=3, backoff=1.0,
encoding="float32", batch_size=None)`` is a reward with the usual contract,
``reward(images[B, 3, H, W] in [0, 1], prompts, metadata=None) -> Tensor[B]`` (float32, on the
images' device), whose scores come from whatever the server serves: one reward or a weighted set,
often a heavy scorer on a GPU or machine of its own. In a training config::

    data:
      rewards: {remote: 1.0}
      reward_options:
        remote: {url: "http://scorer:8000"}

Options:

* ``url``: the server, ``http(s)://host:port`` (``/predict`` is appended unless given).
* ``encoding``: ``float32`` (default; the pixels exactly), ``uint8`` (4× smaller; the server scores
  ``round(255 · clamp(x, 0, 1)) / 255``, see :func:`quantize_uint8`) or ``png`` (lossless RGB PNGs of
  those uint8 pixels: smaller still on flat images, slower to encode).
* ``batch_size``: images per HTTP request (default: all of a call in one request); the requests of
  one call go one after the other, and the server may batch them with other clients' requests.
* ``timeout``: seconds per attempt to connect and to wait for the answer (``requests``' semantics:
  between bytes received). ``retries`` further attempts on connection errors, timeouts, HTTP 408,
  429 and 5xx, after ``backoff · 2^k`` seconds (k = 0, 1, ...). Keep ``timeout`` above the
  server's longest scoring time: a request that times out is sent again (the server still scores
  the first one).
* ``api_key``: sent as ``X-API-Key`` (a server started with ``LIT_SERVER_API_KEY``).

Failures: a call returns every score or raises, nothing in between. After the retries it raises
:class:`RemoteRewardError` (a ``RuntimeError``) naming the URL and the last error; a request the
server rejects (HTTP 4xx: a malformed request, or the reward refused its input, e.g. GenEval
metadata without clauses) is not retried and raises :class:`RemoteRequestError` (also a
``ValueError``, as the reward itself would raise in process) with the server's message. NaN scores
(a reward that failed on an image) come back as NaN.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from dgpo_lightning.errors import check
from dgpo_lightning.rewards.base import register

NAME = "remote"
ENCODINGS = ("float32", "uint8", "png")

logger = logging.getLogger(__name__)


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached or did not answer properly (after the retries)."""


class RemoteRequestError(RemoteRewardError, ValueError):
    """The reward server rejected a request (HTTP 4xx): its message says what was wrong."""


def quantize_uint8(images: Tensor) -> Tensor:
    """``round(255 · clamp(x, 0, 1))`` as uint8 on the CPU: the pixels the ``uint8`` and ``png``
    encodings send (the server scores them divided by 255)."""
    return (images.detach().to("cpu", torch.float32).clamp(0, 1) * 255).round().to(torch.uint8)


def _raw_bytes(images: Tensor, encoding: str) -> bytes:
    """The little-endian bytes of ``images`` as float32, or of their uint8 quantisation."""
    if encoding == "uint8":
        return quantize_uint8(images).contiguous().numpy().tobytes()
    return images.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()


def encode_images(images: Tensor, encoding: str = "float32") -> dict[str, Any]:
    """The request fields of ``images[B, 3, H, W]``: ``{"images": {...}}`` or ``{"png": [...]}``."""
    import base64

    if encoding == "png":
        import io

        from PIL import Image

        items = []
        for array in quantize_uint8(images).permute(0, 2, 3, 1).numpy():
            buffer = io.BytesIO()
            Image.fromarray(array, mode="RGB").save(buffer, format="PNG")
            items.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        return {"png": items}
    data = base64.b64encode(_raw_bytes(images, encoding)).decode("ascii")
    return {"images": {"dtype": encoding, "shape": list(images.shape), "data": data}}


def _short(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _detail(response: Any) -> str:
    """The server's message of an error answer: its JSON ``detail``, else the body's start."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if detail is None:
        detail = response.text or response.reason or ""
    return _short(detail if isinstance(detail, str) else json.dumps(detail))


class RemoteReward:
    """Scores images with a reward server; see the module docstring. :attr:`stats` counts
    ``requests`` (HTTP attempts), ``retries`` and ``failures`` (calls that raised)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        encoding: str = "float32",
        batch_size: int | None = None,
        api_key: str | None = None,
    ):
        check(isinstance(url, str) and url.startswith(("http://", "https://")), "remote.url", url,
              "must be the reward server's address, http://host:port (see python -m dgpo_lightning.rewards.serve)")
        check(encoding in ENCODINGS, "remote.encoding", encoding, f"must be one of {', '.join(ENCODINGS)}")
        check(isinstance(timeout, (int, float)) and timeout > 0, "remote.timeout", timeout, "must be a positive number of seconds")
        check(isinstance(retries, int) and retries >= 0, "remote.retries", retries, "must be an integer >= 0")
        check(isinstance(backoff, (int, float)) and backoff >= 0, "remote.backoff", backoff, "must be a number of seconds >= 0")
        check(batch_size is None or (isinstance(batch_size, int) and batch_size >= 1), "remote.batch_size", batch_size,
              "must be a positive integer (images per request) or null (a call's images in one request)")
        base = url.rstrip("/")
        if base.endswith("/predict"):
            base = base[: -len("/predict")]
        self.url = base
        self.predict_url = base + "/predict"
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.encoding = encoding
        self.batch_size = batch_size
        self.api_key = api_key
        self.stats = {"requests": 0, "retries": 0, "failures": 0}
        self._lock = threading.Lock()
        self._local = threading.local()  # a requests.Session per thread (sessions are not thread-safe)

    def __repr__(self) -> str:
        return f"RemoteReward({self.predict_url!r}, encoding={self.encoding!r})"

    def __getstate__(self) -> dict[str, Any]:  # picklable (worker processes): no session, no lock
        state = dict(self.__dict__)
        state["_lock"] = state["_local"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._local = threading.Lock(), threading.local()

    # --- the reward ---------------------------------------------------------------------------------

    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any] | None] | None = None
    ) -> Tensor:
        return self.score(images, prompts, metadata)[0]

    def score(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any] | None] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(scores[B], {component: scores[B]})`` (the server's weighted total and each of its
        rewards), float32 on the images' device."""
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"reward {NAME!r}: expected images [B, 3, H, W] in [0, 1], got {shape}")
        count = images.shape[0]
        prompts = [str(p) for p in prompts]
        if len(prompts) != count:
            raise ValueError(f"reward {NAME!r}: {count} images but {len(prompts)} prompts")
        if metadata is not None:
            metadata = list(metadata)
            if len(metadata) != count:
                raise ValueError(f"reward {NAME!r}: {count} images but {len(metadata)} metadata records")
        if count == 0:
            empty = torch.zeros(0, dtype=torch.float32, device=images.device)
            return empty, {}
        size = self.batch_size or count
        scores: list[float] = []
        components: dict[str, list[float]] = {}
        try:
            for start in range(0, count, size):
                stop = min(start + size, count)
                part, part_components = self._score_chunk(
                    images[start:stop], prompts[start:stop], None if metadata is None else metadata[start:stop]
                )
                scores.extend(part)
                if start == 0:
                    components = {name: list(values) for name, values in part_components.items()}
                elif set(part_components) != set(components):
                    raise RemoteRewardError(
                        f"remote reward at {self.predict_url}: its components changed within one call "
                        f"({sorted(components)} then {sorted(part_components)}); was the server restarted?"
                    )
                else:
                    for name, values in part_components.items():
                        components[name].extend(values)
        except Exception:
            self._count("failures")
            raise
        device = images.device
        return (
            torch.tensor(scores, dtype=torch.float32, device=device),
            {name: torch.tensor(values, dtype=torch.float32, device=device) for name, values in components.items()},
        )

    # --- plumbing -----------------------------------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _session(self) -> Any:
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = self._local.session = requests.Session()
            session.headers["Content-Type"] = "application/json"
            if self.api_key:
                session.headers["X-API-Key"] = self.api_key
        return session

    def _body(self, images: Tensor, prompts: list[str], metadata: list[Any] | None) -> bytes:
        try:
            rest = json.dumps({"prompts": prompts, "metadata": metadata}, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"reward {NAME!r}: the metadata records must be JSON-serialisable ({error})") from None
        if self.encoding == "png":
            return (json.dumps(encode_images(images, "png"))[:-1] + ", " + rest[1:]).encode("utf-8")
        import base64

        # The base64 text spliced in as is (JSON-safe): json.dumps would scan megabytes for escapes.
        head = json.dumps({"dtype": self.encoding, "shape": list(images.shape)})[:-1]
        data = base64.b64encode(_raw_bytes(images, self.encoding))
        return b'{"images": ' + head.encode() + b', "data": "' + data + b'"}, ' + rest[1:].encode("utf-8")

    def _score_chunk(
        self, images: Tensor, prompts: list[str], metadata: list[Any] | None
    ) -> tuple[list[float], dict[str, list[float]]]:
        response = self._post(self._body(images, prompts, metadata))
        return self._parse(response, len(prompts))

    def _post(self, body: bytes) -> Any:
        """POST ``body`` to ``/predict``, retrying what may pass; a 2xx response or an exception."""
        import requests

        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                self._count("retries")
                logger.warning("remote reward at %s: %s; retry %d/%d in %.2g s",
                               self.predict_url, last, attempt, self.retries, delay)
                if delay > 0:
                    time.sleep(delay)
            self._count("requests")
            try:
                response = self._session().post(self.predict_url, data=body, timeout=self.timeout)
            except requests.Timeout:
                last = f"no answer within the timeout of {self.timeout:g} s"
                continue
            except requests.RequestException as error:  # refused, reset, dropped mid-answer, ...
                self._local.session = None  # a fresh connection pool next time
                last = f"{type(error).__name__}: {_short(error, 300)}"
                continue
            status = response.status_code
            if 200 <= status < 300:
                return response
            if status in (408, 429) or status >= 500:
                last = f"HTTP {status}: {_detail(response)}"
                continue
            raise RemoteRequestError(
                f"remote reward at {self.predict_url} rejected the request (HTTP {status}): {_detail(response)}"
            )
        raise RemoteRewardError(
            f"remote reward at {self.predict_url}: no answer after {self.retries + 1} attempt(s) "
            f"({self.retries} retries, backoff {self.backoff:g} s); last error: {last}. Is the server "
            "(python -m dgpo_lightning.rewards.serve) running there?"
        )

    def _parse(self, response: Any, count: int) -> tuple[list[float], dict[str, list[float]]]:
        from dgpo_lightning.rewards.serve import decode_scores

        try:
            payload = response.json()
            scores = decode_scores(payload["scores"])
            components = {str(name): decode_scores(values) for name, values in (payload.get("components") or {}).items()}
            if len(scores) != count or any(len(values) != count for values in components.values()):
                raise ValueError(f"{len(scores)} scores for {count} images")
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise RemoteRewardError(
                f"remote reward at {self.predict_url}: not a reward server's answer ({_short(error, 200)}): "
                f"{_short(response.text, 200)}"
            ) from None
        return scores, components

    # --- the server ---------------------------------------------------------------------------------

    def health(self) -> bool:
        """Whether ``GET /health`` answers 200 (the server has built its reward) within the timeout."""
        import requests

        try:
            return self._session().get(self.url + "/health", timeout=self.timeout).status_code == 200
        except requests.RequestException:
            return False

    def info(self) -> dict[str, Any]:
        """``GET /info``'s ``model`` part: the served rewards and weights."""
        import requests

        try:
            response = self._session().get(self.url + "/info", timeout=self.timeout)
            response.raise_for_status()
            return dict(response.json().get("model") or {})
        except (requests.RequestException, ValueError) as error:
            raise RemoteRewardError(f"remote reward at {self.url}/info: {_short(error, 300)}") from None


@register(NAME)
def remote(
    url: str,
    timeout: float = 120.0,
    retries: int = 3,
    backoff: float = 1.0,
    encoding: str = "float32",
    batch_size: int | None = None,
    api_key: str | None = None,
) -> RemoteReward:
    """A client of ``python -m dgpo_lightning.rewards.serve`` at ``url`` (see the module docstring)."""
    return RemoteReward(
        url, timeout=timeout, retries=retries, backoff=backoff, encoding=encoding, batch_size=batch_size, api_key=api_key
    )
