"""peft LoRA on a denoiser: add, switch to the reference (adapter disabled), fold, save and load.

The reference model of LoRA training is the same network with its adapter disabled, so no second
copy of the weights is kept (:func:`reference_mode`). Adapters are injected in place, so the
backbone keeps pointing at the same ``denoiser`` object.

Two on-disk formats:

* Denoisers of a diffusers pipeline with a backbone here (SD3, FLUX.1, Qwen-Image, ...) are saved
  with that pipeline class's own ``save_lora_weights`` (``pytorch_lora_weights.safetensors``, keys
  prefixed ``transformer.``, the ``LoraConfig`` stored as adapter metadata so that ``lora_alpha``
  survives), which a plain pipeline reads with ``pipe.load_lora_weights(directory)``.
* Any other denoiser (e.g. the embedded world's network) is saved in peft's own layout
  (``adapter_model.safetensors`` + ``adapter_config.json``).

:func:`load_lora` reads both.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

#: The official DGPO recipe's targets on SD3 (rank 64, alpha 128): every projection of the joint
#: attention, image stream (``to_*``) and text stream (``add_*``, ``to_add_out``). Also the default
#: for denoisers without a backbone class of their own (the embedded world's).
SD3_TARGET_MODULES: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
DEFAULT_RANK = 64  # official recipe: rank 64, alpha 128
DEFAULT_ADAPTER = "default"
_DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
_PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_CONFIG = "adapter_config.json"


def _denoiser(model: nn.Module) -> nn.Module:
    # Accept a backbone (anything with ``.denoiser``) or the denoiser itself.
    return getattr(model, "denoiser", model)


def _has_module(model: nn.Module, target: str) -> bool:
    return any(name == target or name.endswith("." + target) for name, _ in model.named_modules())


def resolve_target_modules(denoiser: nn.Module, target_modules: Sequence[str] | None = None) -> list[str]:
    """The requested target names (default :data:`SD3_TARGET_MODULES`; backbones name their own
    in ``lora_targets``, which the Lightning module passes) that ``denoiser`` has.

    Names are matched like peft does: a module whose qualified name equals or ends with
    ``"." + target``. Missing names are skipped (SD3's last block has no ``to_add_out``; a UNet has no
    ``add_*_proj``); an error is raised only when nothing matches.
    """
    requested = list(target_modules) if target_modules else list(SD3_TARGET_MODULES)
    present = [t for t in requested if _has_module(denoiser, t)]
    if not present:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in denoiser.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"none of the LoRA targets {requested} exists in {type(denoiser).__name__}; "
            f"its linear layers are named {linear[:20]}"
        )
    return present


def add_lora(
    denoiser: nn.Module,
    rank: int = DEFAULT_RANK,
    alpha: float | None = None,
    target_modules: Sequence[str] | None = None,
    *,
    init: str | bool = "gaussian",
    adapter_name: str = DEFAULT_ADAPTER,
    trainable_dtype: torch.dtype | None = torch.float32,
):
    """Inject a LoRA adapter into ``denoiser`` in place and make only its weights trainable.

    Args:
        denoiser: a diffusers model (uses its ``add_adapter``) or any ``nn.Module`` (peft's
            ``inject_adapter_in_model``).
        rank: LoRA rank ``r``.
        alpha: ``lora_alpha``; the update is scaled by ``alpha / r``. ``None``: ``2 * rank``
            (the official recipe: 64 / 128).
        target_modules: module names to adapt (see :func:`resolve_target_modules`).
        init: peft's ``init_lora_weights`` (``"gaussian"``: A ~ N(0, 1/r), B = 0, as the official
            code; the adapted model starts equal to the base either way).
        adapter_name: peft adapter name.
        trainable_dtype: dtype of the LoRA weights (fp32 by default, so a bf16 base trains stable
            adapters, as the official code does); ``None`` keeps the base dtype.

    Returns:
        The ``LoraConfig`` used.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = resolve_target_modules(denoiser, target_modules)
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha) if alpha is not None else 2.0 * rank,
        target_modules=targets,
        init_lora_weights=init,
    )
    denoiser.requires_grad_(False)
    if callable(getattr(denoiser, "add_adapter", None)) and hasattr(denoiser, "_hf_peft_config_loaded"):
        denoiser.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, denoiser, adapter_name=adapter_name)
    for name, param in denoiser.named_parameters():
        is_lora = ".lora_" in name and f".{adapter_name}." in name
        param.requires_grad_(is_lora)
        if is_lora and trainable_dtype is not None:
            param.data = param.data.to(trainable_dtype)
    return config


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """peft tuner layers inside ``model`` (or a backbone's denoiser)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in _denoiser(model).modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` (or a backbone's denoiser) carries peft adapters."""
    return bool(lora_layers(model))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (after :func:`add_lora`: exactly the LoRA weights)."""
    return [p for p in _denoiser(model).parameters() if p.requires_grad]


@contextmanager
def reference_mode(denoiser: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the adapters are disabled: ``denoiser`` computes the reference (base) model.

    Nothing is copied. ``requires_grad`` flags and the previous enabled/disabled state of each layer
    are restored on exit (peft's own toggle would otherwise leave adapters frozen or unfrozen).
    """
    layers = lora_layers(denoiser)
    if not layers:
        raise ValueError(f"{type(_denoiser(denoiser)).__name__} has no LoRA adapter: call add_lora first")
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    was_disabled = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield denoiser
    finally:
        for layer, disabled in zip(layers, was_disabled):
            layer.enable_adapters(not disabled)
        for param, flag in flags:
            param.requires_grad_(flag)


