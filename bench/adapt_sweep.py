"""Sweep adaptation recipes for the tiny embedder: which settings make the adapted one better?

One synthetic study (40 patients x 5 visits, as `bench.accuracy`) per study seed, ingested once
with the tiny models made once; then every recipe adapts `tiny-dino` through the Python API
(`training.adapt_embedder.adapt_study_embedder`, the CLI's code, with the tiny defaults changed
only where the recipe says) and one `evaluate --segmenter none --no-ablation --fractions 1.0`
scores the frozen `tiny-dino` and every recipe's model on the same folds and patients: the head's
pooled weighted F1, each recipe minus the frozen one with its paired patient-bootstrap interval.

    python -m bench.adapt_sweep --workdir /tmp/sweep --seeds 0 1 2 \\
        --recipe base= --recipe e120=epochs=120 --recipe d64=out_dim=64,epochs=120

A recipe is NAME=key=value,key=value (keys of `pipeline.adapt.AdaptSettings`; empty: the
defaults). A study's folder is reused when it exists, and a recipe's model when it was already
made (delete its folder to make it again). Prints one line per recipe and seed, and with --json
writes them all to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

PATIENTS, VISITS = 40, 5
FROZEN = "tiny-dino"


def _env(workdir: Path) -> dict[str, str]:
    env = {**os.environ,
           "ECZEMA_BATCH_DATABASE_URL": f"sqlite:///{(workdir / 'catalogue.sqlite3').resolve()}",
           "ECZEMA_BATCH_HOME": str(workdir / "home"),
           "ECZEMA_BATCH_MODEL_DIR": str(workdir / "models"),
           "ECZEMA_BATCH_EMBEDDER_MODEL": FROZEN, "ECZEMA_BATCH_SEGMENTER_MODEL": "tiny-seggpt",
           "COLUMNS": "120"}
    env.pop("ECZEMA_BATCH_CONFIG", None)
    return env


def _cli(workdir: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "eczema_batch", *args], env=_env(workdir),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`eczema-batch {' '.join(args)}` failed:\n{done.stderr}")


def setup(workdir: Path, seed: int) -> None:
    if (workdir / "models" / FROZEN).exists():
        return
    workdir.mkdir(parents=True, exist_ok=True)
    _cli(workdir, "synth", str(workdir / "study"), "--truth", str(workdir / "truth"),
         "--patients", str(PATIENTS), "--visits", str(VISITS), "--images-per-visit", "1",
         "--seed", str(seed))
    _cli(workdir, "ingest", str(workdir / "study"))
    _cli(workdir, "models", "make-tiny", str(workdir / "models"))


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_recipe(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = spec.partition("=")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = parse_value(value)
    return name, overrides


def adapt(workdir: Path, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Adapt in a child process (the settings are read from its environment)."""
    if (workdir / "models" / name).exists():
        return json.loads((workdir / "models" / name / "eczema-batch-model.json").read_text())
    done = subprocess.run(
        [sys.executable, "-m", "bench.adapt_sweep", "_adapt", name, json.dumps(overrides)],
        env=_env(workdir), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"adapting {name} failed:\n{done.stderr}")
    return json.loads((workdir / "models" / name / "eczema-batch-model.json").read_text())


def _adapt_here(name: str, overrides: dict[str, Any]) -> None:
    from eczema_batch.cli.common import _catalogue, _settings
    from eczema_batch.measuring.config import RunConfig
    from eczema_batch.pipeline.adapt import AdaptSettings, defaults_for
    from eczema_batch.training.adapt_embedder import adapt_study_embedder

    settings = _settings()
    config = RunConfig.from_settings(settings)

    def settings_of(image_size: int, tiny: bool) -> AdaptSettings:
        return defaults_for(image_size=image_size, tiny=tiny, **overrides)

    adapt_study_embedder(_catalogue(settings), config=config, name=name, base=FROZEN,
                         study=None, settings_of=settings_of)


def weight_distance(workdir: Path, name: str) -> float:
    """Relative L2 distance of the adapted backbone's weights from the frozen one's."""
    import torch
    from safetensors.torch import load_file

    def weights(model: str) -> dict[str, torch.Tensor]:
        return load_file(str(workdir / "models" / model / "model.safetensors"))

    a, b = weights(FROZEN), weights(name)
    keys = [k for k in a if k in b and a[k].shape == b[k].shape]
    num = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in keys)
    den = sum(float(a[k].float().pow(2).sum()) for k in keys)
    return (num / den) ** 0.5 if den else float("nan")


def evaluate(workdir: Path, names: list[str]) -> dict[str, Any]:
    out = workdir / f"evaluate-{len(names)}-{abs(hash(tuple(names))) % 10**8}.json"
    args = ["evaluate", "--segmenter", "none", "--no-ablation", "--fractions", "1.0",
            "--embedder-model", FROZEN]
    for name in names:
        args += ["--embedder-model", name]
    _cli(workdir, *args, "--output", str(out))
    doc = json.loads(out.read_text())
    comparison = doc["model_comparison"]
    configs = [c["models"]["embedder"]["name"] for c in comparison["configurations"]]
    figures: dict[str, Any] = {}
    for name, c in zip(configs, comparison["configurations"], strict=True):
        figures[name] = {"f1": c["methods"]["head"]["pooled"]}
    for d in comparison["differences"]:
        head = d["methods"]["head"]
        figures[configs[d["of"]]]["diff"] = head["weighted_f1"]
        figures[configs[d["of"]]]["ci95"] = list(head["ci95"])
    return figures


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_adapt":
        _adapt_here(sys.argv[2], json.loads(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--recipe", action="append", required=True)
    parser.add_argument("--json", type=Path, help="append the rows to this JSON-lines file")
    args = parser.parse_args()
    recipes = [parse_recipe(r) for r in args.recipe]
    for seed in args.seeds:
        workdir = args.workdir / f"seed{seed}"
        setup(workdir, seed)
        meta = {}
        for name, overrides in recipes:
            identity = adapt(workdir, name, overrides)
            curve = identity["loss_curve"]
            meta[name] = {"overrides": overrides, "loss_first": curve[0],
                          "loss_last": curve[-1], "moved": weight_distance(workdir, name)}
        figures = evaluate(workdir, [n for n, _ in recipes])
        print(f"seed {seed}: frozen head F1 {figures[FROZEN]['f1']:.3f}", flush=True)
        for name, _ in recipes:
            f, m = figures[name], meta[name]
            row = {"seed": seed, "recipe": name, **m, **f}
            print(f"  {name:>14}: F1 {f['f1']:.3f} diff {f['diff']:+.3f} "
                  f"[{f['ci95'][0]:+.3f}, {f['ci95'][1]:+.3f}]  loss {m['loss_first']:.2f}->"
                  f"{m['loss_last']:.2f} moved {m['moved']:.3f}  {m['overrides']}", flush=True)
            if args.json:
                with args.json.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
