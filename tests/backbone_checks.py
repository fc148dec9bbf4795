"""Checks every diffusers backbone (SD3, SD3.5-Large, FLUX.1, Qwen-Image, SANA, Z-Image) passes, written once.

Each check takes the model-specific parts as arguments: a factory for a fresh tiny pipeline, the
backbone's ``from_pipeline`` / ``from_pretrained``, and ``forward(pipe, x, t, cond)``, the diffusers
transformer called by hand the way the model's pipeline calls it (the independent recomputation the
backbone is compared against). The test modules (``tests/models/test_models_*.py``,
``tests/lightning/test_lightning_*.py``) import it as ``from backbone_checks import ...``, as they do
``helpers``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pytest
import torch

from dgpo_lightning.models.lora import add_lora, load_adapter, load_lora, reference_mode, save_lora, trainable_parameters
from dgpo_lightning.models.sharding import shard_units

Forward = Callable[[Any, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def _guided(guidance_scale: float | None) -> dict:
    return {} if guidance_scale is None else {"guidance_scale": guidance_scale}


def inputs(backbone, batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of the backbone's shape and times in [0, 1), from their own generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *backbone.latent_shape(), generator=g), torch.rand(batch, generator=g)


def randomise_lora_b(denoiser: torch.nn.Module, seed: int = 3, scale: float = 0.5) -> None:
    """Give every ``lora_B`` values (it starts at zero, i.e. adapted model == base) so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(scale * torch.randn(param.shape, generator=g))


def add_test_lora(backbone, rank: int = 4, scale: float = 0.5):
    """Rank-``rank`` LoRA (alpha 2 x rank: scaling 2, so a lost alpha would show) on the backbone's
    default targets, with random ``lora_B``."""
    config = add_lora(backbone.denoiser, rank=rank, target_modules=backbone.lora_targets)
    randomise_lora_b(backbone.denoiser, scale=scale)
    return config


# --------------------------------------------------------------------------- LoRA and memory knobs


def check_lora_round_trip(
    make_pipe: Callable[[], Any],
    from_pipe: Callable[[Any], Any],
    forward: Forward,
    prompts: Sequence[str],
    directory: Path,
    *,
    lora_scale: float = 0.5,
    tolerance: Mapping[str, float] | None = None,
    images: Mapping[str, Any] | None = None,
    via_load_adapter: bool = True,
    via_load_lora: bool = True,
) -> dict:
    """``save_lora`` of a trained-looking adapter, loaded back three ways, gives the adapted velocity.

    1. Into a fresh diffusers pipeline with ``pipe.load_lora_weights``: the transformer called by hand
       (``forward``) equals the backbone's velocity with the adapter, and before loading equals the
       backbone's velocity with the adapter off (``reference_mode``); the adapter changes the output.
       ``images`` (kwargs of ``pipe(...)``): the pipeline also generates with it.
    2. ``load_adapter`` into a fresh backbone (the inference path, ``evaluate --adapter``): frozen.
    3. ``load_lora`` into a fresh backbone (training resume): the adapter, and only it, trainable.
    """
    tol = dict(tolerance or {})
    backbone = from_pipe(make_pipe())
    add_test_lora(backbone, scale=lora_scale)
    cond = backbone.encode_prompts(list(prompts))
    x, t = inputs(backbone)
    with torch.no_grad():
        expected = backbone.velocity(x, t, cond)
        with reference_mode(backbone.denoiser):
            base = backbone.velocity(x, t, cond)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter matters
    save_lora(backbone, directory)
    assert (Path(directory) / "pytorch_lora_weights.safetensors").is_file()

    pipe = make_pipe()
    with torch.no_grad():
        torch.testing.assert_close(forward(pipe, x, t, cond), base, **tol)
        pipe.load_lora_weights(directory)
        torch.testing.assert_close(forward(pipe, x, t, cond), expected, **tol)
        if images is not None:
            res = backbone.resolution
            generated = pipe(list(prompts[:1]), height=res, width=res, num_inference_steps=2, output_type="pt", **images).images
            assert generated.shape == (1, 3, res, res) and torch.isfinite(generated).all()

    if via_load_adapter:
        applied = from_pipe(make_pipe())
        load_adapter(applied, directory)
        with torch.no_grad():
            torch.testing.assert_close(applied.velocity(x, t, cond), expected, **tol)
        assert not trainable_parameters(applied)  # inference: the adapter is frozen
    if via_load_lora:
        resumed = from_pipe(make_pipe())
        load_lora(resumed, directory)
        with torch.no_grad():
            torch.testing.assert_close(resumed.velocity(x, t, cond), expected, **tol)
        trainable = [n for n, p in resumed.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
    return {"backbone": backbone, "x": x, "t": t, "cond": cond, "expected": expected, "base": base}


def check_gradient_checkpointing(
    backbone, prompts: Sequence[str], guidance_scale: float | None = None, lora_scale: float = 0.5
) -> None:
    """Gradient checkpointing of the denoiser gives the same loss and LoRA gradients as without it
    (the same backbone, adapter and inputs, once without and once with checkpointing)."""
    add_test_lora(backbone, scale=lora_scale)
    backbone.train()
    cond = backbone.encode_prompts(list(prompts))
    x, t = inputs(backbone)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            backbone.denoiser.enable_gradient_checkpointing()
            assert backbone.denoiser.is_gradient_checkpointing
        backbone.denoiser.zero_grad(set_to_none=True)
        loss = backbone.velocity(x, t, cond, **_guided(guidance_scale)).square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in backbone.denoiser.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    backbone.eval()
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads_a.values())


