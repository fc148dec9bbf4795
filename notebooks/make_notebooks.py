"""Writes notebooks/explore_dgpo_run.ipynb from the cells below (keeps the notebook reviewable as code).

    python notebooks/make_notebooks.py
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell(
        "# Exploring a DGPO run on the embedded world\n\n"
        "Loads a trained run (by default the one `make demo` writes to `runs/demo`), shows held-out samples "
        "before and after training, the reward curves, and walks through the DGPO loss on a single group.\n\n"
        "Set `DGPO_RUN_DIR` to another run directory to explore it. With `DGPO_NOTEBOOK_TINY=1` (used by the "
        "tests) the notebook first trains a tiny random model for two epochs so that it runs in seconds."
    ),
    new_code_cell(
        "import os\n"
        "from pathlib import Path\n\n"
        "import matplotlib.pyplot as plt\n"
        "import torch\n\n"
        "from dgpo_lightning.world.backbone import load_backbone\n\n"
        "RUN_DIR = Path(os.environ.get('DGPO_RUN_DIR', '../runs/demo'))\n"
        "TINY = os.environ.get('DGPO_NOTEBOOK_TINY') == '1'\n"
        "torch.set_num_threads(2)"
    ),
    new_markdown_cell("## The run\n\nIn tiny mode, train a random tiny world model for two epochs with the same CLI the experiments use."),
    new_code_cell(
        "if TINY:\n"
        "    from dgpo_lightning.cli import DGPOCLI\n"
        "    from dgpo_lightning.world.backbone import save_backbone, tiny_backbone\n\n"
        "    torch.manual_seed(0)\n"
        "    base_path = save_backbone(tiny_backbone(), RUN_DIR / 'base')\n"
        "    cli = DGPOCLI(args=['--config', '../experiments/base/world_dgpo.yaml', f'--model.model_path={base_path}',\n"
        "                        '--model.lr=1e-3', '--data.group_size=4', '--data.prompts_per_rank=2', '--data.groups_per_batch=2', '--data.num_steps=3',\n"
        "                        '--data.rewards={sharpness: 1.0}', '--data.eval_rewards=[geneval, sharpness]',\n"
        "                        '--data.eval_images_per_prompt=1', '--data.progress=false', '--trainer.max_epochs=2',\n"
        "                        '--trainer.check_val_every_n_epoch=1', '--trainer.enable_progress_bar=false',\n"
        "                        f'--trainer.default_root_dir={RUN_DIR}', f'--trainer.logger.init_args.save_dir={RUN_DIR}'],\n"
        "                  run=False)\n"
        "    cli.trainer.fit(cli.model, cli.datamodule)\n"
        "    BASE_MODEL = base_path\n"
        "else:\n"
        "    BASE_MODEL = None  # the shipped base checkpoint\n"
        "FINAL = next(RUN_DIR.glob('**/final'))\n"
        "HISTORY = next(RUN_DIR.glob('**/eval_history.csv'))\n"
        "print('trained model:', FINAL)"
    ),
    new_markdown_cell("## Held-out samples before and after\n\nSame prompts, same initial noise, 10-step DPM-Solver++; titles give the GenEval verdict."),
    new_code_cell(
        "from dgpo_lightning.callbacks import sample_figure\n"
        "from dgpo_lightning.data.prompts import load_prompt_records\n"
        "from dgpo_lightning.data.rollout import sample_latents\n"
        "from dgpo_lightning.rewards import build\n"
        "from dgpo_lightning.sampling.seeds import draw_seeds\n\n"
        "records = load_prompt_records('world:test')[::10][:8]\n"
        "prompts = [r['prompt'] for r in records]\n"
        "seeds = draw_seeds(1234, len(prompts))\n"
        "geneval = build('geneval')\n"
        "models = {'before': load_backbone(BASE_MODEL), 'after': load_backbone(FINAL)}\n"
        "for name, model in models.items():\n"
        "    images = model.decode(sample_latents(model, prompts, seeds).sample)\n"
        "    scores = geneval(images, prompts, records)\n"
        "    figure = sample_figure({'images': images, 'prompts': prompts, 'scores': {'geneval': scores}}, columns=8)\n"
        "    figure.suptitle(f'{name}: {scores.mean():.2f} correct', y=1.02)\n"
        "    plt.show()"
    ),
    new_markdown_cell("## Reward curves\n\nHeld-out score per evaluation (from `eval_history.csv`), and the training scalars TensorBoard shows."),
    new_code_cell(
        "import csv\n\n"
        "rows = list(csv.DictReader(HISTORY.open()))\n"
        "figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))\n"
        "for key in [k for k in rows[0] if k.startswith('eval/geneval')]:\n"
        "    left.plot([float(r['seconds']) / 60 for r in rows], [float(r[key]) for r in rows], marker='o', label=key.split('/')[-1])\n"
        "left.set_xlabel('training minutes'); left.set_ylabel('held-out GenEval score'); left.legend(fontsize=7)\n\n"
        "from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\n"
        "events = EventAccumulator(str(next(RUN_DIR.glob('**/events.out.tfevents.*')).parent))\n"
        "events.Reload()\n"
        "for tag in ['train/loss', 'train/dgpo_sigmoid_weight', 'rollout/reward_mean']:\n"
        "    if tag in events.Tags()['scalars']:\n"
        "        values = events.Scalars(tag)\n"
        "        right.plot([v.step for v in values], [v.value for v in values], label=tag)\n"
        "right.set_xlabel('optimizer step'); right.legend(fontsize=7)\n"
        "plt.tight_layout(); plt.show()"
    ),
    new_markdown_cell(
        "## The DGPO loss on one group, step by step\n\n"
        "One prompt, G images from the base model, their rewards and group-normalised advantages "
        "$A_i = (r_i - \\bar r)/(\\sigma_r + \\epsilon)$. At one timestep $t$ (shared by the group) and one noise, the "
        "denoising errors $\\ell_\\theta, \\ell_{ref}$ give the group logit $z = \\frac{\\beta}{G}\\sum_i A_i(\\ell_{\\theta,i} - \\ell_{ref,i})$ "
        "and the loss $\\mathrm{softplus}(z) = -\\log\\sigma(-z)$: the Bradley–Terry probability that the positive part "
        "($A>0$) beats the negative part. The gradient pushes $\\ell_\\theta$ down for $A_i>0$ and up for $A_i<0$, each scaled by "
        "$\\sigma(z)\\,\\beta A_i/G$."
    ),
    new_code_cell(
        "from dgpo_lightning.algo import denoising_error, dgpo_loss, flow_interpolate, group_advantages, velocity_target\n"
        "from dgpo_lightning.data.rollout import generate_groups\n"
        "from dgpo_lightning.rewards import build_weighted\n\n"
        "policy, reference = models['after'], models['before']\n"
        "record = load_prompt_records('world:train')[0]\n"
        "rollout = generate_groups(reference, [record], 8, build_weighted({'geneval_partial': 1.0, 'sharpness': 0.01}), seed=0)\n"
        "A = rollout.advantages\n"
        "print(record['prompt'])\n"
        "print('rewards   ', rollout.rewards.numpy().round(3))\n"
        "print('advantages', A.numpy().round(2), ' sum =', float(A.sum()))\n\n"
        "beta, t = 30.0, torch.full((8,), 0.7)\n"
        "noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).expand(8, -1, -1, -1)\n"
        "x_t = flow_interpolate(rollout.latents, noise, t)\n"
        "target = velocity_target(rollout.latents, noise)\n"
        "cond = policy.encode_prompts(rollout.prompts)\n"
        "with torch.no_grad():\n"
        "    l_theta = denoising_error(policy.velocity(x_t, t, cond), target)\n"
        "    l_ref = denoising_error(reference.velocity(x_t, t, reference.encode_prompts(rollout.prompts)), target)\n"
        "z = beta / 8 * (A * (l_theta - l_ref)).sum()\n"
        "loss, stats = dgpo_loss(l_theta, l_ref, A, rollout.group_index, beta=beta)\n"
        "print('implicit rewards -beta*(l_theta - l_ref):', (-beta * (l_theta - l_ref)).numpy().round(3))\n"
        "print(f'z = {z:.4f}   softplus(z) = {torch.nn.functional.softplus(z):.4f}   dgpo_loss = {loss:.4f}   sigma(z) = {stats.sigmoid_weight:.3f}')\n"
        "assert torch.allclose(torch.nn.functional.softplus(z), loss, atol=1e-5)\n\n"
        "images = policy.decode(rollout.latents)\n"
        "figure, axes = plt.subplots(1, 8, figsize=(14, 2.2))\n"
        "for axis, image, a, r in zip(axes, images, A, rollout.rewards):\n"
        "    axis.imshow(image.permute(1, 2, 0).numpy(), interpolation='nearest'); axis.axis('off')\n"
        "    axis.set_title(f\"{'G+' if a > 0 else 'G-'}  r={r:.2f}\\nA={a:+.2f}\", fontsize=8, color='green' if a > 0 else 'red')\n"
        "plt.show()"
    ),
]


def main() -> None:
    notebook = new_notebook(cells=CELLS, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    path = Path(__file__).with_name("explore_dgpo_run.ipynb")
    nbformat.write(notebook, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
