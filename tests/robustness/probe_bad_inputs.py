"""Probe: run bad inputs through the command lines and count how many end in a clear, short error.

    python tests/robustness/probe_bad_inputs.py [--subprocess] [--only SUBSTRING] [--show]

A plain script (pytest does not collect it). Every case runs ``python -m dgpo_lightning fit|validate``
(tiny random world, 1 step) or ``python -m dgpo_lightning.evaluate`` with one bad input, in-process by
default (``--subprocess``: one interpreter per case, slower, exactly what a user sees). A case is

* clear:    exit code != 0, no traceback, the error is at most 5 lines and names the key/file;
* unclear:  it failed, but with a traceback, a usage dump, a long message, or without naming the culprit;
* accepted: exit code 0, the bad input went through silently.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "experiments" / "base" / "world_dgpo.yaml"
MAX_LINES = 5

CIRCLE = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}


def jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


#: Files the cases refer to as {name}; written into the probe's temporary directory.
FILES = {
    "dog.jsonl": jsonl({"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}, CIRCLE),
    "snowman.txt": "☃ \udcff \x00 ☃\na photo of a circle\n",
    "plain.txt": "a photo of a circle\na photo of a square\n",
    "one.jsonl": jsonl(CIRCLE),
    "empty.jsonl": "",
    "broken.jsonl": jsonl(CIRCLE) + "{not json\n",
    "nokeys.jsonl": jsonl({"prompt": "a photo of a circle"}),
    "badcount.jsonl": jsonl({"tag": "counting", "include": [{"class": "circle", "count": -2}], "prompt": "a photo of two circles"}, CIRCLE),
    "badtag.jsonl": jsonl({"tag": "juggling", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}),
    "bad.yaml": "model:\n  beta: [1, 2\n",
    "unknown_key.yaml": "model:\n  betx: 1.0\n",
    "list.yaml": "- 1\n- 2\n",
    "a_file": "not a directory\n",
}


def fit(*extra: str, sub: str = "fit") -> list[str]:
    return [
        "-m", "dgpo_lightning", sub, "--config", str(BASE), "--model.model_path={world}",
        "--data.group_size=2", "--data.prompts_per_rank=2", "--data.groups_per_batch=2", "--data.num_steps=2",
        "--data.rewards={sharpness: 1.0}", "--data.eval_prompts=null", "--data.progress=false",
        "--trainer.max_steps=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.default_root_dir={tmp}/run_{case}", *extra,
    ]


def validate(*extra: str) -> list[str]:
    return fit("--data.eval_prompts={tmp}/one.jsonl", "--data.eval_images_per_prompt=1", *extra, sub="validate")


def evaluate(*extra: str) -> list[str]:
    defaults = {"--prompts": "{tmp}/one.jsonl", "--model": "{world}", "--out": "{tmp}/eval_{case}/result.json"}
    given = {arg.split("=", 1)[0] for arg in extra}
    return ["-m", "dgpo_lightning.evaluate", *[f"{k}={v}" for k, v in defaults.items() if k not in given],
            "--images-per-prompt=1", "--num-steps=2", "--no-progress", *extra]


#: (name, command, substrings of which the error must name one)
CASES: list[tuple[str, list[str], list[str]]] = [
    # keys and options
    ("unknown key", fit("--model.betx=1"), ["model.betx"]),
    ("abbreviated option", fit("--model.bet=55"), ["model.bet"]),
    ("abbreviated trainer option", fit("--trainer.max_st=3"), ["trainer.max_st"]),
    ("--optimizer SGD", fit("--optimizer=torch.optim.SGD"), ["optimizer"]),
    ("--lr_scheduler", fit("--lr_scheduler=torch.optim.lr_scheduler.StepLR"), ["lr_scheduler"]),
    ("option without value", fit("--model.beta"), ["model.beta"]),
    ("--resume maybe", fit("--resume=maybe"), ["resume"]),
    # values
    ("group_size 1", fit("--data.group_size=1"), ["group_size"]),
    ("group_size 0", fit("--data.group_size=0"), ["group_size"]),
    ("group_size many (type)", fit("--data.group_size=many"), ["group_size"]),
    ("t_min 1.5", fit("--model.t_min=1.5"), ["t_min"]),
    ("t_min -0.1", fit("--model.t_min=-0.1"), ["t_min"]),
    ("beta -1", fit("--model.beta=-1"), ["beta"]),
    ("beta nan", fit("--model.beta=nan"), ["beta"]),
    ("lr -1", fit("--model.lr=-1"), ["lr"]),
    ("num_steps 0", fit("--data.num_steps=0"), ["num_steps"]),
    ("max_steps 1.5 (type)", fit("--trainer.max_steps=1.5"), ["max_steps"]),
    ("precision 7", fit("--trainer.precision=7"), ["precision"]),
    ("unknown sampler", fit("--data.sampler=heun"), ["sampler"]),
    ("unknown algorithm", fit("--model.algorithm=ppo"), ["algorithm"]),
    ("unknown finetune", fit("--model.finetune=half"), ["finetune"]),
    ("unknown backbone", fit("--model.backbone=dalle"), ["backbone", "dalle"]),
    ("groups_per_batch > prompts", fit("--data.groups_per_batch=4"), ["groups_per_batch"]),
    ("1 prompt, prompts_per_rank 8", fit("--data.train_prompts={tmp}/one.jsonl", "--data.prompts_per_rank=8"), ["prompts_per_rank", "one.jsonl"]),
    # rewards
    ("unknown reward", fit("--data.rewards={nonexistent: 1.0}"), ["nonexistent"]),
    ("NaN reward weight", fit("--data.rewards={sharpness: .nan}"), ["sharpness", "rewards"]),
    ("no rewards", fit("--data.rewards={}"), ["rewards"]),
    ("reward YAML typo", fit("--data.rewards={sharpness:1.0}"), ["rewards"]),
    ("unknown eval reward", fit("--data.eval_rewards=[nonexistent]"), ["nonexistent"]),
    (".txt prompts + geneval reward", fit("--data.train_prompts={tmp}/plain.txt", "--data.rewards={geneval: 1.0}"), ["plain.txt", "geneval"]),
    # prompt files
    ("missing prompt file", fit("--data.train_prompts={tmp}/no_such.jsonl"), ["no_such.jsonl"]),
    ("empty prompt file", fit("--data.train_prompts={tmp}/empty.jsonl"), ["empty.jsonl"]),
    ("malformed jsonl line", fit("--data.train_prompts={tmp}/broken.jsonl"), ["broken.jsonl"]),
    ("jsonl without tag/include", fit("--data.train_prompts={tmp}/nokeys.jsonl", "--data.rewards={geneval: 1.0}"), ["nokeys.jsonl"]),
    ("class dog in a prompt file", fit("--data.train_prompts={tmp}/dog.jsonl"), ["dog"]),
    ("negative count in a prompt file", fit("--data.train_prompts={tmp}/badcount.jsonl"), ["badcount.jsonl", "count"]),
    ("unknown tag in a prompt file", fit("--data.train_prompts={tmp}/badtag.jsonl", "--data.rewards={geneval: 1.0}"), ["juggling"]),
    ("unencodable prompt text", fit("--data.train_prompts={tmp}/snowman.txt"), ["snowman.txt"]),
    ("missing eval prompt file", fit("--data.eval_prompts={tmp}/no_such_eval.jsonl"), ["no_such_eval.jsonl"]),
    # models, configs, classes
    ("missing model path", fit("--model.model_path={tmp}/no_such_model"), ["no_such_model"]),
    ("model path is a file", fit("--model.model_path={tmp}/a_file"), ["a_file"]),
    ("corrupt backbone.json", fit("--model.model_path={tmp}/corrupt_world"), ["backbone.json"]),
    ("missing config file", fit("--config={tmp}/no_such.yaml"), ["no_such.yaml"]),
    ("YAML syntax error", fit("--config={tmp}/bad.yaml"), ["bad.yaml"]),
    ("unknown key in a YAML file", fit("--config={tmp}/unknown_key.yaml"), ["betx"]),
    ("YAML file that is a list", fit("--config={tmp}/list.yaml"), ["list.yaml"]),
    ("unknown logger class", fit("--trainer.logger.class_path=foo.NoLogger"), ["foo.NoLogger"]),
    ("unknown callback class", fit("--trainer.callbacks+=foo.NoCallback"), ["foo.NoCallback"]),
    ("fit --ckpt_path missing", fit("--ckpt_path={tmp}/no_such.ckpt"), ["no_such.ckpt"]),
    # validate
    ("validate --ckpt_path missing", validate("--ckpt_path={tmp}/no_such.ckpt"), ["no_such.ckpt"]),
    ("validate --resume fresh", validate("--resume=fresh"), ["resume"]),
    ("validate unknown eval reward", validate("--data.eval_rewards=[nonexistent]"), ["nonexistent"]),
    ("validate eval_images_per_prompt 0", validate("--data.eval_images_per_prompt=0"), ["eval_images_per_prompt"]),
    # evaluate
    ("evaluate on .txt (geneval)", evaluate("--prompts={tmp}/plain.txt"), ["plain.txt"]),
    ("evaluate missing prompt file", evaluate("--prompts={tmp}/no_such.jsonl"), ["no_such.jsonl"]),
    ("evaluate class dog", evaluate("--prompts={tmp}/dog.jsonl"), ["dog"]),
    ("evaluate missing model", evaluate("--model={tmp}/no_such_model"), ["no_such_model"]),
    ("evaluate corrupt backbone.json", evaluate("--model={tmp}/corrupt_world"), ["backbone.json"]),
    ("evaluate unknown sampler", evaluate("--sampler=heun"), ["sampler", "heun"]),
    ("evaluate images-per-prompt 0", evaluate("--images-per-prompt=0"), ["images-per-prompt", "images_per_prompt"]),
    ("evaluate abbreviated option", evaluate("--images-per=1"), ["images-per"]),
]


def prepare(tmp: Path) -> Path:
    import torch

    from dgpo_lightning.world.backbone import save_backbone, tiny_backbone

    torch.manual_seed(0)
    world = save_backbone(tiny_backbone(), tmp / "world")
    shutil.copytree(world, tmp / "corrupt_world")
    (tmp / "corrupt_world" / "backbone.json").write_text("{oops")
    for name, text in FILES.items():
        (tmp / name).write_text(text, encoding="utf-8", errors="surrogateescape")
    return world


def run_in_process(args: list[str]) -> tuple[int, str]:
    module, argv = args[1], args[2:]
    stderr, stdout = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        try:
            if module == "dgpo_lightning":
                from dgpo_lightning.cli import main

                main(list(argv))
            else:
                from dgpo_lightning.evaluate import main

                main(list(argv))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if isinstance(exit_.code, str):
                stderr.write(exit_.code + "\n")
        except BaseException:  # what the interpreter would print for an uncaught exception
            code = 1
            stderr.write(traceback.format_exc())
    return code, stderr.getvalue()


def run_subprocess(args: list[str]) -> tuple[int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    return done.returncode, done.stderr


ERROR_LINE = re.compile(r"^(error|Error|[A-Za-z_.]*(Error|Exception)\b|Traceback|usage:)|: error: ")


def classify(code: int, stderr: str, names: list[str]) -> tuple[str, str]:
    """``(verdict, the error block)``: the block runs from the first error line to the end."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if ERROR_LINE.match(line)), max(len(lines) - MAX_LINES, 0))
    block = lines[start:]
    if code == 0:
        return "accepted", "\n".join(block[-3:])
    text = "\n".join(block)
    if "Traceback" in stderr or "usage:" in text or len(block) > MAX_LINES or not any(n in text for n in names):
        return "unclear", text
    return "clear", text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--subprocess", action="store_true", help="one interpreter per case (slower)")
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    parser.add_argument("--show", action="store_true", help="print each case's error block")
    options = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("DGPO_DEBUG", None)
    import torch

    torch.set_num_threads(1)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="probe_bad_inputs_"))
    world = prepare(tmp)
    cwd = os.getcwd()
    os.chdir(tmp)  # whatever a case writes relative to the working directory stays in tmp
    counts = {"clear": 0, "unclear": 0, "accepted": 0}
    rows = []
    try:
        for index, (name, command, names) in enumerate(CASES):
            if options.only and options.only not in name:
                continue
            args = [a.replace("{tmp}", str(tmp)).replace("{world}", str(world)).replace("{case}", str(index)) for a in command]
            start = time.perf_counter()
            code, stderr = (run_subprocess if options.subprocess else run_in_process)(args)
            verdict, block = classify(code, stderr, names)
            counts[verdict] += 1
            first = block.splitlines()[0][:90] if block else ""
            rows.append((name, verdict, code, time.perf_counter() - start, first))
            print(f"{verdict:<9} {code!s:>4} {rows[-1][3]:5.1f}s  {name:<36} {first}", file=sys.__stdout__, flush=True)
            if options.show and block:
                print("          | " + block.replace("\n", "\n          | "), file=sys.__stdout__, flush=True)
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)
    print(file=sys.__stdout__)
    print(f"{'verdict':<9} {'count':>5}", file=sys.__stdout__)
    for verdict, count in counts.items():
        print(f"{verdict:<9} {count:>5}", file=sys.__stdout__)
    print(f"{'total':<9} {sum(counts.values()):>5}", file=sys.__stdout__)


if __name__ == "__main__":
    main()