def check_bfloat16_base_with_fp32_adapter(
    pipe, backbone, from_pretrained: Callable[..., Any], directory: Path, prompts: Sequence[str],
    guidance_scale: float | None = None,
) -> None:
    """A bf16 checkpoint (saved from ``pipe``, loaded by ``from_pretrained(path, torch_dtype=...,
    resolution=...)``) gets fp32 LoRA parameters; its velocity is fp32, close to the fp32
    ``backbone``'s (bf16 rounding only); gradients reach every adapter parameter in fp32; decode is fp32."""
    pipe.save_pretrained(directory)
    half = from_pretrained(directory, torch_dtype="bfloat16", resolution=backbone.resolution)
    assert half.denoiser.dtype == torch.bfloat16
    add_lora(half.denoiser, rank=4, target_modules=half.lora_targets)
    assert all(p.dtype == torch.float32 for p in trainable_parameters(half))
    x, t = inputs(backbone)
    v = half.velocity(x, t, half.encode_prompts(list(prompts)), **_guided(guidance_scale))
    with torch.no_grad():
        v32 = backbone.velocity(x, t, backbone.encode_prompts(list(prompts)), **_guided(guidance_scale))
    assert v.dtype == torch.float32
    assert (v - v32).abs().max() < 0.1 * v32.abs().max()
    v.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable_parameters(half))
    assert half.decode(x[:1]).dtype == torch.float32


def check_offloaded_text_encoders(plain, offloaded, prompts: Sequence[str], keys: Sequence[str] = ("prompt_embeds",)) -> list:
    """``offloaded`` (the same pipeline with ``offload_text_encoders=True``) moves its text encoders to
    the device only to encode new prompts and back to the CPU, and encodes as ``plain``. Returns the
    list of moves (it keeps recording)."""
    expected = plain.encode_prompts(list(prompts))
    moves, real_to = [], offloaded.text_encoders.to
    offloaded.text_encoders.to = lambda device: moves.append(str(device)) or real_to(device)
    cond = offloaded.encode_prompts(list(prompts))
    assert moves == [str(offloaded.device), "cpu"]
    for key in keys:
        torch.testing.assert_close(cond[key], expected[key])
    offloaded.encode_prompts(list(prompts[:2]))  # cached: the encoders stay on the CPU
    assert len(moves) == 2
    return moves


