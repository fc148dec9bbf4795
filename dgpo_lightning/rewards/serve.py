"""A reward server: any registered reward (or a weighted set) behind HTTP, on LitServe.

``python -m dgpo_lightning.rewards.serve --reward NAME [--reward NAME2 ...] [--weights JSON]
[--options FILE.yaml] [--host H] [--port P] [--max-batch-size N] [--batch-timeout S] [--device D]``

Serves ``Σ_k w_k · reward_k`` (:func:`~dgpo_lightning.rewards.base.build_weighted`; every weight 1
unless ``--weights '{"geneval": 1, "jpeg_incompressibility": 0.5}'``, inline or a ``.json`` file).
``--options FILE.yaml`` maps reward names to their options, exactly as ``data.reward_options`` in a
training config (a ``kind`` option builds a registered reward under a label of one's own). Training
points at the server with the ``remote`` reward (:mod:`dgpo_lightning.rewards.remote`), the same
contract as any in-process reward::

    reward = rewards.build("remote", url="http://scorer:8000")   # scores [B], NaN kept

A heavy scorer on its own GPU (or machine), training elsewhere::

    # on the scoring GPU / machine (weights load on the first request, on that device)
    CUDA_VISIBLE_DEVICES=1 python -m dgpo_lightning.rewards.serve --reward vlm_judge \\
        --options judge.yaml --host 0.0.0.0 --port 8000 --device cuda --max-batch-size 8

    # in the training config
    data:
      rewards: {remote: 1.0}
      reward_options:
        remote: {url: "http://scorer:8000", timeout: 120, retries: 3, encoding: float32}

Two servers (or one weighted server and one in-process reward) are two labels with ``kind: remote``:
``rewards: {judge: 1.0, geneval: 1.0}``, ``reward_options: {judge: {kind: remote, url: ...}}``.

Endpoints (JSON over HTTP):

* ``POST /predict`` ``{"images": {"dtype": "float32"|"uint8", "shape": [B, 3, H, W], "data":
  <base64 of the raw little-endian array>}`` or ``{"png": [<base64 PNG>, ...]}``, with ``"prompts":
  [B strings]`` and ``"metadata": [B records or null] | null`` → ``{"scores": [B], "components":
  {name: [B]}}``. float32 pixels in ``[0, 1]`` are exact (the default); uint8 (``/255`` on the
  server) and RGB PNG are 4× and more smaller. A non-finite score (a reward that failed on an
  image) is ``null`` for NaN and ``"inf"`` / ``"-inf"`` for infinities, never a number.
  A malformed request is answered 422 ``{"detail": "<field>: <what is wrong>", "errors": [...]}``
  (bad base64, a shape that does not match the data, prompt or metadata counts, a missing field);
  a reward that rejects its input (``ValueError``, e.g. GenEval metadata without clauses) 422 with
  its message; a reward that crashes 500. The client retries 5xx, never 4xx.
* ``GET /health``: 200 ``ok`` once the worker has built the reward, else 503 (LitServe's).
* ``GET /info``: ``{"model": {"rewards": [...], "weights": {...}, ...}, "server": {...}}``
  (LitServe's, with the served rewards and weights; reward options are not shown: they may hold keys).

Batching: up to ``--max-batch-size`` requests (default 8) that arrive within ``--batch-timeout``
seconds (default 0.01) are scored in one reward call per image size, then split back, each request
its own scores (a request the reward rejects is scored alone, so it cannot fail the others): several
training processes' small chunks become one GPU batch. Batching may change a neural reward's scores
in the last bits (other batch shapes), as in-process batching would. LitServe's batching worker polls
its request queue every millisecond, about a fifth of a CPU core while idle; ``--max-batch-size 1``
(one request at a time, no polling) suits a single client that already sends large requests.

Cost (loopback, 2 busy CPU cores): about 10 s from start to ``/health`` 200 (the CLI and LitServe's
spawned worker each import torch; a reward's weights load on its first request); 10-20 ms per request
on top of the scoring for 8 images of 32²; for 16 images of 512², about 2 s in float32 (67 MB of
JSON), 0.7 s in uint8. PNG is the smallest on flat images but slow to encode and decode.

``--device``: ``auto`` (default: the first GPU if any, else the CPU), ``cpu``, ``cuda`` (one GPU),
``cuda:N`` or ``cuda:0,1`` (one worker per listed GPU). ``--host``: LitServe binds ``127.0.0.1``
(default, this machine only), ``0.0.0.0`` or ``::``. With ``LIT_SERVER_API_KEY`` set, requests need
that key in an ``X-API-Key`` header (the client's ``api_key`` option).

Implementation notes. Requests are validated (base64 decoded, PNGs decoded, sizes and counts checked)
by a pydantic model in the HTTP process, before they reach LitServe's batching worker: there a single
exception fails every request of the batch. The server classes subclass LitServe's and are made on
first use (this module is imported by the reward registry, which must stay light), and are module
attributes so that LitServe's spawned worker can unpickle them.
"""

