"""Writes the notebooks in this folder from the cells below (keeps them reviewable as code).

    python notebooks/make_notebooks.py                       # write every notebook (without outputs)
    python notebooks/make_notebooks.py --execute NAME ...    # write only NAME ..., run each in full mode and
                                                             # save it with its outputs (what is committed)

``--execute`` runs a notebook headless (matplotlib's inline backend, so figures are saved as PNG) from this folder with the environment of
the calling shell, so ``DGPO_RUN_DIR`` / ``DGPO_SUITE_DIR`` choose what ``explore_dgpo_run`` and
``compare_ablations`` read. The tests (``tests/notebooks``) run every notebook with
``DGPO_NOTEBOOK_TINY=1``, which swaps the trained models for tiny random ones so that each notebook runs in
well under a minute. Nothing in any notebook downloads anything.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from textwrap import dedent

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(dedent(text).strip())


def code(text: str):
    return new_code_cell(dedent(text).strip())


# ============================================================================ explore_dgpo_run

EXPLORE = [
    md(
        """
        # Exploring a DGPO run

        Loads a run directory (by default the one `make demo` writes to `runs/demo`; set `DGPO_RUN_DIR` to
        explore another), reads what the run recorded (its resolved `config.yaml`, `eval_history.csv`, the
        TensorBoard scalars), shows held-out samples before and after training, the reward curves and the
        time spent in each phase, and walks through the DGPO loss on one group.

        Any run directory works: the embedded world (full fine-tuning or LoRA: `final/` is a complete
        checkpoint) or a diffusers backbone (`sd3`, `flux`, ...: the base pipeline named by `model.model_path`
        plus the LoRA adapter in `final/adapter`), and a run that was stopped and resumed (its history and its
        TensorBoard scalars continue; every fit of the run is marked on the curves). The committed outputs come
        from a short LoRA DGPO run on the embedded world, trained in two legs (the second resumes the first):

        ```
        python -m dgpo_lightning fit --config experiments/base/world_dgpo.yaml --trainer.default_root_dir=runs/notebook_demo \\
            --trainer.max_epochs=4 --trainer.check_val_every_n_epoch=2 --data.eval_images_per_prompt=1 \\
            '--data.eval_rewards=[geneval, sharpness]'
        # the same command with --trainer.max_epochs=8 resumes it
        DGPO_RUN_DIR=runs/notebook_demo python notebooks/make_notebooks.py --execute explore_dgpo_run
        ```

        With `DGPO_NOTEBOOK_TINY=1` (the tests) the notebook first trains a tiny random model for two epochs,
        then resumes it for a third, so that it runs in seconds (unless `DGPO_RUN_DIR` already holds a run: the tests
        also point it at a tiny SD3 run with its LoRA adapter).
        """
    ),
    code(
        """
        import csv
        import os
        from pathlib import Path

        import matplotlib.pyplot as plt
        import torch
        import yaml

        ROOT = Path('..').resolve()  # the repository (the notebook runs from notebooks/)
        RUN_DIR = Path(os.environ.get('DGPO_RUN_DIR', ROOT / 'runs' / 'demo'))
        TINY = os.environ.get('DGPO_NOTEBOOK_TINY') == '1'
        torch.set_num_threads(1 if TINY else 2)
        plt.rcParams['figure.dpi'] = 80  # small PNG outputs
        """
    ),
    md(
        """
        ## The run

        In tiny mode, train a random tiny world model with the same CLI the experiments use: two epochs, then the
        same command with a budget of three epochs, which resumes the run from its `last.ckpt`.
        """
    ),
    code(
        """
        if TINY and not (RUN_DIR / 'config.yaml').exists():  # (a tiny run given by DGPO_RUN_DIR is used as it is)
            import json

            from dgpo_lightning.cli import DGPOCLI
            from dgpo_lightning.data.prompts import load_prompt_records
            from dgpo_lightning.world.backbone import save_backbone, tiny_backbone

            torch.manual_seed(0)
            base_path = save_backbone(tiny_backbone(), RUN_DIR.parent / 'tiny_base')
            held_out = RUN_DIR.parent / 'held_out.jsonl'  # one held-out prompt per task keeps evaluation quick
            by_tag = {}
            for record in load_prompt_records('world:test'):
                by_tag.setdefault(record['tag'], record)
            held_out.write_text(''.join(json.dumps(r) + '\\n' for r in by_tag.values()))

            def fit(epochs):
                DGPOCLI(args=['fit', '--config', str(ROOT / 'experiments/base/world_dgpo.yaml'), f'--model.model_path={base_path}',
                              '--model.lr=1e-3', '--data.group_size=4', '--data.prompts_per_rank=2', '--data.groups_per_batch=2',
                              '--data.num_steps=3', '--data.eval_num_steps=3', '--data.rewards={sharpness: 1.0}',
                              '--data.eval_rewards=[geneval, sharpness]', f'--data.eval_prompts={held_out}',
                              '--data.eval_images_per_prompt=1', '--data.progress=false', f'--trainer.max_epochs={epochs}',
                              '--trainer.check_val_every_n_epoch=1', '--trainer.enable_progress_bar=false',
                              '--trainer.enable_model_summary=false', f'--trainer.default_root_dir={RUN_DIR}'])

            fit(2)
            fit(3)  # the same run, resumed with a larger budget
            # The fit's score_vs_time.png switched matplotlib to Agg in this process; back to inline figures.
            get_ipython().run_line_magic('matplotlib', 'inline')

        config = yaml.safe_load((RUN_DIR / 'config.yaml').read_text())
        model_cfg, data_cfg = config['model'], config['data']
        KIND = model_cfg['backbone']
        print(f"run directory: {os.path.relpath(RUN_DIR, ROOT)}")
        print(f"backbone {KIND} ({model_cfg['model_path'] or 'shipped base'}), {model_cfg['finetune']} fine-tuning, "
              f"algorithm {model_cfg['algorithm']}, beta {model_cfg['beta']}, t_min {model_cfg['t_min']}")
        print(f"rewards {data_cfg['rewards']}, G = {data_cfg['group_size']}, {data_cfg['prompts_per_rank']} prompts per epoch, "
              f"sampler {data_cfg['sampler']} x {data_cfg['num_steps']} steps")
        for path in sorted(p for p in RUN_DIR.rglob('*') if p.is_file() and p.stat().st_size > 0)[:40]:
            print(f"  {str(path.relative_to(RUN_DIR)):60s} {path.stat().st_size / 1e3:9.1f} kB")
        """
    ),
    md(
        """
        ## The models before and after

        The base is the model the run started from (`model.model_path`; `null` is the world's shipped base). The
        trained model is `final/`: a complete world checkpoint, or for any backbone trained with LoRA the adapter
        in `final/adapter` applied to the base (what `python -m dgpo_lightning.evaluate --adapter` does). A run that
        has not finished has no `final/` yet; its `last.ckpt` holds the weights so far.
        """
    ),
    code(
        """
        from dgpo_lightning.models.factory import load_backbone
        from dgpo_lightning.models.lora import load_adapter

        FINAL = RUN_DIR / 'final'
        assert FINAL.is_dir(), f'{RUN_DIR} has no final/ yet (the fit has not finished)'
        options = model_cfg.get('backbone_options') or {}


        def load(trained: bool):
            if KIND == 'world' and trained and (FINAL / 'unet').is_dir():
                return load_backbone('world', str(FINAL))  # LoRA already merged
            backbone = load_backbone(KIND, model_cfg['model_path'], **options)
            if trained:
                load_adapter(backbone, FINAL / 'adapter')
            return backbone.eval()


        models = {'before': load(False), 'after': load(True)}
        print({name: f'{sum(p.numel() for p in m.parameters()) / 1e6:.2f} M parameters' for name, m in models.items()})
        """
    ),
    md(
        """
        ## Held-out samples before and after

        Same prompts (from the run's `data.eval_prompts`), same initial noise, the run's evaluation sampler; each
        image is titled with the run's evaluation rewards (GenEval: 1 = correct). Rewards that cannot be built on
        this machine (a scorer whose weights are not here) are left out.
        """
    ),
    code(
        """
        from dgpo_lightning.callbacks import sample_figure
        from dgpo_lightning.data.prompts import load_prompt_records
        from dgpo_lightning.data.rollout import sample_latents
        from dgpo_lightning.rewards import build
        from dgpo_lightning.sampling.seeds import draw_seeds
        from dgpo_lightning.sampling.settings import SamplerSettings

        spec = data_cfg['eval_prompts']
        if not str(spec).startswith('world:') and not Path(spec).exists():
            spec = ROOT / spec  # a path relative to where the fit ran
        all_records = load_prompt_records(spec)
        records = all_records[:: max(1, len(all_records) // 8)][:8]
        prompts = [r['prompt'] for r in records]
        seeds = draw_seeds(1234, len(prompts))
        settings = SamplerSettings(data_cfg['eval_sampler'], data_cfg['eval_num_steps'], data_cfg['shift'], data_cfg['guidance_scale'])
        options_of = data_cfg.get('reward_options') or {}
        eval_rewards = {}
        for name in data_cfg['eval_rewards']:
            try:
                eval_rewards[name] = build(name, **(options_of.get(name) or {}))
            except Exception as error:  # e.g. a model-based reward whose weights are not on this machine
                print(f'{name}: left out ({type(error).__name__}: {str(error)[:80]})')
        for name, model in models.items():
            images = model.decode(sample_latents(model, prompts, seeds, settings).sample)
            scores = {k: reward(images, prompts, records) for k, reward in eval_rewards.items()}
            figure = sample_figure({'images': images, 'prompts': prompts, 'scores': scores}, columns=8)
            headline = next(iter(scores), None)
            figure.suptitle(f'{name}: ' + (f'{headline} {scores[headline].mean():.2f}' if headline else ''), y=1.02)
            plt.show()
        """
    ),
    md(
        """
        ## Reward curves, across every fit of the run

        `eval_history.csv` holds one row per held-out evaluation with the training seconds (evaluation excluded),
        the rollout images so far and every evaluation metric. A resumed run continues the same file and clock
        (the history is part of the checkpoint), so the rows of all legs form one curve. TensorBoard appends one
        event file per fit to `tb/`; the scalars of all of them are merged by step (a step logged twice, by a fit
        killed after it and the fit that resumed, keeps its last value) and the start of each fit is marked.
        """
    ),
    code(
        """
        HISTORY = RUN_DIR / 'eval_history.csv'
        if HISTORY.exists():
            rows = [{k: float(v) for k, v in row.items() if v != ''} for row in csv.DictReader(HISTORY.open())]
            print(f'{len(rows)} evaluations, steps {[int(r["step"]) for r in rows]}')
        else:  # ScoreHistory's metric (default eval/geneval) was not among the run's evaluation rewards
            rows = []
            print('no eval_history.csv (set trainer.callbacks ScoreHistory metric to one of data.eval_rewards)')

        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        event_files = sorted(RUN_DIR.glob('**/events.out.tfevents.*'), key=lambda p: p.stat().st_mtime)
        scalars, fit_starts = {}, []
        for file in event_files:
            events = EventAccumulator(str(file), size_guidance={'scalars': 0})
            events.Reload()
            steps = [v.step for tag in events.Tags()['scalars'] if tag.startswith('train/') for v in events.Scalars(tag)]
            if steps:
                fit_starts.append(min(steps))  # the first optimizer step this fit logged
            for tag in events.Tags()['scalars']:
                for value in events.Scalars(tag):
                    scalars.setdefault(tag, {})[value.step] = value.value
        print(f'{len(event_files)} TensorBoard event file(s): fits starting at steps {fit_starts}')

        figure, ((left, middle), (right, rollout_axis)) = plt.subplots(2, 2, figsize=(12, 6.5))
        minutes = [r['seconds'] / 60 for r in rows]
        metrics = [k for k in (rows[0] if rows else {}) if k.startswith('eval/') and k.count('/') == 1]
        other = left.twinx() if any('geneval' not in k for k in metrics) else None
        for key in metrics:
            axis = left if 'geneval' in key else other
            axis.plot(minutes, [r[key] for r in rows], marker='o', label=key, linestyle='-' if axis is left else '--', color=None if axis is left else 'grey')
            axis.set_ylabel('held-out score' if axis is left else key)
        left.set_xlabel('training minutes (evaluation excluded)')
        left.legend(fontsize=7, loc='upper left')
        if other is not None:
            other.legend(fontsize=7, loc='lower right')
        tasks = [k for k in (rows[0] if rows else {}) if k.startswith('eval/geneval/')]
        for key in tasks:
            middle.plot([r['step'] for r in rows], [r[key] for r in rows], marker='.', label=key.split('/')[-1])
        middle.set_xlabel('optimizer step'); middle.set_ylabel('held-out GenEval per task'); middle.legend(fontsize=6)
        for axis, tags in ((right, ['train/loss', 'train/dgpo_sigmoid_weight', 'train/reward_accuracy']),
                           (rollout_axis, ['rollout/reward_mean', 'rollout/reward_std'])):
            for tag in tags:
                if tag in scalars:
                    steps = sorted(scalars[tag])
                    axis.plot(steps, [scalars[tag][s] for s in steps], label=tag)
            axis.set_xlabel('optimizer step (dotted: a resumed fit starts)'); axis.legend(fontsize=7)
        for axis in (middle, right, rollout_axis):
            for start in fit_starts[1:]:
                axis.axvline(start, color='grey', linestyle=':', linewidth=1)
        plt.tight_layout(); plt.show()
        """
    ),
    md(
        """
        ## Where the time goes

        Per rollout epoch the data module logs the seconds spent sampling (and decoding), inside the rewards, and
        waiting for rewards; the rest of the training time between two evaluations is the optimisation.
        """
    ),
    code(
        """
        phases = {tag: scalars[tag] for tag in ('rollout/sampling_seconds', 'rollout/scoring_seconds', 'rollout/reward_wait_seconds') if tag in scalars}
        if phases and rows:
            total = rows[-1]['seconds']
            spent = {tag.split('/')[-1]: sum(values.values()) for tag, values in phases.items()}
            rollout = scalars.get('rollout/seconds', {})
            spent['optimisation and the rest'] = max(0.0, total - sum(rollout.values()))
            figure, axis = plt.subplots(figsize=(7, 1.8))
            left_edge = 0.0
            for name, seconds in spent.items():
                axis.barh(0, seconds / 60, left=left_edge / 60, label=f'{name}: {seconds / 60:.1f} min')
                left_edge += seconds
            axis.set_yticks([]); axis.set_xlabel('minutes of training'); axis.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1, 1))
            plt.tight_layout(); plt.show()
        else:
            print('this run logged no rollout timings')
        """
    ),
    md(
        """
        ## The DGPO loss on one group, step by step (embedded world)

        One prompt, G images from the base model, their rewards and group-normalised advantages
        $A_i = (r_i - \\bar r)/(\\sigma_r + \\epsilon)$. At one timestep $t$ (shared by the group) and one noise, the
        denoising errors $\\ell_\\theta, \\ell_{ref}$ give the group logit $z = \\frac{\\beta}{G}\\sum_i A_i(\\ell_{\\theta,i} - \\ell_{ref,i})$
        and the loss $\\mathrm{softplus}(z) = -\\log\\sigma(-z)$: the Bradley–Terry probability that the positive part
        ($A>0$) beats the negative part. The gradient pushes $\\ell_\\theta$ down for $A_i>0$ and up for $A_i<0$, each scaled by
        $\\sigma(z)\\,\\beta A_i/G$ (see `dgpo_loss_geometry.ipynb`). This section needs the world's GenEval reward and is
        skipped for other backbones.
        """
    ),
    code(
        """
        if KIND == 'world':
            from dgpo_lightning.algo import denoising_error, dgpo_loss, flow_interpolate, velocity_target
            from dgpo_lightning.data.rollout import generate_groups
            from dgpo_lightning.rewards import build_weighted

            policy, reference = models['after'], models['before']
            record = load_prompt_records('world:train')[0]
            rollout = generate_groups(reference, [record], 8, build_weighted({'geneval_partial': 1.0, 'sharpness': 0.01}), seed=0)
            A = rollout.advantages
            print(record['prompt'])
            print('rewards   ', rollout.rewards.numpy().round(3))
            print('advantages', A.numpy().round(2), ' sum =', float(A.sum()))

            beta, t = float(model_cfg['beta']), torch.full((8,), 0.7)
            shape = rollout.latents.shape[1:]
            noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).expand(8, *shape)
            x_t = flow_interpolate(rollout.latents, noise, t)
            target = velocity_target(rollout.latents, noise)
            with torch.no_grad():
                l_theta = denoising_error(policy.velocity(x_t, t, policy.encode_prompts(rollout.prompts)), target)
                l_ref = denoising_error(reference.velocity(x_t, t, reference.encode_prompts(rollout.prompts)), target)
            z = beta / 8 * (A * (l_theta - l_ref)).sum()
            loss, stats = dgpo_loss(l_theta, l_ref, A, rollout.group_index, beta=beta)
            print('implicit rewards -beta*(l_theta - l_ref):', (-beta * (l_theta - l_ref)).numpy().round(3))
            print(f'z = {z:.4f}   softplus(z) = {torch.nn.functional.softplus(z):.4f}   dgpo_loss = {loss:.4f}   sigma(z) = {stats.sigmoid_weight:.3f}')
            assert torch.allclose(torch.logaddexp(z, torch.zeros(())), loss, atol=1e-5)

            images = policy.decode(rollout.latents)
            figure, axes = plt.subplots(1, 8, figsize=(14, 2.2))
            for axis, image, a, r in zip(axes, images, A, rollout.rewards):
                axis.imshow(image.permute(1, 2, 0).numpy(), interpolation='nearest'); axis.axis('off')
                axis.set_title(f"{'G+' if a > 0 else 'G-'}  r={r:.2f}\\nA={a:+.2f}", fontsize=8, color='green' if a > 0 else 'red')
            plt.show()
        else:
            print(f'{KIND}: skipped (needs the embedded world)')
        """
    ),
]


# ============================================================================ dgpo_loss_geometry

GEOMETRY = [
    md(
        """
        # The geometry of the DGPO loss

        DGPO's loss on one group $g$ of samples of the same prompt is
        $$L_g = \\mathrm{softplus}(z_g),\\qquad z_g = \\frac{\\beta}{|g|}\\sum_{i\\in g} A_i\\,(\\ell_{\\theta,i} - \\ell_{ref,i}),$$
        with $\\ell$ the denoising (velocity) error of the trained and the frozen reference model on the same noisy
        copy $x_t$ of sample $i$, and $A_i$ the group-normalised advantage. Its gradient with respect to each sample's
        error is the **per-sample weight**
        $$w_i = \\frac{\\partial L}{\\partial \\ell_{\\theta,i}} = \\sigma(z_g)\\,\\frac{\\beta A_i}{|g|}\\quad(\\text{divided by the number of groups in the batch}),$$
        so gradient descent lowers the error (raises the likelihood) of samples with $A_i>0$ and raises it for $A_i<0$,
        each in proportion to $A_i$, and every sample of a group shares the factor $\\sigma(z_g)$, which decays once the
        group is ranked correctly.

        This notebook shows how $\\beta$, $|A|$ and the group split shape $w_i$, puts it next to Flow-GRPO's clipped
        ratio and pairwise Diffusion-DPO on the same group, and **asserts every number** against the package's
        functions (`dgpo_lightning/algo/loss.py`, `baselines.py`, `advantages.py`) and autograd. No model is needed:
        the denoising errors are numbers of the size the embedded world produces.
        """
    ),
    code(
        """
        import os

        import matplotlib.pyplot as plt
        import numpy as np
        import torch

        from dgpo_lightning.algo import (best_worst_pairs, dgpo_group_weight, dgpo_loss, diffusion_dpo_loss, flow_grpo_loss,
                                         group_advantages)

        TINY = os.environ.get('DGPO_NOTEBOOK_TINY') == '1'
        torch.set_default_dtype(torch.float64)  # exact comparisons below
        POINTS = 25 if TINY else 200  # resolution of the sweeps
        plt.rcParams['figure.dpi'] = 80  # small PNG outputs

        # One group of G = 8 images of one prompt, scored by GenEval's partial credit (values the world produces).
        rewards = torch.tensor([1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.0, 0.0])
        group = torch.zeros(8, dtype=torch.long)
        A = group_advantages(rewards, group)
        generator = torch.Generator().manual_seed(0)
        l_ref = 0.30 + 0.05 * torch.randn(8, generator=generator)   # reference errors at one t, one noise
        delta = 0.002 * torch.randn(8, generator=generator)         # l_theta - l_ref: a policy a few steps away
        beta = 100.0                                                  # experiments/base/world_dgpo.yaml
        print('rewards   ', rewards.numpy())
        print('advantages', A.numpy().round(3), f' sum = {A.sum():.1e}, std = {A.std(correction=0):.4f}')
        assert abs(float(A.sum())) < 1e-9
        """
    ),
    md(
        """
        ## 1. The weight, checked against the package and autograd

        `dgpo_loss` on the group; the gradient autograd finds for each $\\ell_{\\theta,i}$ equals $\\sigma(z_g)\\beta A_i/|g|$, and
        `dgpo_group_weight` returns $\\sigma(z_g)$ for every member.
        """
    ),
    code(
        """
        def dgpo_weights(delta, A, group, beta):
            \"\"\"Per-sample gradient of dgpo_loss with respect to l_theta, by autograd.\"\"\"
            l_theta = (l_ref[: len(delta)] + delta).clone().requires_grad_(True)
            loss, stats = dgpo_loss(l_theta, l_ref[: len(delta)], A, group, beta=beta)
            loss.backward()
            return l_theta.grad, loss, stats


        grad, loss, stats = dgpo_weights(delta, A, group, beta)
        z = beta / 8 * (A * delta).sum()
        formula = torch.sigmoid(z) * beta * A / 8
        print(f'z_g = {z:.4f}  loss = {loss:.4f} = softplus(z_g) = {torch.nn.functional.softplus(z):.4f}  sigma(z_g) = {torch.sigmoid(z):.4f}')
        print('autograd w_i           ', grad.numpy().round(4))
        print('sigma(z) beta A_i / |g|', formula.numpy().round(4))
        assert torch.allclose(loss, torch.nn.functional.softplus(z))
        assert torch.allclose(grad, formula)
        assert torch.allclose(dgpo_group_weight(l_ref + delta, l_ref, A, group, beta=beta), torch.sigmoid(z).expand(8))
        assert torch.allclose(stats.sigmoid_weight, torch.sigmoid(z))
        """
    ),
    md(
        """
        ## 2. β: a scale and a brake

        At the reference ($\\ell_\\theta = \\ell_{ref}$, the first step of training) $z_g = 0$, $\\sigma = 1/2$ and the
        weights grow linearly with β. Once the policy ranks the group the right way (lower error on the positives,
        $z_g<0$), $\\sigma(z_g) = \\sigma(-\\beta m)$ with margin $m = -z_g/\\beta$ shuts the group off, faster the larger β:
        the weight of the best sample peaks near $\\beta \\approx 1.28/m$ and then vanishes. A group ranked the wrong
        way keeps $\\sigma \\to 1$ and its weights grow with β without bound. Below, the three cases use
        $\\delta_i = \\ell_{\\theta,i} - \\ell_{ref,i} = \\mp 0.002\\,A_i$.
        """
    ),
    code(
        """
        betas = torch.logspace(0, 4, POINTS)
        cases = {'at the reference (delta = 0)': torch.zeros(8), 'ranked right (delta = -0.002 A)': -0.002 * A,
                 'ranked wrong (delta = +0.002 A)': 0.002 * A}
        figure, (left, right) = plt.subplots(1, 2, figsize=(12, 3.6))
        for label, d in cases.items():
            sig, top = [], []
            for b in betas.tolist():
                g, _, s = dgpo_weights(d, A, group, b)
                sig.append(float(s.sigmoid_weight)); top.append(float(g[0]))
            left.semilogx(betas, sig, label=label); right.loglog(betas, np.abs(top), label=label)
            if label.startswith('ranked right'):
                m = float(-(A * d).sum() / 8)
                peak = float(betas[int(np.argmax(np.abs(top)))])
                print(f'ranked right: margin m = {m:.2e}, |w_best| peaks at beta = {peak:.0f} (1.28 / m = {1.2785 / m:.0f})')
                assert abs(np.log(peak * m / 1.2785)) <= float(np.log(betas[1] / betas[0]))  # within one grid step
        for b in (100.0,):
            left.axvline(b, color='grey', linestyle=':'); right.axvline(b, color='grey', linestyle=':')
        left.set_xlabel('beta'); left.set_ylabel('sigma(z_g)'); left.legend(fontsize=8)
        right.set_xlabel('beta (dotted: the world configs)'); right.set_ylabel('|w| of the best sample')
        plt.tight_layout(); plt.show()
        """
    ),
    md(
        """
        ## 3. |A|: linear in the advantage, blind to the reward's scale

        Within a group the weights are a straight line in $A_i$ with slope $\\sigma(z_g)\\beta/|g|$: every sample moves,
        the extreme ones most, and the positives and negatives carry equal total weight ($\\sum_i A_i = 0$). Because
        $A$ is normalised by the group's standard deviation, multiplying the rewards by 10 or adding a constant
        changes nothing; a group whose rewards are all equal has $A = 0$ and no gradient at all (the training
        loop drops such groups). How the rewards spread decides who carries the weight: one success among
        failures gets a large $A$ and most of the push.
        """
    ),
    code(
        """
        patterns = {'the group above': rewards, 'one success': torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]),
                    'one failure': torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 0]), 'two levels': torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0])}
        figure, axes = plt.subplots(1, len(patterns), figsize=(14, 2.8), sharey=True)
        for axis, (label, r) in zip(axes, patterns.items()):
            a = group_advantages(r, group)
            w, _, _ = dgpo_weights(torch.zeros(8), a, group, beta)
            assert torch.allclose(w, 0.5 * beta * a / 8)                                     # linear in A
            assert torch.allclose(group_advantages(10 * r + 3, group), a, atol=1e-3)          # scale-free (up to eps)
            assert abs(float(w[a > 0].sum() + w[a < 0].sum())) < 1e-9                        # G+ and G- balance
            axis.bar(range(8), w.numpy(), color=['green' if x > 0 else 'red' for x in a])
            axis.set_title(f'{label}\\nr = {r.numpy().round(2).tolist()}', fontsize=7); axis.set_xlabel('sample')
        axes[0].set_ylabel('w_i at the reference (beta = 100)')
        plt.tight_layout(); plt.show()

        tie = group_advantages(torch.full((8,), 0.5), group)
        w, loss_tie, stats_tie = dgpo_weights(delta, tie, group, beta)
        print('all rewards equal: A =', tie.numpy(), ' w =', w.numpy(), f' zero_advantage_frac = {stats_tie.zero_advantage_frac:.0f}')
        assert torch.equal(w, torch.zeros(8))
        """
    ),
    md(
        """
        ## 4. The group split: G⁺ against G⁻, and why the partition function cancels

        The loss is the Bradley–Terry probability that the positive part $G^+ = \\{A_i>0\\}$ beats the negative part,
        each sample's implicit reward $R_i = -\\beta(\\ell_{\\theta,i}-\\ell_{ref,i})$ weighted by $|A_i|/|g|$:
        $-z_g = \\sum_{i\\in G^+}\\frac{|A_i|}{|g|}R_i - \\sum_{i\\in G^-}\\frac{|A_i|}{|g|}R_i = R(G^+) - R(G^-)$. Since $\\sum A_i = 0$, any
        constant added to the reference errors of a group (the intractable normaliser of the group's distribution)
        cancels: the loss and its gradient do not move. Groups are normalised by their own size $|g|$ and the batch
        by its number of groups, so ragged groups weigh the same per group; and a group split over micro-batches
        gets the exact same gradient when each part is given the whole group's $\\sigma(z_g)$ (`dgpo_group_weight`).
        """
    ),
    code(
        """
        positive, negative = A > 0, A < 0
        R = -beta * delta
        margin = (A[positive].abs() * R[positive]).sum() / 8 - (A[negative].abs() * R[negative]).sum() / 8
        print(f'R(G+) - R(G-) = {margin:.4f} = -z_g = {-z:.4f};  reward_margin stat = {stats.reward_margin:.4f}')
        assert torch.allclose(margin, -z) and torch.allclose(stats.reward_margin, -z)

        for c in (0.1, -5.0, 123.0):  # a per-group constant in the reference errors
            l_theta = (l_ref + delta).clone().requires_grad_(True)
            shifted, _ = dgpo_loss(l_theta, l_ref + c, A, group, beta=beta)
            shifted.backward()
            assert torch.allclose(shifted, loss) and torch.allclose(l_theta.grad, grad)
        print('reference errors shifted by 0.1, -5, 123: same loss and gradient')

        # Two groups of different sizes in one batch: 1/|g| inside, 1/(number of groups) outside.
        r2 = torch.tensor([1.0, 0.0, 0.5, 0.0])
        batch_r, batch_g = torch.cat([rewards, r2]), torch.cat([group, torch.ones(4, dtype=torch.long)])
        batch_A = group_advantages(batch_r, batch_g)
        batch_delta = torch.cat([delta, 0.002 * torch.randn(4, generator=generator)])
        batch_ref = torch.cat([l_ref, 0.3 + 0.05 * torch.randn(4, generator=generator)])
        l_theta = (batch_ref + batch_delta).clone().requires_grad_(True)
        batch_loss, _ = dgpo_loss(l_theta, batch_ref, batch_A, batch_g, beta=beta)
        batch_loss.backward()
        size = torch.tensor([8.0] * 8 + [4.0] * 4)
        z_batch = torch.zeros(2).index_add(0, batch_g, beta * batch_A * batch_delta / size)
        expected = torch.sigmoid(z_batch)[batch_g] * beta * batch_A / size / 2
        assert torch.allclose(l_theta.grad, expected)
        print('ragged batch (|g| = 8 and 4): autograd = sigma(z_g) beta A_i / |g| / 2 groups')

        # The same batch in two micro-batches that split the first group.
        weights = dgpo_group_weight(batch_ref + batch_delta, batch_ref, batch_A, batch_g, beta=beta)
        l_theta = (batch_ref + batch_delta).clone().requires_grad_(True)
        for part in (slice(0, 5), slice(5, 12)):
            partial_loss, _ = dgpo_loss(l_theta[part], batch_ref[part], batch_A[part], batch_g[part], beta=beta,
                                        group_weight=weights[part], group_size=size[part], num_groups=2)
            partial_loss.backward()
        assert torch.allclose(l_theta.grad, expected)
        print('split into micro-batches of 5 and 7 samples: the summed gradient is the same')
        """
    ),
    md(
        """
        ## 5. Next to Flow-GRPO and Diffusion-DPO on the same group

        All three push on the likelihood of each sample; to put them on one axis, define the **push**
        $p_i = -\\partial L/\\partial \\log p_i$ (positive: the sample is made more likely). DGPO's $\\log p$ proxy is the
        ELBO, $\\log p_i \\approx -\\ell_{\\theta,i}$, so its push is $w_i$.

        - **Flow-GRPO** (`flow_grpo_loss`): the PPO objective on each SDE transition,
          $L = \\mathrm{mean}\\,\\max(-A\\rho, -A\\,\\mathrm{clip}(\\rho, 1-c, 1+c))$ with $\\rho = p_\\theta/p_{old}$; the push is
          $A_i\\rho_i/N$ while the ratio is inside the trust region on the side the advantage pulls, and exactly 0
          once it has moved $c$ beyond it. It needs stochastic (SDE) rollouts and their stored log-probs, and has no
          β: the step size is the learning rate times $|A|$, cut off by the clip.
        - **Diffusion-DPO** (`diffusion_dpo_loss` on `best_worst_pairs`): only the best and the worst image of the
          group, with $p_w = -p_l = \\beta\\,\\sigma(\\beta(\\Delta_w - \\Delta_l))$, $\\Delta = \\ell_\\theta - \\ell_{ref}$; the six
          other samples get nothing, and how much better the winner was does not matter.
        """
    ),
    code(
        """
        clip = 0.2  # large enough to see (the world config's 1e-4 acts on per-dimension mean log-probs)
        log_ratio = 0.1 * torch.randn(8, generator=generator)
        log_ratio[1], log_ratio[6] = 0.3, -0.3  # one positive and one negative sample past the clip
        old = -torch.rand(8, generator=generator)
        log_prob = (old + log_ratio).clone().requires_grad_(True)
        grpo_loss, grpo_stats = flow_grpo_loss(log_prob, old, A, clip_range=clip)
        grpo_loss.backward()
        grpo_push = -log_prob.grad + 0.0  # (+ 0.0: no -0.0 in the table)
        rho = log_ratio.exp()
        inside = ~(((A > 0) & (rho > 1 + clip)) | ((A < 0) & (rho < 1 - clip)))
        assert torch.allclose(grpo_push, torch.where(inside, A * rho / 8, torch.zeros(8)))
        print(f'Flow-GRPO: clip_frac = {grpo_stats.clip_frac:.3f}; clipped samples (push 0): {torch.nonzero(~inside).flatten().tolist()}')

        winner, loser = best_worst_pairs(rewards, group)
        dpo_beta = 50.0  # experiments/base/world_diffusion_dpo.yaml
        l_theta = (l_ref + delta).clone().requires_grad_(True)
        dpo, dpo_stats = diffusion_dpo_loss(l_theta[winner], l_ref[winner], l_theta[loser], l_ref[loser], beta=dpo_beta)
        dpo.backward()
        dpo_push = l_theta.grad  # d L / d l_theta = - d L / d log p
        s = torch.sigmoid(dpo_beta * (delta[winner] - delta[loser]))
        expected = torch.zeros(8).index_put((winner,), dpo_beta * s).index_put((loser,), -dpo_beta * s)
        assert torch.allclose(dpo_push, expected)
        print(f'Diffusion-DPO: pair (winner {winner.tolist()}, loser {loser.tolist()}), sigma = {float(s):.3f}')

        dgpo_push = grad
        figure, axes = plt.subplots(1, 3, figsize=(14, 3), sharex=True)
        for axis, (label, push) in zip(axes, {f'DGPO (beta = {beta:.0f})': dgpo_push, f'Flow-GRPO (clip {clip})': grpo_push,
                                              f'Diffusion-DPO (beta = {dpo_beta:.0f})': dpo_push}.items()):
            axis.bar(range(8), push.numpy(), color=['green' if a > 0 else 'red' if a < 0 else 'grey' for a in A])
            axis.axhline(0, color='black', linewidth=0.5)
            axis.set_title(label, fontsize=9); axis.set_xlabel('sample (rewards ' + ', '.join(f'{r:g}' for r in rewards.tolist()) + ')', fontsize=7)
        axes[0].set_ylabel('push  -dL/dlog p_i')
        plt.tight_layout(); plt.show()
        print(' i  reward      A    DGPO   Flow-GRPO   DPO')
        for i in range(8):
            print(f'{i:2d}  {rewards[i]:5.2f}  {A[i]:+6.2f}  {dgpo_push[i]:+6.3f}  {grpo_push[i]:+9.4f}  {dpo_push[i]:+6.2f}')
        """
    ),
    md(
        """
        ### How each weight responds as the policy moves

        Move one positive sample ($A>0$) away from the reference: DGPO's weight falls smoothly as the margin
        grows (the sigmoid), Flow-GRPO's grows with the ratio and drops to 0 at $1+c$, Diffusion-DPO's falls with its
        own sigmoid but only if the sample is the group's winner.
        """
    ),
    code(
        """
        shifts = torch.linspace(-0.6, 0.6, POINTS)  # Flow-GRPO: the log-ratio of sample 0
        moves = torch.linspace(-0.1, 0.1, POINTS)   # DGPO and DPO: -(l_theta - l_ref) of sample 0 (> 0: more likely)
        d_curve, g_curve, p_curve = [], [], []
        for x, m in zip(shifts.tolist(), moves.tolist()):
            d = delta.clone(); d[0] = -m
            g, _, _ = dgpo_weights(d, A, group, beta); d_curve.append(float(g[0]))
            lr = log_ratio.clone(); lr[0] = x
            lp = (old + lr).clone().requires_grad_(True)
            flow_grpo_loss(lp, old, A, clip_range=clip)[0].backward(); g_curve.append(float(-lp.grad[0]))
            lt = (l_ref + d).clone().requires_grad_(True)
            diffusion_dpo_loss(lt[winner], l_ref[winner], lt[loser], l_ref[loser], beta=dpo_beta)[0].backward(); p_curve.append(float(lt.grad[0]))
        figure, axes = plt.subplots(1, 3, figsize=(14, 3))
        for axis, x, curve, label, xlabel in zip(axes, (moves, shifts, moves), (d_curve, g_curve, p_curve), ('DGPO', 'Flow-GRPO', 'Diffusion-DPO'),
                                                 ('-(l_theta - l_ref) of the best sample', 'log ratio of the best sample', '-(l_theta - l_ref) of the winner')):
            axis.plot(x, curve); axis.set_title(f'{label}: push on sample 0 (A = {A[0]:+.2f})', fontsize=9); axis.set_xlabel(xlabel, fontsize=8)
        axes[1].axvline(np.log(1 + clip), color='grey', linestyle=':')
        plt.tight_layout(); plt.show()
        assert g_curve[-1] == 0.0 and d_curve[-1] < d_curve[0] and p_curve[-1] < p_curve[0]
        """
    ),
]

# ============================================================================ inside_the_rewards

REWARDS = [
    md(
        """
        # Inside the rewards: what each one sees

        A handful of samples from the embedded world's shipped base model (held-out prompts, 10-step DPM-Solver++),
        and for each the inputs and the verdict of every reward that runs offline:

        1. the world detector (`dgpo_lightning/world/detector.py`): the objects it reads back from the pixels, with class,
           colour, box and confidence, drawn over the image;
        2. GenEval's rule (`geneval_rules.explain`), clause by clause, and its dense partial credit (`partial_credit`),
           the training reward of the world configs;
        3. the other offline rewards next to each image: `sharpness` (the eval-only quality proxy),
           `jpeg_incompressibility` / `jpeg_compressibility`, and `ocr` (RapidOCR, its models ship in the wheel);
        4. prompts whose GenEval reward is 0, explained.

        Every score shown is asserted equal to what `rewards.build(name)` returns for the same images, so the
        pictures show the rewards training uses. With `DGPO_NOTEBOOK_TINY=1` (the tests) fewer samples are drawn.
        """
    ),
    code(
        """
        import os

        import matplotlib.pyplot as plt
        import torch
        from matplotlib.patches import Rectangle

        from dgpo_lightning.data.prompts import load_prompt_records
        from dgpo_lightning.data.rollout import sample_latents
        from dgpo_lightning.rewards import build
        from dgpo_lightning.rewards.geneval_rules import COUNTING_THRESHOLD, THRESHOLD, explain, keep_detections, partial_credit
        from dgpo_lightning.sampling.seeds import draw_seeds
        from dgpo_lightning.world.backbone import load_backbone
        from dgpo_lightning.world.detector import detect_batch
        from dgpo_lightning.world.scene import COLORS

        TINY = os.environ.get('DGPO_NOTEBOOK_TINY') == '1'
        torch.set_num_threads(1 if TINY else 2)
        PER_TASK = 1 if TINY else 3  # held-out prompts drawn per task
        plt.rcParams['figure.dpi'] = 80  # small PNG outputs

        model = load_backbone(None)  # the shipped base (dgpo_lightning/world/checkpoints/base)
        by_tag = {}
        for record in load_prompt_records('world:test'):
            by_tag.setdefault(record['tag'], []).append(record)
        records = [r for tag in by_tag for r in by_tag[tag][:: max(1, len(by_tag[tag]) // PER_TASK)][:PER_TASK]]
        prompts = [r['prompt'] for r in records]
        with torch.no_grad():
            images = model.decode(sample_latents(model, prompts, draw_seeds(7, len(prompts))).sample)
        detections = detect_batch(images)
        print(f'{len(images)} samples of {len(by_tag)} tasks, images {tuple(images.shape[1:])}')
        """
    ),
    md(
        """
        ## 1. What the world detector reads

        Each connected blob of one palette colour is fitted with a circle, a square and a triangle; the best fit
        names the class and its quality the confidence. GenEval keeps detections above 0.3 (0.9 in the
        counting task): solid boxes are kept, dashed ones are seen but dropped. The box colour is the colour the
        detector read.
        """
    ),
    code(
        """
        def draw(axis, image, found, record, title=None):
            axis.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation='nearest', extent=(0, 32, 32, 0))
            threshold = COUNTING_THRESHOLD if record.get('tag') == 'counting' else THRESHOLD
            for d in found:
                x0, y0, x1, y1 = d.box
                kept = d.score > threshold
                colour = COLORS.get(d.color, (1, 1, 1))
                axis.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor=colour,
                                         linewidth=1.5 if kept else 1, linestyle='-' if kept else '--'))
                axis.text(x0 - 0.5, y0 - 1, f'{d.cls[:3]} {d.score:.2f}', color='white', fontsize=5.5,
                          bbox=dict(facecolor='black', alpha=0.6, pad=0.5, linewidth=0))
            axis.set_xticks([]); axis.set_yticks([])
            axis.set_title(title if title is not None else record['prompt'], fontsize=7)


        columns = 6
        rows = -(-len(images) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 2.5 * rows), squeeze=False)
        for axis in axes.flat[len(images):]:
            axis.axis('off')
        for axis, image, found, record in zip(axes.flat, images, detections, records):
            draw(axis, image, found, record)
        plt.tight_layout(); plt.show()
        """
    ),
    md(
        """
        ## 2. GenEval, clause by clause, and partial credit

        A GenEval prompt is a list of *include* clauses (class, count, optionally colour and a position relative to an
        earlier clause) and *exclude* clauses (at most so many of a class; the counting task's "exactly"). The
        image is correct when every clause holds. `explain` returns the verdict and the reasons; evaluating it
        on the clauses one at a time (include clauses in order, since a position refers to an earlier clause)
        attributes each reason to its clause. `partial_credit` scores each clause in [0, 1] (count, colour, position
        terms) and averages them: the dense signal the world configs train on.
        """
    ),
    code(
        """
        def clause_text(record, clause, exclude=False):
            if exclude:
                return f"fewer than {clause['count']} {clause['class']}"
            text = f"{clause['count']} x {clause.get('color', '') + ' ' if 'color' in clause else ''}{clause['class']}"
            if 'position' in clause:
                relation, target = clause['position']
                text += f" {relation} the {record['include'][target]['class']} (clause {target + 1})"
            return text


        def clause_verdicts(record, found):
            \"\"\"[(clause text, reasons)] from explain() on growing prefixes of the clauses.\"\"\"
            out, seen = [], 0
            include, exclude = record['include'], record.get('exclude', [])
            for k in range(len(include)):
                _, reasons = explain({**record, 'include': include[: k + 1], 'exclude': []}, found)
                out.append((clause_text(record, include[k]), reasons[seen:])); seen = len(reasons)
            for k in range(len(exclude)):
                _, reasons = explain({**record, 'exclude': exclude[: k + 1]}, found)
                out.append((clause_text(record, exclude[k], exclude=True), reasons[seen:])); seen = len(reasons)
            correct, reasons = explain(record, found)
            assert [r for _, rs in out for r in rs] == reasons  # the clauses' reasons are explain's
            return correct, out


        verdicts = [clause_verdicts(r, d) for r, d in zip(records, detections)]
        partial = [partial_credit(r, d) for r, d in zip(records, detections)]
        show = list(range(len(records)))[:: max(1, len(records) // 8)][:8]
        figure, axes = plt.subplots(len(show), 2, figsize=(9, 1.9 * len(show)), gridspec_kw={'width_ratios': [1, 3.2]}, squeeze=False)
        for (image_axis, text_axis), i in zip(axes, show):
            correct, clauses = verdicts[i]
            draw(image_axis, images[i], detections[i], records[i], title='')
            kept = keep_detections(detections[i], records[i]['tag'])
            lines = [f"{records[i]['prompt']}   [{records[i]['tag']}]",
                     'kept: ' + (', '.join(f'{d.color} {d.cls}' for ds in kept.values() for d in ds) or 'nothing')]
            lines += [f"  {'ok  ' if not reasons else 'FAIL'}  {text}" + (f'   <- {"; ".join(reasons)}' if reasons else '') for text, reasons in clauses]
            lines.append(f"GenEval {'1 (correct)' if correct else '0'}    partial credit {partial[i]:.2f}")
            text_axis.text(0, 0.5, '\\n'.join(lines), family='monospace', fontsize=7.5, va='center',
                           color='darkgreen' if correct else 'darkred')
            text_axis.axis('off')
        plt.tight_layout(); plt.show()
        """
    ),
    md(
        """
        ## 3. Every offline reward next to the image

        `build(name)` for each reward; GenEval's and partial credit's numbers are checked against the rules above.
        `sharpness` is the mean Laplacian variance (×100): the eval-only quality proxy of `experiments/`.
        The JPEG rewards are the file size in kB at quality 95 (incompressibility: +size, compressibility: −size);
        on the world's flat-coloured 32×32 scenes they mostly count the objects' edges.
        """
    ),
    code(
        """
        names = ['geneval', 'geneval_partial', 'sharpness', 'jpeg_incompressibility', 'jpeg_compressibility']
        scores = {name: build(name)(images, prompts, records) for name in names}
        assert scores['geneval'].tolist() == [float(c) for c, _ in verdicts]
        assert torch.allclose(scores['geneval_partial'], torch.tensor(partial))
        figure, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 2.9 * rows), squeeze=False)
        for axis in axes.flat[len(images):]:
            axis.axis('off')
        for i, (axis, image) in enumerate(zip(axes.flat, images)):
            axis.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation='nearest')
            axis.set_xticks([]); axis.set_yticks([])
            axis.set_title(records[i]['prompt'], fontsize=6.5)
            axis.set_xlabel(f"geneval {scores['geneval'][i]:.0f}  partial {scores['geneval_partial'][i]:.2f}\\n"
                            f"sharp {scores['sharpness'][i]:.2f}  jpeg {scores['jpeg_incompressibility'][i]:.2f} kB", fontsize=6.5)
        plt.tight_layout(); plt.show()
        print(f"{'reward':24s} mean   min    max")
        for name, values in scores.items():
            print(f'{name:24s} {values.mean():+.3f} {values.min():+.3f} {values.max():+.3f}')
        correlation = torch.corrcoef(torch.stack([scores['sharpness'], scores['jpeg_incompressibility'],
                                                  torch.tensor([float(len(d)) for d in detections])]))
        print(f'correlation with the number of detected objects: sharpness {correlation[0, 2]:.2f}, jpeg size {correlation[1, 2]:.2f}')
        """
    ),
    md(
        """
        ### OCR

        The `ocr` reward reads the image with RapidOCR and scores the text quoted in the prompt:
        1 if it is found, else 1 − edit distance / length. The world draws no text, so every world sample scores
        0 on an OCR prompt; a rendered sign shows what the reward reads and how the edit distance gives partial
        credit.
        """
    ),
    code(
        """
        import numpy as np
        from PIL import Image, ImageDraw, ImageFont

        def sign(text, size=(256, 96)):
            canvas = Image.new('RGB', size, 'white')
            ImageDraw.Draw(canvas).text((16, 18), text, fill='black', font=ImageFont.load_default(size=48))
            return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255

        ocr = build('ocr')
        signs = [sign('OPEN'), sign('OPEN'), sign('0PEN 24'), torch.nn.functional.interpolate(images[:1], size=(96, 256))[0]]
        asked = ['a sign that says "OPEN"', 'a sign that says "OPEN LATE"', 'a sign that says "OPEN"', 'a sign that says "OPEN"']
        figure, axes = plt.subplots(1, len(signs), figsize=(13, 1.8))
        for axis, image, prompt in zip(axes, signs, asked):
            read = ocr.read_text((image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
            score = float(ocr(image[None], [prompt])[0])
            axis.imshow(image.permute(1, 2, 0).numpy(), interpolation='nearest'); axis.set_xticks([]); axis.set_yticks([])
            axis.set_title(f'{prompt}\\nread {read!r}: ocr = {score:.2f}', fontsize=7)
        plt.tight_layout(); plt.show()
        """
    ),
    md(
        """
        ## 4. Prompts whose reward is 0, explained

        For each failed sample: what the detector saw (kept and dropped), the clause that failed and why, and what
        partial credit still gives it. Next to it, a scene the world's renderer draws for the same prompt, which the
        rule accepts: the target the reward points to.
        """
    ),
    code(
        """
        from dgpo_lightning.world.scene import render_prompt

        failed = [i for i, (correct, _) in enumerate(verdicts) if not correct]
        print(f'{len(failed)} of {len(records)} samples score 0 on GenEval')
        chosen, seen_tags = [], set()
        for i in failed:  # one per task first
            if records[i]['tag'] not in seen_tags:
                chosen.append(i); seen_tags.add(records[i]['tag'])
        chosen = chosen[: 2 if TINY else 4]
        for i in chosen:
            record, found = records[i], detections[i]
            threshold = COUNTING_THRESHOLD if record['tag'] == 'counting' else THRESHOLD
            target = render_prompt(record, torch.Generator().manual_seed(i))
            target_found = detect_batch(target[None])[0]
            assert explain(record, target_found)[0]
            figure, (seen_axis, target_axis) = plt.subplots(1, 2, figsize=(4.6, 2.4))
            draw(seen_axis, images[i], found, record, title='the sample: 0')
            draw(target_axis, target, target_found, record, title='the renderer: 1')
            plt.tight_layout(); plt.show()
            print(f"prompt: {record['prompt']!r} [{record['tag']}], threshold {threshold}")
            print('  detected: ' + (', '.join(f'{d.color} {d.cls} ({d.score:.2f}{", dropped" if d.score <= threshold else ""})' for d in found) or 'nothing'))
            for text, reasons in verdicts[i][1]:
                print(f"  {'ok  ' if not reasons else 'FAIL'} {text}" + (f'  <- {"; ".join(reasons)}' if reasons else ''))
            if partial[i] > 0:
                print(f'  partial credit {partial[i]:.2f}: the dense reward still ranks it above the complete failures of its group\\n')
            else:
                print('  partial credit 0.00: no clause is even partly met, so it ranks last in its group\\n')
        """
    ),
]

# ============================================================================ compare_ablations

COMPARE = [
    md(
        """
        # Comparing the ablations: the paper's claims next to what was measured

        `experiments/run_ablations.py` runs each of the paper's comparisons on the embedded world (3 seeds, a fixed
        training budget) and writes `results/<suite>.csv`: the final held-out GenEval score (mean ± std over
        seeds), the gain over the base, the eval-only quality proxy (`sharpness`), the minutes to a common target
        (half of the best run's gain) and the rollout images generated. This notebook

        1. loads every suite's table (on the shipped base `experiments/shipped_base/`, `experiments/disagreements/` and
           `experiments/speed_to_target/`, scored on the test split, and `experiments/results/`, the pooled held-out
           prompts before the split; `experiments/clean_base/` on the stage-1 clean-caption base; and any other suite
           output named by `DGPO_SUITE_DIR`),
        2. prints the paper's claim next to what each table measured,
        3. plots each suite's final scores with their seed spread, the time to the target and the images,
        4. and, where a suite's run directories are on this machine (`<suite dir>/runs/`, not committed), the
           held-out score against training wall-clock and against images for every seed (mean and min–max band)
           and the time each run spent sampling, scoring and optimising.

        The committed outputs show the measured tables of `experiments/` and, for the curves and phases, the run
        directories of the suites measured on the test split (`experiments/shipped_base/runs/`,
        `experiments/disagreements/runs/`, `experiments/speed_to_target/runs/`; not committed, so a fresh clone shows
        the tables only until the suites are run). Any other suite output, such as a short demo suite
        (`python experiments/run_ablations.py --suite speed --seeds 0 1 --minutes 1 --eval-every 1 --jobs 1
        --out runs/notebook_suite`), is read from `runs/notebook_suite` or `DGPO_SUITE_DIR`. With
        `DGPO_NOTEBOOK_TINY=1` (the tests) a tiny random model is trained for two epochs to stand in for a suite's
        run directory.
        """
    ),
    code(
        """
        import csv
        import importlib.util
        import math
        import os
        import re
        import textwrap
        from pathlib import Path

        import matplotlib.pyplot as plt
        import numpy as np
        import torch

        ROOT = Path('..').resolve()
        TINY = os.environ.get('DGPO_NOTEBOOK_TINY') == '1'
        torch.set_num_threads(1 if TINY else 2)
        plt.rcParams['figure.dpi'] = 80  # small PNG outputs

        spec = importlib.util.spec_from_file_location('run_ablations', ROOT / 'experiments' / 'run_ablations.py')
        ablations = importlib.util.module_from_spec(spec); spec.loader.exec_module(ablations)
        SUITES, METRIC, QUALITY = ablations.SUITES, ablations.METRIC, ablations.QUALITY

        SOURCES = {
            'shipped base, test split (experiments/shipped_base/)': ROOT / 'experiments' / 'shipped_base',
            'shipped base, test split (experiments/disagreements/)': ROOT / 'experiments' / 'disagreements',
            'shipped base, test split, runs to a target (experiments/speed_to_target/)': ROOT / 'experiments' / 'speed_to_target',
            'shipped base, pooled held-out prompts before the split (experiments/)': ROOT / 'experiments',
            'clean-caption base (experiments/clean_base/)': ROOT / 'experiments' / 'clean_base',
            'clean-caption base, 4 min (clean_base/speed_4min/)': ROOT / 'experiments' / 'clean_base' / 'speed_4min',
        }
        # Another suite output: its tables are shown with the committed ones when named by DGPO_SUITE_DIR; the
        # default, the demo suite of the committed outputs, only provides run directories for the curves.
        extra = Path(os.environ.get('DGPO_SUITE_DIR', ROOT / 'runs' / 'notebook_suite'))
        if TINY:
            extra = Path(os.environ['DGPO_RUN_DIR']) / 'suite'
        EXTRA_NAME = f'{"tiny test suite" if TINY else "suite"} ({extra.name}/)'
        SOURCES[EXTRA_NAME] = extra
        TABLE_SOURCES = [name for name in SOURCES if name != EXTRA_NAME or 'DGPO_SUITE_DIR' in os.environ]
        """
    ),
    md("In tiny mode, one tiny DGPO run in a suite's directory layout (`<suite dir>/runs/dgpo/seed0`) stands in for a suite's runs."),
    code(
        """
        if TINY:
            import json

            from dgpo_lightning.cli import DGPOCLI
            from dgpo_lightning.data.prompts import load_prompt_records
            from dgpo_lightning.world.backbone import save_backbone, tiny_backbone

            torch.manual_seed(0)
            base_path = save_backbone(tiny_backbone(), extra / 'tiny_base')
            held_out = extra / 'held_out.jsonl'
            by_tag = {}
            for record in load_prompt_records('world:test'):
                by_tag.setdefault(record['tag'], record)
            held_out.write_text(''.join(json.dumps(r) + '\\n' for r in by_tag.values()))
            directory = ablations.run_dir(extra, [], 0)
            DGPOCLI(args=['fit', '--config', str(ablations.BASE), f'--model.model_path={base_path}', '--model.lr=1e-3',
                          '--data.group_size=4', '--data.prompts_per_rank=2', '--data.groups_per_batch=2', '--data.num_steps=3',
                          '--data.eval_num_steps=3', '--data.rewards={sharpness: 1.0}', '--data.eval_rewards=[geneval, sharpness]',
                          f'--data.eval_prompts={held_out}', '--data.eval_images_per_prompt=1', '--data.progress=false',
                          '--trainer.max_epochs=2', '--trainer.check_val_every_n_epoch=1', '--trainer.enable_progress_bar=false',
                          '--trainer.enable_model_summary=false', f'--trainer.default_root_dir={directory}'])
            (directory / 'done').write_text('tiny\\n')
            get_ipython().run_line_magic('matplotlib', 'inline')  # the fit switched matplotlib to Agg
        """
    ),
    md("## The tables"),
    code(
        """
        def read_table(path):
            rows = list(csv.DictReader(path.open()))
            for row in rows:
                for key in ('final_mean', 'final_std', 'gain', 'quality_proxy', 'minutes_to_target', 'images'):
                    row[key] = float(row[key])
            header = path.with_suffix('.md').read_text() if path.with_suffix('.md').exists() else ''
            found = re.search(r'base \\S+ = ([0-9.]+); target = ([0-9.]+)', header)
            return {'rows': rows, 'base': float(found.group(1)) if found else math.nan, 'target': float(found.group(2)) if found else math.nan}


        tables = {}  # suite -> source -> table
        for source in TABLE_SOURCES:
            for path in sorted((SOURCES[source] / 'results').glob('*.csv')):
                tables.setdefault(path.stem, {})[source] = read_table(path)
        for suite, by_source in tables.items():
            print(f'=== {suite}')
            for source, table in by_source.items():
                print(f"  {source}: base {table['base']:.3f}, target {table['target']:.3f}")
                for row in table['rows']:
                    reach = f"{row['minutes_to_target']:.1f} min" if not math.isnan(row['minutes_to_target']) else 'not reached'
                    print(f"    {row['run']:26s} {row['final_mean']:.3f} ± {row['final_std']:.3f}  gain {row['gain']:+.3f}  "
                          f"sharpness {row['quality_proxy']:.2f}  target {reach:>11s} ({row['reached_target']})  {row['images']:.0f} images")
        """
    ),
    md(
        """
        ## The paper's claims next to what was measured

        The claims as `experiments/README.md` states them (Luo, Hu, Tang, ICLR 2026). The "measured" line is computed
        from each table: a difference counts as resolved only when it exceeds the combined seed spread
        $\\sqrt{s_a^2 + s_b^2}$ of the two rows (population std over the seeds).
        """
    ),
    code(
        """
        CLAIMS = {
            'speed': 'DGPO trains far faster than Flow-GRPO on the same model, rewards, prompts and budget (the paper: ~20x to the '
                     'same score in wall-clock); online Diffusion-DPO (best vs worst of each group) is this repository\\'s pairwise baseline.',
            'sampler': 'DGPO learns better from deterministic ODE rollouts than from SDE rollouts (it needs no stochastic sampler).',
            't_min': 'Timestep clipping helps: training only on t >= t_min beats training on every timestep (t_min = 0), '
                     'because few-step rollouts carry artifacts at low noise.',
            'group_size': 'Group size G in {2, 4, 8, 16} at a fixed number of images per rollout (the paper ablates G).',
            'open_questions': 'Not a claim of the paper: rank or softmax group weights instead of |A|, and an annealed t_min.',
        }


        def row_of(table, name):
            return next(r for r in table['rows'] if r['run'] == name)


        def compare(a, b):
            \"\"\"'a > b', 'a < b' or 'a ~ b' by the gains and their combined seed spread.\"\"\"
            diff, spread = a['gain'] - b['gain'], math.hypot(a['final_std'], b['final_std'])
            word = 'above' if diff > spread else 'below' if diff < -spread else 'within the spread of'
            return f"{a['run']} {a['gain']:+.3f} ± {a['final_std']:.3f} is {word} {b['run']} {b['gain']:+.3f} ± {b['final_std']:.3f}"


        def measured(suite, table):
            rows = table['rows']
            if suite == 'speed':
                dgpo, grpo = row_of(table, 'dgpo'), row_of(table, 'flow_grpo')
                ratio = dgpo['gain'] / grpo['gain'] if grpo['gain'] > 0 else math.inf
                time_ratio = grpo['minutes_to_target'] / dgpo['minutes_to_target']
                lines = [compare(dgpo, grpo) + f' (ratio of gains {ratio:.1f}x)',
                         f"time to target: DGPO {dgpo['minutes_to_target']:.1f} min ({dgpo['reached_target']} seeds), Flow-GRPO "
                         + (f"{grpo['minutes_to_target']:.1f} min ({grpo['reached_target']} seeds): Flow-GRPO / DGPO = {time_ratio:.1f}x"
                            if not math.isnan(time_ratio) else f"never ({grpo['reached_target']} seeds)")]
                if any(r['run'] == 'diffusion_dpo' for r in rows):
                    lines.append(compare(dgpo, row_of(table, 'diffusion_dpo')))
                return lines
            if suite == 'sampler':
                return [compare(row_of(table, 'ode'), row_of(table, 'sde'))]
            if suite == 't_min':
                zero = row_of(table, 't_min=0.0')
                return [compare(r, zero) for r in rows if r is not zero]
            best = max(rows, key=lambda r: r['gain'])
            return [compare(best, r) for r in rows if r is not best]


        for suite, by_source in tables.items():
            print(f'=== {suite}\\nclaim:    {CLAIMS.get(suite, "(no claim recorded)")}')
            for source, table in by_source.items():
                try:
                    lines = measured(suite, table)
                except StopIteration:  # a suite output without all of the runs
                    lines = ['(not every run of the suite is in this table)']
                print(f'measured, {source}:')
                for line in lines:
                    print(f'    {line}')
            print()
        """
    ),
    md(
        """
        ## Each suite: final score with seed spread, time to target, images

        Bars: final held-out GenEval (mean over seeds, error bar ± one std), one colour per source; the dashed line
        is that source's base. Middle: minutes of training to reach the suite's target (the hatched bars did
        not reach it in the budget in any seed). Right: rollout images generated in the budget (a measure of
        each method's sampling cost per minute).
        """
    ),
    code(
        """
        for suite, by_source in tables.items():
            names = list(dict.fromkeys(r['run'] for t in by_source.values() for r in t['rows']))
            figure, (score_axis, time_axis, image_axis) = plt.subplots(1, 3, figsize=(15, 3.4))
            width = 0.8 / len(by_source)
            for k, (source, table) in enumerate(by_source.items()):
                x = np.array([names.index(r['run']) for r in table['rows']]) + (k - (len(by_source) - 1) / 2) * width
                bars = score_axis.bar(x, [r['final_mean'] for r in table['rows']], width, yerr=[r['final_std'] for r in table['rows']],
                                      capsize=3, label=source)
                colour = bars.patches[0].get_facecolor()
                score_axis.hlines(table['base'], x.min() - width / 2, x.max() + width / 2, colors=[colour], linestyles='--')
                minutes = [r['minutes_to_target'] for r in table['rows']]
                longest = np.nanmax(minutes) if not all(math.isnan(m) for m in minutes) else 1.0
                time_axis.bar(x, [m if not math.isnan(m) else longest for m in minutes], width, color=colour,
                              hatch=None, alpha=0.9)
                for xi, m in zip(x, minutes):
                    if math.isnan(m):
                        time_axis.bar(xi, longest, width, color='white', edgecolor=colour, hatch='//')
                image_axis.bar(x, [r['images'] for r in table['rows']], width, color=colour)
            for axis, label in ((score_axis, 'final held-out GenEval'), (time_axis, 'minutes to target'), (image_axis, 'rollout images')):
                axis.set_xticks(range(len(names))); axis.set_xticklabels(names, rotation=20, fontsize=8); axis.set_ylabel(label)
            low = min(t['base'] for t in by_source.values() if not math.isnan(t['base']))
            score_axis.set_ylim(max(0, low - 0.1), None)
            score_axis.legend(fontsize=6, loc='lower right')
            figure.suptitle('\\n'.join(textwrap.wrap(f'{suite}: {CLAIMS.get(suite, "")}', 160)), fontsize=9)
            plt.tight_layout(); plt.show()
        """
    ),
    md(
        """
        ## Curves from the run directories: score against wall-clock and images, with seed spread

        For every suite output whose run directories are here, each run's `eval_history.csv` (the base's evaluation
        prepended, as `run_ablations.py` does). Thin lines: single seeds; thick: the mean over seeds on a common
        time grid, with the min–max band. The x axis is training time with evaluation excluded.
        """
    ),
    code(
        """
        def base_row(directory):
            path = directory / 'runs' / 'base' / 'eval_validate.csv'
            if not path.exists():
                return None
            return {k: float(v) for k, v in next(csv.DictReader(path.open())).items() if v != ''}


        curves = {}  # (source, suite) -> run name -> [rows per seed]
        for source, directory in SOURCES.items():
            if not (directory / 'runs').is_dir():
                continue
            base = base_row(directory)
            for suite, runs in SUITES.items():
                for name, configs in runs:
                    for seed_dir in sorted(ablations.run_dir(directory, configs, 0).parent.glob('seed*')):
                        if (seed_dir / 'done').exists():
                            rows = ablations.read_history(seed_dir)
                            curves.setdefault((source, suite), {}).setdefault(name, []).append(([base] if base else []) + rows)
        print('run directories found:', {f'{s} / {suite}': {n: len(v) for n, v in runs.items()} for (s, suite), runs in curves.items()} or 'none')

        for (source, suite), runs in curves.items():
            if (len(runs) < len(SUITES[suite]) and not TINY) or (TINY and suite != 'speed'):
                continue  # a suite with only some of its runs here (tiny: its one run, once)
            figure, (by_time, by_images) = plt.subplots(1, 2, figsize=(12, 3.6))
            for name, seeds in runs.items():
                colour = None
                for rows in seeds:
                    line, = by_time.plot([r['seconds'] / 60 for r in rows], [r[METRIC] for r in rows], linewidth=0.7, alpha=0.5, color=colour)
                    colour = line.get_color()
                    by_images.plot([r['images'] for r in rows], [r[METRIC] for r in rows], linewidth=0.7, alpha=0.5, color=colour)
                grid = np.linspace(0, min(rows[-1]['seconds'] for rows in seeds), 50)
                values = np.array([np.interp(grid, [r['seconds'] for r in rows], [r[METRIC] for r in rows]) for rows in seeds])
                by_time.plot(grid / 60, values.mean(0), color=colour, linewidth=2.2, label=f'{name} ({len(seeds)} seeds)')
                by_time.fill_between(grid / 60, values.min(0), values.max(0), color=colour, alpha=0.15)
            by_time.set_xlabel('training minutes (evaluation excluded)'); by_images.set_xlabel('rollout images generated')
            for axis in (by_time, by_images):
                axis.set_ylabel(f'held-out {METRIC}'); axis.grid(alpha=0.3)
            by_time.legend(fontsize=7)
            figure.suptitle(f'{suite}, {source}', fontsize=9)
            plt.tight_layout(); plt.show()
        """
    ),
    md(
        """
        ## Where each run's time goes

        From the TensorBoard scalars of each run directory: per rollout epoch the seconds spent sampling and
        decoding, inside the rewards and waiting for them; the rest of the training time (from
        `eval_history.csv`) is the optimisation. Means over seeds, in minutes of the training budget.
        """
    ),
    code(
        """
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


        def phase_minutes(seed_dir):
            totals = {}
            for file in seed_dir.glob('**/events.out.tfevents.*'):
                events = EventAccumulator(str(file), size_guidance={'scalars': 0}); events.Reload()
                for tag in ('rollout/seconds', 'rollout/sampling_seconds', 'rollout/scoring_seconds', 'rollout/reward_wait_seconds'):
                    if tag in events.Tags()['scalars']:
                        by_step = {v.step: v.value for v in events.Scalars(tag)}
                        totals[tag] = totals.get(tag, 0.0) + sum(by_step.values())
            training = ablations.read_history(seed_dir)[-1]['seconds']
            return {'sampling': totals.get('rollout/sampling_seconds', 0) / 60,
                    'scoring': totals.get('rollout/scoring_seconds', 0) / 60,
                    'optimisation': max(0.0, training - totals.get('rollout/seconds', 0)) / 60}


        phase_rows, seen = [], set()
        for (source, suite), runs in curves.items():
            for name, configs in SUITES[suite]:
                run = ablations.run_dir(SOURCES[source], configs, 0).parent
                seed_dirs = [d for d in sorted(run.glob('seed*')) if (d / 'done').exists()]
                if seed_dirs and run not in seen:  # runs shared by several suites are shown once
                    seen.add(run)
                    phases = [phase_minutes(d) for d in seed_dirs]
                    phase_rows.append((source, name, {k: float(np.mean([p[k] for p in phases])) for k in phases[0]}))
        if phase_rows:
            figure, axis = plt.subplots(figsize=(8, 0.5 + 0.45 * len(phase_rows)))
            labels = [f'{name} ({source.split(" (")[0]})' for source, name, _ in phase_rows]
            left = np.zeros(len(phase_rows))
            for phase in ('sampling', 'scoring', 'optimisation'):
                values = np.array([p[phase] for _, _, p in phase_rows])
                axis.barh(labels, values, left=left, label=phase); left += values
            axis.set_xlabel('minutes of training'); axis.legend(fontsize=8); axis.invert_yaxis()
            plt.tight_layout(); plt.show()
            for source, name, phases in phase_rows:
                total = sum(phases.values())
                print(f'{name:26s} ' + '  '.join(f'{k} {v / total:4.0%}' for k, v in phases.items()))
        else:
            print('no run directories here: run a suite (see the top) to see its phases')
        """
    ),
]

NOTEBOOKS = {"explore_dgpo_run": EXPLORE, "dgpo_loss_geometry": GEOMETRY, "inside_the_rewards": REWARDS, "compare_ablations": COMPARE}


def write(name: str) -> Path:
    notebook = new_notebook(
        cells=NOTEBOOKS[name], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    )
    path = HERE / f"{name}.ipynb"
    nbformat.write(notebook, path)
    return path


def execute(name: str) -> Path:
    """Run ``name`` in full mode from this folder and save it with its outputs."""
    from nbclient import NotebookClient

    path = HERE / f"{name}.ipynb"
    notebook = nbformat.read(path, as_version=4)
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend: figures become PNG outputs
    os.environ.pop("DGPO_NOTEBOOK_TINY", None)
    start = time.perf_counter()
    NotebookClient(notebook, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    for cell in notebook.cells:  # keep the diff of a re-run small: no execution timestamps
        cell.get("metadata", {}).pop("execution", None)
    nbformat.write(notebook, path)
    print(f"executed {path} in {time.perf_counter() - start:.0f} s ({path.stat().st_size / 1e6:.2f} MB)")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", nargs="*", default=[], metavar="NAME", help="notebooks to run in full mode and save with outputs")
    args = parser.parse_args()
    if not args.execute:  # only the notebooks named by --execute are rewritten (the others keep their outputs)
        for name in NOTEBOOKS:
            print(f"wrote {write(name)}")
    for name in args.execute:
        write(name)
        execute(name)


if __name__ == "__main__":
    main()
