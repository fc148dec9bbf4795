"""VLM judge: scores images by asking a vision-language model behind an OpenAI-compatible server.

Any server that speaks the chat-completions API with image inputs (vLLM, SGLang, LMDeploy, ...
serving UnifiedReward-Qwen, Qwen2.5-VL, ...) can be the judge. Each image goes in its own request:
one user message holding the image as a base64 PNG data URL (``{"type": "image_url", "image_url":
{"url": "data:image/png;base64,..."}}``) followed by a text prompt built from a template in which
``{prompt}`` is replaced by the caption (plain replacement, so other braces in a template are kept
as they are). The answer's number (or, for DeQA, the rating word's probabilities) becomes the score
``scale * value + offset``. Requests run ``concurrency`` at a time in a thread pool; scores come back
in the order of the images. The client is the official ``openai`` package (created lazily, on the
first call, with ``max_retries=0``): retries are done here, with exponential backoff, and counted in
:attr:`VlmJudgeReward.stats`.

Presets (``preset``), and where each fact comes from:

* ``unified_reward`` (default): the pointwise image-generation scoring prompt of UnifiedReward's own
  example for ``CodeGoat24/UnifiedReward-qwen-7b`` (repository CodeGoat24/UnifiedReward,
  ``inference_qwen/image_generation/qwen_point_score_image_generation.py``): the model rates the
  image's alignment with the caption and its overall quality, lists the caption's key elements as
  ``element (type): 0/1`` and ends with ``Final Score:`` followed by a score from 1 to 5. The value is
  the number after the *last* ``Final Score:`` (case-insensitive, optional markdown ``**``); a value
  outside ``[1, 5]`` is a failure.
* ``unified_reward_flow_grpo``: the shorter variant Flow-GRPO sends to UnifiedReward-7b-v1.5 on an
  SGLang server (repository yifan123/flow_grpo, ``flow_grpo/rewards.py``,
  ``unifiedreward_score_sglang``): the same two criteria without the key-element list, "assign a
  score from 1 to 5 after 'Final Score:'". Flow-GRPO parses ``Final Score:\\s*([1-5](?:\\.\\d+)?)``,
  resizes images to 512x512 and divides the score by 5 (``image_size=[512, 512], scale=0.2``
  reproduce that here); its text also starts with LLaVA's ``<image>\\n`` placeholder, left out here
  because the image travels as an ``image_url`` part. Unlike Flow-GRPO, which scores an unparsable
  answer 0, an unparsable answer here is a reported failure (see below).
* ``deqa``: DeQA-Score (``zhiyuanyou/DeQA-Score-Mix3``; repository zhiyuanyou/DeQA-Score,
  ``src/evaluate/scorer.py``) asks "How would you rate the quality of this image?", forces the
  answer to begin with "The quality of the image is" and takes the expectation of the levels
  excellent/good/fair/poor/bad = 5/4/3/2/1 under the softmax of those five words' logits at the next
  position (it also pads the image to a square with the processor's mean colour; behind a server,
  the server's image preprocessing applies instead). Through a
  chat-completions server this preset requests ``logprobs=True, top_logprobs=20`` and, at the first
  generated token that is one of the five words (case and surrounding spaces/punctuation ignored),
  takes ``Σ v·p / Σ p`` over the five words' probabilities among that position's top log-probs
  (variants such as ``" good"`` and ``"Good"`` add up). This equals DeQA-Score's number when the
  server reports the model's unprocessed log-probabilities (vLLM: ``logprobs_mode`` ``raw_logprobs``,
  values before any logits processor) and all five words are among the top ``top_logprobs``; a word
  outside them counts as probability 0. Words that the tokenizer splits into several tokens are not
  matched (DeQA-Score itself uses each word's first token). When the
  server returns no log-probabilities (or none at a rating word), the score falls back to the value of
  the first rating word in the answer's text, a coarser 1..5 integer, and the reward warns once.
  ``assistant_prefix="The quality of the image is"`` prefills the assistant's answer as DeQA-Score
  does, through vLLM's ``continue_final_message`` extension (sent with ``add_generation_prompt:
  false`` in ``extra_body``; other servers may ignore or reject it). Note: DeQA-Score-Mix3 is an
  mPLUG-Owl2 model; whether a given server can serve it is up to that server. The preset works with
  any judge that answers with one of the five words (Q-Align-style models, a custom wrapper).
* ``score_1_10``: a generic prompt of this project (not from a model card) for instruction-tuned VLMs
  such as Qwen2.5-VL: rate alignment with the caption and overall quality from 1 to 10 and end with a
  line ``Score: X``; the value is the number after the last ``Score:`` and must lie in ``[1, 10]``.

``template`` replaces the preset's prompt; ``parse`` replaces its parser: a regular expression with
exactly one capturing group (the number; the last match counts, so an answer that restates the
instructions first still ends with its verdict) or a callable ``answer_text -> float``. With a
custom ``parse`` the preset's range check and log-probability expectation are off, unless
``score_range`` / ``logprobs`` say otherwise.

Failures are never silent zeros. With ``on_error="nan"`` (default):

* an image whose answer cannot be parsed (no match, a value out of range, an empty answer), or whose
  request fails for good (HTTP 4xx, or 5xx / 429 / timeouts after ``retries`` retries), scores NaN,
  and one warning per call names the reward, the preset, the URL and, for each failed image, its index,
  its prompt and the error or the (truncated) answer. NaN scores are kept by
  ``WeightedReward.components(..., allow_non_finite=True)``, so ``generate_groups`` warns again and
  drops the groups they hit (dgpo_lightning/data/rollout.py);
* if every image of a call fails, or the server cannot be reached at all (connection refused /
  unresolvable after the retries: the call stops at once, later images are not tried), the call
  raises ``RuntimeError`` naming the URL and the last error: a dead or misconfigured judge stops the
  run rather than dropping every group.

With ``on_error="raise"`` the first failure of any kind raises ``RuntimeError``.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
import re
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit

import torch
import torch.nn.functional as F
from torch import Tensor

from dgpo_lightning.rewards.base import check_images, register

logger = logging.getLogger(__name__)

NAME = "vlm_judge"

#: DeQA-Score's rating levels and their values.
DEQA_LEVELS: dict[str, float] = {"excellent": 5.0, "good": 4.0, "fair": 3.0, "poor": 2.0, "bad": 1.0}

_CRITERIA = (
    "You are given a text caption and a generated image based on that caption. Your task is to evaluate "
    "this image based on two key criteria:\n"
    "1. Alignment with the Caption: Assess how well this image aligns with the provided caption. Consider "
    "the accuracy of depicted objects, their relationships, and attributes as described in the caption.\n"
    "2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\n"
)
_CAPTION = "Your task is provided as follows:\nText Caption: [{prompt}]"

#: UnifiedReward's pointwise image-generation prompt (UnifiedReward-qwen example, see module docstring).
UNIFIED_REWARD_TEMPLATE = (
    _CRITERIA
    + "Extract key elements from the provided text caption, evaluate their presence in the generated image "
    "using the format: 'element (type): value' (where value=0 means not generated, and value=1 means "
    "generated), and assign a score from 1 to 5 after 'Final Score:'.\n"
    + _CAPTION
)
#: Flow-GRPO's shorter UnifiedReward prompt (without LLaVA's ``<image>`` placeholder).
UNIFIED_REWARD_FLOW_GRPO_TEMPLATE = (
    _CRITERIA + "Based on the above criteria, assign a score from 1 to 5 after 'Final Score:'.\n" + _CAPTION
)
#: DeQA-Score's question.
DEQA_TEMPLATE = "How would you rate the quality of this image?"
#: This project's generic 1-10 judge prompt.
SCORE_1_10_TEMPLATE = (
    "You are given a text caption and an image generated from it. Rate the image on a scale from 1 "
    "(worst) to 10 (best), considering both how faithfully it depicts the caption (objects, counts, "
    "attributes, relations, text) and its overall visual quality (clarity, detail, artifacts, "
    "aesthetics). Give a brief justification, then end with a last line of the form 'Score: X', where "
    "X is a number from 1 to 10.\nCaption: {prompt}"
)

_NUMBER = r"([-+]?\d+(?:\.\d+)?)"


@dataclass(frozen=True)
class Preset:
    """A judge prompt and how to read its answer."""

    template: str
    pattern: str | None  # regex with one group; None: rating words
    score_range: tuple[float, float] | None
    max_tokens: int
    rating_words: Mapping[str, float] | None = None  # word -> value (expectation from log-probs)


PRESETS: dict[str, Preset] = {
    "unified_reward": Preset(UNIFIED_REWARD_TEMPLATE, r"(?i)final\s+score\s*:\s*\**\s*" + _NUMBER, (1.0, 5.0), 1024),
    "unified_reward_flow_grpo": Preset(
        UNIFIED_REWARD_FLOW_GRPO_TEMPLATE, r"(?i)final\s+score\s*:\s*\**\s*" + _NUMBER, (1.0, 5.0), 1024
    ),
    "deqa": Preset(DEQA_TEMPLATE, None, (1.0, 5.0), 32, rating_words=DEQA_LEVELS),
    "score_1_10": Preset(SCORE_1_10_TEMPLATE, r"(?i)score\s*:\s*\**\s*" + _NUMBER, (1.0, 10.0), 512),
}


class JudgeAnswerError(ValueError):
    """The judge answered, but no score could be read from the answer."""


def _compile_pattern(pattern: str) -> re.Pattern[str]:
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{NAME}: parse={pattern!r} is not a valid regular expression: {error}") from error
    if compiled.groups != 1:
        raise ValueError(
            f"{NAME}: parse={pattern!r} must have exactly one capturing group (the score), has {compiled.groups}"
        )
    return compiled


def parse_number(text: str, pattern: re.Pattern[str]) -> float:
    """The number captured by the last match of ``pattern`` in ``text``; :class:`JudgeAnswerError` if none."""
    matches = list(pattern.finditer(text))
    if not matches:
        raise JudgeAnswerError(f"no match for {pattern.pattern!r}")
    raw = matches[-1].group(1)
    try:
        return float(raw)
    except (TypeError, ValueError) as error:
        raise JudgeAnswerError(f"{raw!r} (matched by {pattern.pattern!r}) is not a number") from error


def _normalise_word(token: str) -> str:
    return token.strip().strip(".,;:!?\"'*()[]").lower()


def rating_expectation(token_logprobs: Sequence[Any], levels: Mapping[str, float]) -> float | None:
    """``Σ v·p / Σ p`` over the rating words at the first generated token that is a rating word.

    ``token_logprobs`` is the chat completion's ``choices[0].logprobs.content``: items with ``token``,
    ``logprob`` and ``top_logprobs`` (items with ``token`` and ``logprob``). Probabilities of tokens that
    normalise to the same word add up; the sampled token counts too if it is missing from the top list.
    ``None`` when no generated token is a rating word.
    """
    for item in token_logprobs or ():
        if _normalise_word(_field(item, "token") or "") not in levels:
            continue
        candidates: dict[str, float] = {}
        for top in _field(item, "top_logprobs") or ():
            candidates[_field(top, "token")] = float(_field(top, "logprob"))
        candidates.setdefault(_field(item, "token"), float(_field(item, "logprob")))
        mass: dict[str, float] = {}
        for token, logprob in candidates.items():
            word = _normalise_word(token or "")
            if word in levels and math.isfinite(logprob):
                mass[word] = mass.get(word, 0.0) + math.exp(logprob)
        total = sum(mass.values())
        if total <= 0:
            return None
        return sum(levels[word] * p for word, p in mass.items()) / total
    return None


def rating_from_text(text: str, levels: Mapping[str, float]) -> float:
    """The value of the first rating word in ``text``; :class:`JudgeAnswerError` if there is none."""
    pattern = r"\b(" + "|".join(re.escape(word) for word in levels) + r")\b"
    match = re.search(pattern, text, flags=re.IGNORECASE)
    if match is None:
        raise JudgeAnswerError(f"none of the rating words {list(levels)} in the answer")
    return float(levels[match.group(1).lower()])


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def _normalise_base_url(base_url: str) -> str:
    url = str(base_url).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{NAME}: base_url={base_url!r} must be an http(s) URL such as http://127.0.0.1:8000/v1")
    return url if parts.path not in ("", "/") else url + "/v1"


def _truncate(text: Any, limit: int = 200) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def resize_longest_side(images: Tensor, image_size: int | Sequence[int] | None) -> Tensor:
    """``images`` resized (bicubic, antialiased) so that the longest side is ``image_size`` (aspect kept),
    or to exactly ``(H, W)`` for a pair; unchanged for ``None`` or when the size already matches."""
    if image_size is None:
        return images
    h, w = images.shape[-2:]
    if isinstance(image_size, int):
        ratio = image_size / max(h, w)
        target = (max(1, round(h * ratio)), max(1, round(w * ratio)))
    else:
        target = (int(image_size[0]), int(image_size[1]))
    if (h, w) == target:
        return images
    return F.interpolate(images.float(), size=target, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def png_data_url(image: Tensor) -> str:
    """``[3, H, W]`` in ``[0, 1]`` → ``data:image/png;base64,...`` (8-bit RGB, rounded)."""
    from PIL import Image

    levels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = levels.permute(1, 2, 0).contiguous().cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array, "RGB").save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class _Failure:
    index: int
    kind: str  # "answer", "request" or "connection"
    message: str
    answer: str | None = None


class _Aborted(Exception):
    pass


class VlmJudgeReward:
    """Scores each image with a VLM judge behind an OpenAI-compatible chat-completions endpoint.

    See the module docstring for presets, parsing and failure handling; :func:`vlm_judge` documents the
    options. :attr:`stats` counts ``requests`` (HTTP attempts, the model listing included), ``retries``,
    ``failures`` (images that got NaN or raised) and ``text_fallbacks`` (rating-word answers scored
    without log-probabilities).
    """

    def __init__(
        self,
        base_url: str,
        model: str | None,
        api_key: str,
        preset: str,
        template: str,
        parser: Callable[[str], float] | re.Pattern[str] | None,
        rating_words: Mapping[str, float] | None,
        logprobs: bool,
        top_logprobs: int,
        score_range: tuple[float, float] | None,
        scale: float,
        offset: float,
        temperature: float,
        max_tokens: int,
        concurrency: int,
        timeout: float,
        retries: int,
        backoff: float,
        image_size: int | Sequence[int] | None,
        on_error: str,
        assistant_prefix: str | None,
        extra_body: Mapping[str, Any] | None,
    ):
        self.base_url = base_url
        self.model = model
        self.api_key = api_key
        self.preset = preset
        self.template = template
        self.parser = parser
        self.rating_words = dict(rating_words) if rating_words else None
        self.logprobs = bool(logprobs)
        self.top_logprobs = int(top_logprobs)
        self.score_range = score_range
        self.scale = float(scale)
        self.offset = float(offset)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.image_size = image_size
        self.on_error = on_error
        self.assistant_prefix = assistant_prefix
        self.extra_body = dict(extra_body or {})
        if assistant_prefix is not None:
            self.extra_body = {"continue_final_message": True, "add_generation_prompt": False, **self.extra_body}
        self.stats = {"requests": 0, "retries": 0, "failures": 0, "text_fallbacks": 0}
        self._lock = threading.Lock()
        self._client: Any = None
        self._warned_fallback = False

    # --- plumbing -----------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        return f"reward {NAME!r} (preset {self.preset!r}, {self.base_url})"

    def __getstate__(self) -> dict[str, Any]:  # picklable for reward servers / worker processes
        state = dict(self.__dict__)
        state["_client"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                import openai

                self._client = openai.OpenAI(
                    base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=0
                )
            return self._client

    @staticmethod
    def _is_retryable(error: BaseException) -> bool:
        import openai

        if isinstance(error, openai.APIConnectionError):  # includes APITimeoutError
            return True
        if isinstance(error, openai.APIStatusError):
            return error.status_code in (408, 429) or error.status_code >= 500
        return False

    @staticmethod
    def _is_unreachable(error: BaseException) -> bool:
        import openai

        return isinstance(error, openai.APIConnectionError) and not isinstance(error, openai.APITimeoutError)

    def _with_retries(self, send: Callable[[], Any], abort: threading.Event | None = None) -> Any:
        """``send()``, retried ``retries`` times on connection errors, timeouts, 408/429 and 5xx, after
        ``backoff · 2^k`` seconds (k = 0, 1, ...). Other errors are raised at once."""
        attempt = 0
        while True:
            if abort is not None and abort.is_set():
                raise _Aborted()
            self._count("requests")
            try:
                return send()
            except Exception as error:
                if not self._is_retryable(error) or attempt >= self.retries:
                    raise
                delay = self.backoff * 2**attempt
                attempt += 1
                self._count("retries")
                logger.warning(
                    "%s: %s; retry %d/%d in %.2g s", self.label, _describe(error), attempt, self.retries, delay
                )
                if abort is not None:
                    if abort.wait(delay):
                        raise _Aborted() from error
                elif delay > 0:
                    time.sleep(delay)

    def _resolve_model(self) -> str:
        if self.model is None:
            client = self._get_client()
            try:
                listing = self._with_retries(lambda: client.models.list())
                names = [m.id for m in listing.data]
            except Exception as error:
                raise RuntimeError(
                    f"{self.label}: could not list the served models at {self.base_url}/models to pick one "
                    f"(pass model=...): {_describe(error)}"
                ) from error
            if not names:
                raise RuntimeError(f"{self.label}: the server at {self.base_url} serves no model (pass model=...)")
            with self._lock:
                if self.model is None:
                    self.model = names[0]
                    if len(names) > 1:
                        logger.warning("%s: the server serves %s; using %r", self.label, names, self.model)
        return self.model

    # --- one image ----------------------------------------------------------------------------------

    def _messages(self, image: Tensor, prompt: str) -> list[dict[str, Any]]:
        text = self.template.replace("{prompt}", str(prompt))
        messages: list[dict[str, Any]] = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url(image)}},
                    {"type": "text", "text": text},
                ],
            }
        ]
        if self.assistant_prefix is not None:
            messages.append({"role": "assistant", "content": self.assistant_prefix})
        return messages

    def _value(self, text: str, choice: Any) -> float:
        """The judge's number for one answer (before ``scale``/``offset``)."""
        if self.rating_words is not None:
            value = None
            if self.logprobs:
                logprobs = _field(choice, "logprobs")
                content = _field(logprobs, "content") if logprobs is not None else None
                value = rating_expectation(content or (), self.rating_words) if content else None
            if value is None:
                value = rating_from_text(text, self.rating_words)
                if self.logprobs:
                    self._count("text_fallbacks")
                    if not self._warned_fallback:
                        self._warned_fallback = True
                        warnings.warn(
                            f"{self.label}: the answer carries no log-probabilities at a rating word; scoring "
                            "by the rating word itself (integer 1..5) instead of DeQA-Score's expectation "
                            "(does the server support logprobs/top_logprobs?)",
                            stacklevel=2,
                        )
        elif isinstance(self.parser, re.Pattern):
            value = parse_number(text, self.parser)
        else:
            try:
                value = float(self.parser(text))
            except JudgeAnswerError:
                raise
            except Exception as error:
                raise JudgeAnswerError(f"parse raised {type(error).__name__}: {error}") from error
        if not math.isfinite(value):
            raise JudgeAnswerError(f"parsed a non-finite value {value}")
        if self.score_range is not None and not (self.score_range[0] <= value <= self.score_range[1]):
            raise JudgeAnswerError(f"value {value:g} outside [{self.score_range[0]:g}, {self.score_range[1]:g}]")
        return value

    def _score_one(
        self, index: int, image: Tensor, prompt: str, model: str, abort: threading.Event
    ) -> float | _Failure:
        import openai

        kwargs: dict[str, Any] = {
            "model": model,
            "messages": self._messages(image, prompt),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.logprobs:
            kwargs.update(logprobs=True, top_logprobs=self.top_logprobs)
        if self.extra_body:
            kwargs["extra_body"] = dict(self.extra_body)
        client = self._get_client()
        try:
            response = self._with_retries(lambda: client.chat.completions.create(**kwargs), abort)
        except openai.APIError as error:
            kind = "connection" if self._is_unreachable(error) else "request"
            if kind == "connection" or self.on_error == "raise":
                abort.set()  # fatal: the other workers stop before their next attempt
            return _Failure(index, kind, _describe(error))
        choices = _field(response, "choices") or []
        if not choices:
            if self.on_error == "raise":
                abort.set()
            return _Failure(index, "answer", "the response has no choices", answer=_truncate(response))
        choice = choices[0]
        message = _field(choice, "message")
        text = (_field(message, "content") if message is not None else None) or ""
        try:
            value = self._value(text, choice)
        except JudgeAnswerError as error:
            reason = str(error)
            finish = _field(choice, "finish_reason")
            if finish not in (None, "stop"):
                reason += f" (finish_reason={finish!r}; max_tokens={self.max_tokens})"
            if self.on_error == "raise":
                abort.set()
            return _Failure(index, "answer", reason, answer=_truncate(text))
        return self.scale * value + self.offset

    # --- the batch ----------------------------------------------------------------------------------

    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any] | None] | None = None
    ) -> Tensor:
        check_images(NAME, images, prompts)
        count = images.shape[0]
        if count == 0:
            return torch.zeros(0, device=images.device)
        pixels = resize_longest_side(images.detach(), self.image_size).float().cpu()
        model = self._resolve_model()
        scores = [math.nan] * count
        failures: list[_Failure] = []
        fatal: _Failure | None = None
        abort = threading.Event()
        executor = ThreadPoolExecutor(max_workers=min(self.concurrency, count), thread_name_prefix="vlm-judge")
        try:
            index_of = {
                executor.submit(self._score_one, i, pixels[i], str(prompts[i]), model, abort): i for i in range(count)
            }
            pending = set(index_of)
            while pending and fatal is None:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    try:
                        result = future.result()
                    except _Aborted:
                        continue
                    if isinstance(result, _Failure):
                        failures.append(result)
                        if fatal is None and (result.kind == "connection" or self.on_error == "raise"):
                            fatal = result
                            abort.set()  # queued images are not sent, retry waits end
                    else:
                        scores[index_of[future]] = result
        finally:
            abort.set()
            executor.shutdown(wait=True, cancel_futures=True)
        if failures:
            self._count("failures", count if fatal is not None else len(failures))
        if fatal is not None:
            what = "cannot be reached" if fatal.kind == "connection" else "failed"
            raise RuntimeError(
                f"{self.label}: the judge {what} at {self.base_url} (image {fatal.index}, prompt "
                f"{_truncate(prompts[fatal.index], 80)!r}): {fatal.message}"
                + (f"; answer: {fatal.answer!r}" if fatal.answer is not None else "")
            )
        if len(failures) == count:
            last = failures[-1]
            raise RuntimeError(
                f"{self.label}: all {count} image(s) failed at {self.base_url}; last error (image {last.index}): "
                f"{last.message}" + (f"; answer: {last.answer!r}" if last.answer is not None else "")
            )
        if failures:
            failures.sort(key=lambda f: f.index)
            shown = "; ".join(
                f"[{f.index}] prompt {_truncate(prompts[f.index], 80)!r}: {f.message}"
                + (f"; answer: {f.answer!r}" if f.answer is not None else "")
                for f in failures[:5]
            )
            more = f"; and {len(failures) - 5} more" if len(failures) > 5 else ""
            warnings.warn(
                f"{self.label}: {len(failures)} of {count} image(s) could not be scored and get NaN "
                f"(rollouts drop their groups): {shown}{more}",
                stacklevel=2,
            )
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