# No ``from __future__ import annotations`` here: FastAPI reads ``decode_request``'s annotation (the
# request model) as a class, and pydantic reads the models' annotations, both at run time.

import argparse
import math
import sys
from typing import Any, Mapping, Sequence

from dgpo_lightning.errors import ShortErrorsParser, UsageError, json_object_option, read_yaml_option

#: Version of the JSON protocol (``/info`` shows it).
PROTOCOL = 1
ENCODINGS = ("float32", "uint8", "png")
_ITEMSIZE = {"float32": 4, "uint8": 1}
_SERVER_CLASSES = ("ImageArray", "ScoreRequest", "RewardAPI")


# --------------------------------------------------------------------------- wire helpers (no heavy imports)


def encode_scores(values: Sequence[float]) -> list[float | str | None]:
    """Scores as JSON values: finite floats as numbers, NaN as ``None``, ±inf as ``"inf"`` / ``"-inf"``."""
    out: list[float | str | None] = []
    for value in values:
        value = float(value)
        if math.isnan(value):
            out.append(None)
        elif math.isinf(value):
            out.append("inf" if value > 0 else "-inf")
        else:
            out.append(value)
    return out


def decode_scores(values: Sequence[Any]) -> list[float]:
    """The inverse of :func:`encode_scores`; anything else raises ``ValueError``."""
    out = []
    for value in values:
        if value is None:
            out.append(math.nan)
        elif value in ("inf", "-inf"):
            out.append(float(value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(float(value))
        else:
            raise ValueError(f"not a score: {value!r}")
    return out


def _b64decode(text: str, field: str) -> bytes:
    import base64
    import binascii

    if not isinstance(text, str):
        raise ValueError(f"{field}: expected a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"{field}: not valid base64 ({error})") from None


def _decode_pngs(items: Sequence[str]) -> tuple[list[int], bytes]:
    """``[B, 3, H, W]`` and the uint8 CHW bytes of B base64 RGB PNGs of one size."""
    import io

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    arrays, size = [], None
    for index, text in enumerate(items):
        field = f"png[{index}]"
        raw = _b64decode(text, field)
        try:
            with Image.open(io.BytesIO(raw)) as image:
                if image.format != "PNG":
                    raise ValueError(f"{field}: a {image.format} image, expected PNG")
                if image.mode != "RGB":
                    raise ValueError(f"{field}: PNG mode {image.mode!r}, expected 'RGB' (8 bits per channel)")
                image.load()
                array = np.asarray(image, dtype=np.uint8)
        except UnidentifiedImageError:
            raise ValueError(f"{field}: not an image file (expected a PNG)") from None
        except (OSError, SyntaxError) as error:  # truncated or corrupt
            raise ValueError(f"{field}: not a readable PNG ({error})") from None
        if size is None:
            size = array.shape[:2]
        elif array.shape[:2] != size:
            raise ValueError(f"{field}: {array.shape[1]}x{array.shape[0]} pixels, png[0] has {size[1]}x{size[0]}")
        arrays.append(array.transpose(2, 0, 1))
    if not arrays:
        raise ValueError("png: needs at least one image")
    stacked = np.ascontiguousarray(np.stack(arrays))
    return list(stacked.shape), stacked.tobytes()


def _format_validation_errors(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """FastAPI/pydantic errors as ``{"field": "images.data", "message": ...}`` (without echoing the input)."""
    out = []
    for error in errors:
        loc = [part for part in error.get("loc", ()) if part != "body"]
        message = str(error.get("msg", "invalid"))
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        if error.get("type") == "json_invalid":
            field, message = "body", f"not valid JSON ({message})"
        else:
            field = ""
            for part in loc:
                field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
        if not field:  # a check across fields: its message starts with the field at fault
            field = message.split(":", 1)[0] if ":" in message else "body"
            message = message.split(":", 1)[1].strip() if ":" in message else message
        out.append({"field": field, "message": message})
    return out


# --------------------------------------------------------------------------- server classes (made on first use)


def __getattr__(name: str) -> Any:
    # PEP 562: the LitServe/pydantic classes exist once asked for, in this process and in LitServe's
    # spawned worker (which unpickles them by name), but importing the module stays light.
    if name in _SERVER_CLASSES:
        _define_server_classes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_server_classes() -> None:
    if "RewardAPI" in globals():
        return
    from typing import Literal

    import litserve as ls
    from pydantic import BaseModel, ConfigDict, model_validator

    class ImageArray(BaseModel):
        """A raw image array: ``data`` is base64 on the wire and the decoded bytes once validated."""

        model_config = ConfigDict(extra="forbid")
        dtype: Literal["float32", "uint8"] = "float32"
        shape: list[int]
        data: str | bytes

    class ScoreRequest(BaseModel):
        """``POST /predict``'s body, checked and decoded (PNGs to a uint8 :class:`ImageArray`)."""

        model_config = ConfigDict(extra="forbid")
        images: ImageArray | None = None
        png: list[str] | None = None
        prompts: list[str]
        metadata: list[dict[str, Any] | None] | None = None

        @model_validator(mode="after")
        def _check(self):
            if (self.images is None) == (self.png is None):
                raise ValueError("images: give exactly one of 'images' (a raw array) and 'png' (a list of base64 PNGs)")
            if self.png is not None:
                shape, data = _decode_pngs(self.png)
                self.images, self.png = ImageArray.model_construct(dtype="uint8", shape=shape, data=data), None
            else:
                shape = self.images.shape
                if len(shape) != 4 or shape[1] != 3 or min(shape) < 1:
                    raise ValueError(f"images.shape: expected [B, 3, H, W] with B, H, W >= 1, got {shape}")
                if isinstance(self.images.data, str):
                    self.images.data = _b64decode(self.images.data, "images.data")
                expected = math.prod(shape) * _ITEMSIZE[self.images.dtype]
                if len(self.images.data) != expected:
                    raise ValueError(
                        f"images.data: {len(self.images.data)} bytes, but images.shape {shape} of "
                        f"{self.images.dtype} needs {expected}"
                    )
            count = self.images.shape[0]
            if len(self.prompts) != count:
                raise ValueError(f"prompts: {len(self.prompts)} prompts for {count} images")
            if self.metadata is not None and len(self.metadata) != count:
                raise ValueError(f"metadata: {len(self.metadata)} records for {count} images (or null for none)")
            return self

        def __repr__(self) -> str:
            # Short: LitServe formats each request into a debug message, wanted or not, and the
            # default repr of megabytes of pixels takes seconds.
            images = self.images
            what = f"{images.dtype} {images.shape}" if images is not None else f"{len(self.png or ())} PNGs"
            return f"ScoreRequest(images={what}, prompts={len(self.prompts)})"

        __str__ = __repr__

    class RewardAPI(ls.LitAPI):
        """Scores decoded requests with ``build_weighted(weights, **options)``, built in the worker."""

        def __init__(self, weights: Mapping[str, float], options: Mapping[str, Mapping[str, Any]], **kwargs: Any):
            super().__init__(**kwargs)
            self.weights = dict(weights)
            self.options = {name: dict(value) for name, value in options.items()}

        def setup(self, device: str) -> None:
            import torch

            from dgpo_lightning.rewards.base import build_weighted

            self.torch_device = torch.device(device)
            self.reward = build_weighted(self.weights, **self.options)

        def decode_request(self, request: ScoreRequest) -> dict[str, Any]:
            import numpy as np
            import torch

            array = request.images
            dtype = np.dtype("<f4") if array.dtype == "float32" else np.dtype(np.uint8)
            pixels = torch.from_numpy(np.frombuffer(array.data, dtype=dtype).reshape(array.shape).copy())
            images = pixels if array.dtype == "float32" else pixels.float() / 255
            return {"images": images, "prompts": list(request.prompts), "metadata": request.metadata}

        def predict(self, x: Any) -> Any:
            # One request when max_batch_size is 1, else a list of them.
            if isinstance(x, dict):
                return self._score_requests([x])[0]
            return self._score_requests(list(x))

        def _score_requests(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
            groups: dict[tuple, list[int]] = {}
            for index, request in enumerate(requests):
                key = (tuple(request["images"].shape[1:]), request["metadata"] is None)
                groups.setdefault(key, []).append(index)
            results: list[Any] = [None] * len(requests)
            for indices in groups.values():
                try:
                    parts = self._score([requests[i] for i in indices])
                except Exception as error:
                    if len(indices) == 1:
                        parts = [_failure(error)]
                    else:  # score each alone: a request the reward rejects does not fail the others
                        parts = []
                        for i in indices:
                            try:
                                parts.extend(self._score([requests[i]]))
                            except Exception as single_error:
                                parts.append(_failure(single_error))
                for i, part in zip(indices, parts):
                    results[i] = part
            return results

        def _score(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
            import torch

            images = torch.cat([r["images"] for r in requests]).to(self.torch_device)
            prompts = [p for r in requests for p in r["prompts"]]
            metadata = None if requests[0]["metadata"] is None else [m for r in requests for m in r["metadata"]]
            components = self.reward.components(images, prompts, metadata, allow_non_finite=True)
            total = self.reward.total(components)
            out, start = [], 0
            for request in requests:
                stop = start + len(request["prompts"])
                out.append(
                    {
                        "scores": total[start:stop].tolist(),
                        "components": {name: values[start:stop].tolist() for name, values in components.items()},
                    }
                )
                start = stop
            return out

        def encode_response(self, output: dict[str, Any]) -> Any:
            if "error" in output:
                from starlette.responses import JSONResponse

                return JSONResponse({"detail": output["error"]}, status_code=output["status"])
            return {
                "scores": encode_scores(output["scores"]),
                "components": {name: encode_scores(values) for name, values in output["components"].items()},
            }

    for cls in (ImageArray, ScoreRequest, RewardAPI):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        globals()[cls.__name__] = cls


def _failure(error: Exception) -> dict[str, Any]:
    """A request's error answer: 422 for a reward that rejects its input (``ValueError``), else 500."""
    import logging

    logger = logging.getLogger(__name__)
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, ValueError):
        logger.warning("reward rejected a request: %s", message)
        return {"error": f"the reward rejected the request: {message}", "status": 422}
    logger.exception("reward failed on a request", exc_info=error)
    return {"error": f"the reward failed: {type(error).__name__}: {message}", "status": 500}


def _install_error_handler(app: Any) -> None:
    """422 answers that name the field and do not echo the (possibly megabytes of) input back."""
    from fastapi.exceptions import RequestValidationError
    from starlette.responses import JSONResponse

    async def handler(request: Any, exc: RequestValidationError) -> JSONResponse:
        errors = _format_validation_errors(exc.errors())
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    app.add_exception_handler(RequestValidationError, handler)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = ShortErrorsParser(
        prog="python -m dgpo_lightning.rewards.serve",
        description="Serve a registered reward (or a weighted set) over HTTP for rewards.build('remote', url=...).",
        allow_abbrev=False,
    )
    parser.add_argument("--reward", action="append", default=None, metavar="NAME", help="reward to serve (repeatable)")
    parser.add_argument(
        "--weights", default=None, help='JSON object {reward: weight} (inline or a .json file; default: every weight 1)'
    )
    parser.add_argument(
        "--options", default=None, metavar="FILE.yaml", help="YAML mapping reward names to their options (as data.reward_options)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default: this machine only), 0.0.0.0 or ::")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests scored together at most (default 8)")
    parser.add_argument(
        "--batch-timeout", type=float, default=0.01, help="seconds to wait for more requests to batch (default 0.01)"
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or cuda:0,1 (a worker per GPU)")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds a request may wait for the worker before a 504 (default 600)"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _weights(names: Sequence[str] | None, text: str | None) -> dict[str, float]:
    given = json_object_option(text, "--weights")
    names = list(dict.fromkeys(names or given))
    if not names:
        raise UsageError("name the reward(s) to serve with --reward NAME (or --weights '{\"NAME\": 1.0}')")
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise UsageError(f"--weights names reward(s) {unknown} that no --reward asks for")
    weights = {}
    for name in names:
        weight = given.get(name, 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise UsageError(f"--weights: {name}={weight!r} must be a finite number")
        weights[name] = float(weight)
    return weights


def _options(path: str | None, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    if not path:
        return {}
    options = read_yaml_option(path, "--options") or {}
    if not isinstance(options, dict) or not all(isinstance(v, dict) or v is None for v in options.values()):
        raise UsageError(f"--options: {path} must map reward names to option mappings (as data.reward_options)")
    unused = sorted(set(options) - set(names))
    if unused:
        raise UsageError(f"--options: {path} has options for reward(s) {unused} that no --reward asks for")
    return {name: dict(value or {}) for name, value in options.items()}


def _accelerator(device: str) -> tuple[str, Any]:
    """LitServe's ``(accelerator, devices)`` for ``--device``."""
    device = device.strip().lower()
    if device in ("auto", "cpu", "cuda", "mps"):
        return device, 1
    if device.startswith("cuda:"):
        try:
            ids = [int(part) for part in device[len("cuda:"):].split(",")]
        except ValueError:
            ids = []
        if ids and min(ids) >= 0:
            return "cuda", ids
    raise UsageError(f"--device {device!r}: use auto, cpu, cuda, cuda:N or cuda:0,1")


def make_server(args: argparse.Namespace) -> Any:
    """The :class:`litserve.LitServer` of the parsed arguments; user errors raise :class:`UsageError`."""
    from dgpo_lightning.rewards.base import build_weighted, reward_kind

    weights = _weights(args.reward, args.weights)
    options = _options(args.options, list(weights))
    if args.max_batch_size < 1:
        raise UsageError(f"--max-batch-size {args.max_batch_size}: must be at least 1")
    if not 0 <= args.batch_timeout < args.timeout:
        raise UsageError(f"--batch-timeout {args.batch_timeout}: must be >= 0 and below --timeout {args.timeout}")
    host = "127.0.0.1" if args.host == "localhost" else args.host
    if host not in ("127.0.0.1", "0.0.0.0", "::"):
        raise UsageError(f"--host {args.host!r}: LitServe binds 127.0.0.1, 0.0.0.0 or ::")
    if not 1024 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must lie in [1024, 65535]")
    accelerator, devices = _accelerator(args.device)
    try:
        # Built here too so that an unknown name or option fails now, in one line; rewards load their
        # weights on first call, so this is cheap. The worker builds its own.
        build_weighted(weights, **options)
    except (ValueError, TypeError) as error:  # TypeError: an option the reward does not take
        raise UsageError(" ".join(str(error).split())) from None

    import litserve as ls

    _define_server_classes()
    api = RewardAPI(weights, options, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)  # noqa: F821
    metadata = {
        "rewards": list(weights),
        "kinds": {name: reward_kind(name, options.get(name)) for name in weights},
        "weights": weights,
        "protocol": PROTOCOL,
        "encodings": list(ENCODINGS),
        "max_batch_size": args.max_batch_size,
        "batch_timeout": args.batch_timeout,
    }
    try:
        server = ls.LitServer(
            api, accelerator=accelerator, devices=devices, timeout=args.timeout, model_metadata=metadata
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    _install_error_handler(server.app)
    server.reward_host, server.reward_port = host, args.port
    return server


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        server = make_server(args)
    except UsageError as error:
        parser.exit(2, "error: " + " ".join(str(error).split()) + "\n")
    shown = "localhost" if server.reward_host in ("0.0.0.0", "::") else server.reward_host
    print(
        f"serving {server.model_metadata['weights']} on http://{shown}:{server.reward_port} "
        "(POST /predict, GET /health, GET /info)",
        flush=True,
    )
    server.run(
        host=server.reward_host,
        port=server.reward_port,
        log_level=args.log_level,
        generate_client_file=False,
        access_log=False,
    )


if __name__ == "__main__":
    # Run from the package module, not ``__main__``: LitServe's spawned worker unpickles the server
    # classes by their module name.
    from dgpo_lightning.rewards import serve as _serve

    _serve.main(sys.argv[1:])