def check_from_pretrained_loads_the_saved_pipeline(
    backbone, loaded, prompts: Sequence[str], guidance_scale: float | None = None, expected: Forward | None = None,
) -> None:
    """``loaded`` (``from_pretrained`` of ``backbone``'s pipeline saved to disk) encodes the prompts as
    ``backbone`` and gives its velocity (or ``expected(x, t, cond)``, e.g. the transformer by hand with
    another option) on the same inputs."""
    x, t = inputs(backbone)
    with torch.no_grad():
        cond = backbone.encode_prompts(list(prompts))
        torch.testing.assert_close(loaded.encode_prompts(list(prompts))["prompt_embeds"], cond["prompt_embeds"])
        want = backbone.velocity(x, t, cond, **_guided(guidance_scale)) if expected is None else expected(x, t, cond)
        torch.testing.assert_close(loaded.velocity(x, t, cond, **_guided(guidance_scale)), want)


def check_factory_loader(name: str, path: Path, backbone_cls, **options):
    """``models.factory.load_backbone(name, path, **options)`` (the YAML's ``model.backbone`` /
    ``model.backbone_options``) builds a ``backbone_cls`` with the options applied (returned for
    model-specific checks); without a path it is a user error naming ``model.model_path``."""
    from dgpo_lightning.models.factory import load_backbone

    via = load_backbone(name, str(path), **options)
    assert isinstance(via, backbone_cls)
    if options.get("offload_text_encoders"):
        assert via.offload_text_encoders
    with pytest.raises(ValueError, match=f"{name} needs model.model_path"):
        load_backbone(name, None)
    return via