def _describe(error: BaseException) -> str:
    status = getattr(error, "status_code", None)
    text = f"{type(error).__name__}: {error}"
    if status is not None and str(status) not in text:
        text = f"HTTP {status} {text}"
    return _truncate(text, 300)


@register(NAME)
def vlm_judge(
    base_url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    preset: str = "unified_reward",
    template: str | None = None,
    parse: str | Callable[[str], float] | None = None,
    scale: float = 1.0,
    offset: float = 0.0,
    score_range: Sequence[float] | bool | None = None,
    logprobs: bool | None = None,
    top_logprobs: int = 20,
    temperature: float = 0.0,
    max_tokens: int | None = None,
    concurrency: int = 8,
    timeout: float = 120.0,
    retries: int = 3,
    backoff: float = 1.0,
    image_size: int | Sequence[int] | None = None,
    on_error: str = "nan",
    assistant_prefix: str | None = None,
    extra_body: Mapping[str, Any] | None = None,
) -> VlmJudgeReward:
    """A VLM judge on an OpenAI-compatible chat-completions server (see the module docstring).

    Args:
        base_url: the server's OpenAI API root, e.g. ``http://127.0.0.1:8000/v1`` (required; a URL with
            no path gets ``/v1``).
        model: the served model name; ``None`` asks the server (``GET /models``) and takes the first.
        api_key: sent as the bearer token; default ``$OPENAI_API_KEY``, else ``"EMPTY"`` (vLLM/SGLang
            without ``--api-key`` accept anything).
        preset: ``unified_reward``, ``unified_reward_flow_grpo``, ``deqa`` or ``score_1_10``.
        template: the text prompt, ``{prompt}`` replaced by the caption; default: the preset's.
        parse: a regex with one capturing group (the number, last match) or a callable
            ``answer -> float``; default: the preset's parser.
        scale, offset: the score is ``scale * value + offset``.
        score_range: ``[lo, hi]``: a value outside is a failure; default: the preset's range, or none
            with a custom ``parse``; ``False`` turns the check off.
        logprobs: request token log-probabilities (rating-word presets: the DeQA expectation);
            default: on for ``deqa`` unless ``parse`` is given.
        top_logprobs: how many alternatives per token the server returns (vLLM's default cap is 20).
        temperature: sampling temperature (0: greedy, deterministic scores).
        max_tokens: answer length limit; default: the preset's (1024 UnifiedReward, 32 DeQA, 512 1-10).
        concurrency: requests in flight at once (a thread pool per call).
        timeout: seconds per request (the HTTP client's connect/read/write limits).
        retries: retries per request on connection errors, timeouts, HTTP 408/429/5xx.
        backoff: the first retry waits ``backoff`` seconds, then ``2x`` more each time.
        image_size: resize (bicubic, antialiased) before encoding: an int is the longest side (aspect
            kept), a pair ``[H, W]`` an exact size; default: images are sent as they are.
        on_error: ``"nan"`` (failed images score NaN with a warning; all failing raises) or
            ``"raise"`` (any failure raises ``RuntimeError``).
        assistant_prefix: prefill the assistant's answer (vLLM ``continue_final_message``), e.g.
            ``"The quality of the image is"`` for DeQA-Score.
        extra_body: extra JSON fields for the server (e.g. vLLM's ``top_k``, ``mm_processor_kwargs``).
    """
    if not base_url:
        raise ValueError(
            f"{NAME}: pass base_url=<the OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1> "
            "(a vLLM or SGLang server running the judge model)"
        )
    if preset not in PRESETS:
        raise ValueError(f"{NAME}: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if on_error not in ("nan", "raise"):
        raise ValueError(f"{NAME}: on_error must be 'nan' or 'raise', got {on_error!r}")
    integers = (("concurrency", concurrency, 1), ("retries", retries, 0), ("top_logprobs", top_logprobs, 0))
    for option, value, low in integers:
        if int(value) != value or value < low:
            raise ValueError(f"{NAME}: {option} must be an integer >= {low}, got {value!r}")
    if not (math.isfinite(float(timeout)) and float(timeout) > 0):
        raise ValueError(f"{NAME}: timeout must be a positive number of seconds, got {timeout!r}")
    if not (math.isfinite(float(backoff)) and float(backoff) >= 0):
        raise ValueError(f"{NAME}: backoff must be a non-negative number of seconds, got {backoff!r}")
    if image_size is not None:
        sizes = [image_size] if isinstance(image_size, int) else list(image_size)
        if len(sizes) not in (1, 2) or any(isinstance(s, bool) or int(s) != s or s < 1 for s in sizes):
            raise ValueError(f"{NAME}: image_size must be a positive int (longest side) or [H, W], got {image_size!r}")
        image_size = int(sizes[0]) if len(sizes) == 1 else (int(sizes[0]), int(sizes[1]))
    chosen = PRESETS[preset]
    if parse is None:
        parser: Any = _compile_pattern(chosen.pattern) if chosen.pattern is not None else None
        rating_words = chosen.rating_words
        default_range = chosen.score_range
    else:
        parser = _compile_pattern(parse) if isinstance(parse, str) else parse
        if not isinstance(parser, re.Pattern) and not callable(parser):
            raise ValueError(f"{NAME}: parse must be a regex string or a callable, got {type(parse).__name__}")
        rating_words = None
        default_range = None
    if score_range is None or score_range is True:
        resolved_range = default_range
    elif score_range is False or len(score_range) == 0:
        resolved_range = None
    else:
        if len(score_range) != 2 or not float(score_range[0]) <= float(score_range[1]):
            raise ValueError(f"{NAME}: score_range must be [lo, hi] with lo <= hi, got {score_range!r}")
        resolved_range = (float(score_range[0]), float(score_range[1]))
    use_logprobs = (rating_words is not None) if logprobs is None else bool(logprobs)
    return VlmJudgeReward(
        base_url=_normalise_base_url(base_url),
        model=model,
        api_key=api_key if api_key is not None else os.environ.get("OPENAI_API_KEY") or "EMPTY",
        preset=preset,
        template=chosen.template if template is None else str(template),
        parser=parser,
        rating_words=rating_words,
        logprobs=use_logprobs,
        top_logprobs=top_logprobs,
        score_range=resolved_range,
        scale=scale,
        offset=offset,
        temperature=temperature,
        max_tokens=chosen.max_tokens if max_tokens is None else max_tokens,
        concurrency=concurrency,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        image_size=image_size,
        on_error=on_error,
        assistant_prefix=assistant_prefix,
        extra_body=extra_body,
    )