@torch.no_grad()
def fold_lora(denoiser: nn.Module) -> None:
    """Add the active adapters' updates ``(alpha/r)·B·A`` into the base weights and zero ``B``.

    The online model is unchanged; the reference (adapter disabled) becomes the current online
    model. Used by reference-switching schedules with LoRA.
    """
    for layer in lora_layers(denoiser):
        if getattr(layer, "merged", False):
            raise RuntimeError("fold_lora on a merged LoRA layer: unmerge it first")
        for name in layer.active_adapters:
            if name not in getattr(layer, "lora_A", {}):
                continue
            base = layer.get_base_layer()
            base.weight.add_(layer.get_delta_weight(name).to(base.weight.dtype))
            layer.lora_B[name].weight.zero_()


def lora_state_dict(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """peft's state dict of one adapter (keys without the adapter name)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(_denoiser(model), adapter_name=adapter_name)


def _lora_pipeline(model: nn.Module):
    """The diffusers pipeline class that writes and reads the LoRA of ``model`` (a diffusers
    backbone names it in ``pipeline_class``; ``None``, e.g. for a bare denoiser: peft's format)."""
    name = getattr(model, "pipeline_class", None)
    if not name:
        return None
    import diffusers

    return getattr(diffusers, name)


def save_lora(model: nn.Module, directory: str | Path, adapter_name: str = DEFAULT_ADAPTER) -> Path:
    """Save the adapter of ``model`` (a backbone or a denoiser) to ``directory``.

    Diffusers backbones (SD3, FLUX.1, ...) are written in their pipeline's LoRA format
    (``pipe.load_lora_weights(directory)`` loads them); other networks, and bare denoisers, in
    peft's format. Returns
    ``directory``.
    """
    from safetensors.torch import save_file

    denoiser = _denoiser(model)
    if not has_lora(denoiser) or adapter_name not in getattr(denoiser, "peft_config", {}):
        raise ValueError(f"{type(denoiser).__name__} has no LoRA adapter named {adapter_name!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = denoiser.peft_config[adapter_name]
    state = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(denoiser, adapter_name).items()}
    pipeline_type = _lora_pipeline(model)
    if pipeline_type is not None:
        pipeline_type.save_lora_weights(
            directory,
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=config.to_dict(),
        )
    else:
        save_file(state, directory / _PEFT_WEIGHTS)
        config.save_pretrained(directory)
    return directory


def _read_adapter(directory: Path):
    """(state dict with peft keys, LoraConfig or None) from either on-disk format."""
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import load_file

    if (directory / _PEFT_WEIGHTS).is_file():
        config = LoraConfig.from_pretrained(str(directory)) if (directory / _PEFT_CONFIG).is_file() else None
        return load_file(directory / _PEFT_WEIGHTS), config
    if (directory / _DIFFUSERS_WEIGHTS).is_file():
        path = directory / _DIFFUSERS_WEIGHTS
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        prefix = "transformer."
        state = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in load_file(path).items()}
        config = None
        raw = metadata.get("lora_adapter_metadata")
        if raw:
            entries = json.loads(raw)
            entries = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in entries.items()}
            config = LoraConfig(**{k: v for k, v in entries.items() if k in LoraConfig.__dataclass_fields__})
        return state, config
    raise FileNotFoundError(
        f"no LoRA weights in {directory}: expected {_DIFFUSERS_WEIGHTS} (diffusers) or {_PEFT_WEIGHTS} (peft)"
    )