def check_autoencoder_kl_decode_encode(pipe, backbone, seed: int = 7) -> None:
    """Decode / encode through an ``AutoencoderKL`` with the VAE's scaling and shift (SD3, FLUX.1,
    Z-Image): ``decode(z)`` is ``vae.decode(z / scaling + shift)`` mapped to [0, 1] as the pipeline's
    own ``output_type="pt"`` postprocessing does; ``encode`` is the posterior mean, shifted and scaled."""
    vae = pipe.vae
    scaling, shift = vae.config.scaling_factor, vae.config.shift_factor
    z = torch.randn(2, *backbone.latent_shape(), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        images = backbone.decode(z)
        decoded = vae.decode(z / scaling + shift).sample
        torch.testing.assert_close(images, (decoded / 2 + 0.5).clamp(0, 1))
        torch.testing.assert_close(images, pipe.image_processor.postprocess(decoded, output_type="pt"))
        latents = backbone.encode(images)
        mean = vae.encode(2 * images - 1).latent_dist.mean
    res = backbone.resolution
    assert images.shape == (2, 3, res, res) and latents.shape == z.shape
    torch.testing.assert_close(latents, (mean - shift) * scaling)


def check_sd3_euler_rollout_matches_pipeline(pipe, backbone, prompts: Sequence[str], guidance_scale: float = 4.5,
                                             steps: int = 2) -> dict:
    """An SD3-family ``StableDiffusion3Pipeline`` rollout with CFG from given latents equals the
    package's ``ode_euler`` on the backbone's guided velocity over the pipeline's own (shifted)
    schedule. Returns the latents, conditioning and both results."""
    from dgpo_lightning.sampling import ode_euler

    res = backbone.resolution
    x = torch.randn(len(prompts), *backbone.latent_shape(), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = pipe(list(prompts), height=res, width=res, num_inference_steps=steps, guidance_scale=guidance_scale,
                         latents=x.clone(), output_type="latent").images
        pipe.scheduler.set_timesteps(steps)
        sigmas = pipe.scheduler.sigmas.float()
        cond = backbone.encode_prompts(list(prompts))
        ours = ode_euler(lambda x_t, t: backbone.velocity(x_t, t, cond, guidance_scale=guidance_scale), x, sigmas).sample
    assert len(sigmas) == steps + 1 and sigmas[0] == pytest.approx(1.0) and sigmas[-1] == 0.0
    assert not torch.allclose(reference, x, atol=1e-2)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    return {"x": x, "cond": cond, "ours": ours, "reference": reference}


def check_inference_mode_prompts_cached_as_normal_tensors(backbone, prompt: str = "three purple birds") -> None:
    """A prompt first seen inside ``torch.inference_mode`` (validation rollouts) is cached as a normal
    tensor, so that training steps can use it later."""
    with torch.inference_mode():
        backbone.encode_prompts([prompt])
    assert not backbone._cache[prompt]["prompt_embeds"].is_inference()


def check_bfloat16_on_cuda(backbone, prompts: Sequence[str], guidance_scale: float, lora_scale: float = 0.5) -> dict:
    """The backbone moved to CUDA in bf16 with a random LoRA: prompts encode on the device, the guided
    velocity is fp32 and finite, gradients reach every adapter parameter, the reference (adapter off)
    is finite, decode runs on the device. Returns the conditioning."""
    add_test_lora(backbone, scale=lora_scale)
    cond = backbone.encode_prompts(list(prompts))
    assert cond["prompt_embeds"].device.type == "cuda"
    n = len(prompts)
    x = torch.randn(n, *backbone.latent_shape(), device="cuda")
    t = torch.rand(n, device="cuda")
    v = backbone.velocity(x, t, cond, guidance_scale=guidance_scale)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    backbone.velocity(x, t, cond).square().mean().backward()
    assert all(p.grad is not None for p in trainable_parameters(backbone))
    with torch.no_grad(), reference_mode(backbone.denoiser):
        assert torch.isfinite(backbone.velocity(x, t, cond)).all()
    images = backbone.decode(x)
    res = backbone.resolution
    assert images.device.type == "cuda" and images.shape == (n, 3, res, res)
    return cond


def check_shard_units(backbone, blocks: Sequence[torch.nn.Module], count: int) -> None:
    """FSDP's shard units are exactly the transformer's ``blocks`` (``count`` of them), in order."""
    units = shard_units(backbone.denoiser)
    assert len(units) == len(blocks) == count and all(a is b for a, b in zip(units, blocks))


# --------------------------------------------------------------------------- Lightning and evaluate CLI


def train_two_dgpo_steps(
    root: Path,
    backbone: str,
    pipe,
    options: Mapping[str, Any],
    prompts: Sequence[str],
    *,
    module_options: Mapping[str, Any] | None = None,
    data_options: Mapping[str, Any] | None = None,
    before_fit: Callable[[Any], None] | None = None,
    export: bool = True,
    directory_name: str | None = None,
) -> dict:
    """Save ``pipe`` under ``root``, load it by name (``DGPOModule(backbone=..., model_path=...)``,
    LoRA rank 4), train two DGPO optimizer steps on the CPU with a JPEG reward, and (``export``) write
    the training export. Returns the run: module, trainer, parameters before (``before``) and the
    trainable names, paths of the model (``root / directory_name``, default the backbone's name),
    prompts and exported adapter."""
    import lightning as L

    from dgpo_lightning.callbacks.export import export_model
    from dgpo_lightning.data.datamodule import RolloutDataModule
    from dgpo_lightning.module import DGPOModule

    root = Path(root)
    model = root / (directory_name or backbone)
    pipe.save_pretrained(model)
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("".join(p + "\n" for p in prompts))
    torch.manual_seed(0)
    module = DGPOModule(backbone=backbone, model_path=str(model), backbone_options=dict(options),
                        finetune="lora", lora_rank=4, lr=3e-2, t_min=0.5, **(module_options or {}))
    module.configure_model()
    data = RolloutDataModule(train_prompts=str(prompt_file), group_size=2, prompts_per_rank=2, num_steps=2,
                             rewards={"jpeg_incompressibility": 1.0}, eval_prompts=None, progress=False,
                             **(data_options or {}))
    denoiser = module.backbone.denoiser
    before = {n: p.detach().clone() for n, p in denoiser.named_parameters()}
    trainable = {n for n, p in denoiser.named_parameters() if p.requires_grad}
    if before_fit is not None:
        before_fit(module)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, max_epochs=2, reload_dataloaders_every_n_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, data)
    if export:
        export_model(module, root / "final")
    return {"root": root, "backbone": backbone, "options": dict(options), "model": model,
            "prompts": prompt_file, "module": module, "trainer": trainer, "before": before, "trainable": trainable,
            "adapter": root / "final" / "adapter" if export else None}


def check_trained_lora(run: dict) -> set[str]:
    """Two steps ran; only LoRA parameters were trainable and some ``lora_B`` moved; every base
    parameter (the reference, adapter off) is untouched; the export holds the diffusers LoRA file.
    Returns the trainable parameter names."""
    assert run["trainer"].global_step == 2
    trainable, before = run["trainable"], run["before"]
    assert trainable and all("lora_" in n for n in trainable)
    after = dict(run["module"].backbone.denoiser.named_parameters())
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[n], before[n]) for n in trainable if "lora_B" in n)
    assert all(torch.equal(after[n], p) for n, p in before.items() if n not in trainable)
    if run["adapter"] is not None:
        assert (run["adapter"] / "pytorch_lora_weights.safetensors").is_file()
    return trainable


def _recompute(run: dict, backbone_cls, reward: str, reward_options: Mapping[str, Any], seed: int, adapter=None):
    """The reward of images sampled directly with ``sample_latents`` from the planned seeds."""
    from dgpo_lightning.data.rollout import sample_latents
    from dgpo_lightning.rewards.base import build
    from dgpo_lightning.sampling.seeds import member_seeds
    from dgpo_lightning.sampling.settings import SamplerSettings

    backbone = backbone_cls.from_pretrained(run["model"], **run["options"])
    if adapter is not None:
        load_adapter(backbone, adapter)
    lines = run["prompts"].read_text().splitlines()
    prompts = [p for p in lines for _ in range(2)]
    seeds = member_seeds(seed, range(len(lines)), 2)
    images = backbone.decode(sample_latents(backbone, prompts, seeds, SamplerSettings(num_steps=2)).sample)
    return build(reward, **reward_options)(images, prompts).float()


def check_evaluate_cli(run: dict, directory: Path, capsys, backbone_cls, reward: str = "jpeg_incompressibility",
                       reward_options: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
    """``python -m dgpo_lightning.evaluate`` on the run's model with and without its exported adapter:
    one score per image (2 per prompt, all different), the overall mean, the adapter changes every
    image, and every score equals the reward applied by hand to independently sampled images.
    Returns the two result files (base, tuned)."""
    from dgpo_lightning.evaluate import main

    reward_options = dict(reward_options or {})
    argv = ["--backbone", run["backbone"], "--model", str(run["model"]), "--backbone-options", json.dumps(run["options"]),
            "--prompts", str(run["prompts"]), "--reward", reward,
            "--num-steps", "2", "--images-per-prompt", "2", "--seed", "7", "--batch-size", "4", "--no-progress"]
    if reward_options:
        argv += ["--reward-options", json.dumps({reward: reward_options})]
    directory = Path(directory)
    main([*argv, "--out", str(directory / "base.json")])
    main([*argv, "--out", str(directory / "tuned.json"), "--adapter", str(run["adapter"])])
    assert "+ adapter" in capsys.readouterr().out
    base, tuned = (json.loads((directory / f"{n}.json").read_text()) for n in ("base", "tuned"))
    scores = {name: [row[reward] for row in r["per_image"]] for name, r in (("base", base), ("tuned", tuned))}
    n = 2 * len(run["prompts"].read_text().splitlines())
    assert len(scores["base"]) == len(scores["tuned"]) == n and len(set(scores["base"])) == n
    assert base["overall"] == pytest.approx(sum(scores["base"]) / n)
    assert all(a != b for a, b in zip(scores["base"], scores["tuned"]))  # the adapter changes every image
    assert tuned["run"]["adapter"] == str(run["adapter"])
    for name, adapter in (("base", None), ("tuned", run["adapter"])):
        expected = _recompute(run, backbone_cls, reward, reward_options, 7, adapter)
        torch.testing.assert_close(torch.tensor(scores[name]), expected, rtol=1e-5, atol=1e-5)
    return base, tuned