def load_lora(
    model: nn.Module, directory: str | Path, adapter_name: str = DEFAULT_ADAPTER, trainable: bool = True
) -> None:
    """Load an adapter saved by :func:`save_lora` into ``model`` (a backbone or a denoiser).

    If the denoiser has no adapter yet, one is injected with the saved configuration (rank, alpha,
    targets); an existing adapter of the same name is overwritten in place (e.g. to resume). Raises
    if a saved tensor finds no place in the model.
    """
    from peft import set_peft_model_state_dict

    denoiser = _denoiser(model)
    directory = Path(directory)
    state, config = _read_adapter(directory)
    if adapter_name not in getattr(denoiser, "peft_config", {}):
        if config is None:
            raise ValueError(f"{directory} holds no LoRA configuration (rank/alpha/targets) to create the adapter from")
        add_lora(
            denoiser,
            rank=config.r,
            alpha=config.lora_alpha,
            target_modules=sorted(config.target_modules),
            init=True,
            adapter_name=adapter_name,
        )
    result = set_peft_model_state_dict(denoiser, state, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"LoRA tensors from {directory} do not fit {type(denoiser).__name__}: {unexpected[:5]}")
    for name, param in denoiser.named_parameters():
        if ".lora_" in name and f".{adapter_name}." in name:
            param.requires_grad_(trainable)


def load_adapter(backbone: nn.Module, directory: str | Path, adapter_name: str | None = None) -> str:
    """Apply an exported LoRA adapter (:func:`save_lora`, ``<run>/final/adapter``) for inference.

    The library that wrote the format reads it back: a diffusers LoRA
    (``pytorch_lora_weights.safetensors``) goes through ``load_lora_weights`` of the backbone's
    pipeline (SD3, FLUX.1, Qwen-Image, ...); a peft adapter (``adapter_model.safetensors`` +
    ``adapter_config.json``) is injected with its saved ``LoraConfig`` and filled with peft's
    ``load_peft_weights`` / ``set_peft_model_state_dict``. The adapter is active and frozen.

    Args:
        backbone: a backbone (``.denoiser``; diffusers backbones also ``.pipeline``) or a bare denoiser.
        directory: the adapter directory.
        adapter_name: peft adapter name (default: ``"default"``; diffusers picks its own for its pipelines).

    Returns:
        The name the adapter was loaded under.

    Raises:
        FileNotFoundError: ``directory`` is missing or holds neither format.
        ValueError: the adapter does not fit the denoiser (other architecture or targets).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    denoiser = _denoiser(backbone)
    if (directory / _DIFFUSERS_WEIGHTS).is_file():
        pipeline = getattr(backbone, "pipeline", None)
        if pipeline is None or _lora_pipeline(backbone) is None:
            raise ValueError(
                f"{directory} holds a diffusers LoRA ({_DIFFUSERS_WEIGHTS}) but the model is a "
                f"{type(denoiser).__name__}, not a diffusers pipeline's denoiser"
            )
        before = set(getattr(denoiser, "peft_config", {}) or {})
        try:
            pipeline.load_lora_weights(str(directory), adapter_name=adapter_name)
        except (KeyError, RuntimeError, ValueError) as error:
            raise ValueError(f"LoRA from {directory} does not fit this {type(denoiser).__name__}: {error}") from error
        added = [name for name in denoiser.peft_config if name not in before]
        if not added:
            raise ValueError(f"{directory}: no LoRA weight applied to the {type(denoiser).__name__} (text-encoder-only LoRA?)")
        name = added[0]
    elif (directory / _PEFT_WEIGHTS).is_file() and (directory / _PEFT_CONFIG).is_file():
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from peft.utils import load_peft_weights

        name = adapter_name or DEFAULT_ADAPTER
        config = LoraConfig.from_pretrained(str(directory))
        config.inference_mode = True
        try:
            if callable(getattr(denoiser, "add_adapter", None)) and hasattr(denoiser, "_hf_peft_config_loaded"):
                denoiser.add_adapter(config, adapter_name=name)
            else:
                inject_adapter_in_model(config, denoiser, adapter_name=name)
        except ValueError as error:  # e.g. no target module of the config exists here
            raise ValueError(f"LoRA from {directory} does not fit {type(denoiser).__name__}: {error}") from error
        state = load_peft_weights(str(directory), device="cpu")
        try:
            result = set_peft_model_state_dict(denoiser, state, adapter_name=name)
        except RuntimeError as error:  # shape mismatch: same names, other widths
            raise ValueError(f"LoRA from {directory} does not fit {type(denoiser).__name__}: {error}") from error
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k and f".{name}." in k]
        if unexpected or missing:
            raise ValueError(
                f"LoRA from {directory} does not fit {type(denoiser).__name__}: "
                f"unexpected {unexpected[:3]}, missing {missing[:3]}"
            )
    else:
        raise FileNotFoundError(
            f"no LoRA adapter in {directory}: expected {_DIFFUSERS_WEIGHTS} (diffusers) or "
            f"{_PEFT_WEIGHTS} + {_PEFT_CONFIG} (peft)"
        )
    for param_name, param in denoiser.named_parameters():
        if ".lora_" in param_name:
            param.requires_grad_(False)
    return name
