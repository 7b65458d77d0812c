"""nanmerge against mergekit on layer-aware recipes, float32 inputs: mergekit's
examples/gradient-slerp.yml (as published, `--form slices`, or in `models:` form) and a
passthrough frankenmerge in the form of examples/orcamini-platy-44layer.yml
(`--form frankenmerge`: layers [0, 3) of one model, then [1, 5) of the other), and the
gradient-slerp parameters over two slices, [0, 3) and [3, 5) (`--form gradient-slices`:
mergekit counts each slice's depth from 0). `--form mega` is mergekit's examples/mega.yml
(two YAML documents: the gradient slerp over slices, then TIES of its output and a third
model over a fourth as base, with a per-model density gradient and a filtered weight), run
by mergekit-yaml once per document and by `nanmerge run` on the whole file; it also counts
entries beyond float rounding (none are expected: a translated recipe runs TIES with
mergekit's conventions, its int(density n) keep counts included).

Builds tiny random Llama checkpoints, merges them with mergekit (`mergekit-yaml`, from
the environment named by MERGEKIT_BIN, default /tmp/mk/bin) and with `nanmerge run`, and
prints the largest absolute difference per tensor group. Never a test dependency:
`python benchmarks/layered_vs_mergekit.py [--form slices|models|frankenmerge|gradient-slices|mega]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

LAYERS, HIDDEN, INTER, VOCAB = 5, 16, 32, 64
EXAMPLE = {
    "merge_method": "slerp",
    "parameters": {
        "t": [
            {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
            {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
            {"value": 0.5},
        ]
    },
    "dtype": "float32",
}


def llama_config() -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def write_llama(folder: Path, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in "qkvo":
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{p}mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{p}mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[f"{p}input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    folder.mkdir(parents=True)
    save_file(
        {n: torch.randn(s, generator=gen) for n, s in shapes.items()}, folder / "model.safetensors"
    )
    (folder / "config.json").write_text(json.dumps(llama_config()))


def recipe(a: Path, b: Path, form: str) -> dict[str, object]:
    if form == "gradient-slices":  # two slices, each with its own depth for the gradient
        spans = [[0, 3], [3, LAYERS]]
        slices = [
            {"sources": [{"model": str(m), "layer_range": span} for m in (a, b)]} for span in spans
        ]
        return {"slices": slices, "base_model": str(a), **EXAMPLE}
    if form == "frankenmerge":
        slices = [
            {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(b), "layer_range": [1, LAYERS]}]},
        ]
        return {"slices": slices, "merge_method": "passthrough", "dtype": "float32"}
    if form == "slices":
        sources = [{"model": str(m), "layer_range": [0, LAYERS]} for m in (a, b)]
        inputs: dict[str, object] = {"slices": [{"sources": sources}]}
    else:
        inputs = {"models": [{"model": str(a)}, {"model": str(b)}]}
    return {**inputs, "base_model": str(a), **EXAMPLE}


# mega.yml's densities: density n is fractional for most tensors, where int() and
# round-half-up differ
DENSITIES: dict[str, Any] = {"gradient": [1, 0.7, 0.1], "flat": 0.33}


def mega(root: Path, slerped: Path, densities: dict[str, Any]) -> list[dict[str, object]]:
    """examples/mega.yml with its four models as root/{a,b,c,base}, 5 layers, float32;
    the second document reads `slerped` (the first's output)."""
    sources = [{"model": str(root / m), "layer_range": [0, LAYERS]} for m in "ab"]
    slerp = {"slices": [{"sources": sources}], "base_model": str(root / "a"), **EXAMPLE}
    ties = {
        "models": [
            {"model": str(slerped), "parameters": {"density": densities["gradient"], "weight": 1}},
            {
                "model": str(root / "c"),
                "parameters": {
                    "density": densities["flat"],
                    "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}],
                },
            },
        ],
        "merge_method": "ties",
        "base_model": str(root / "base"),
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float32",
    }
    return [{**slerp, "out_path": str(slerped)}, {**ties, "out_path": str(root / "nm")}]


def nanmerge_run(recipe_file: Path, output: Path | None) -> None:
    out = ["--output", str(output)] if output is not None else []
    cmd = [sys.executable, "-m", "nanmerge", "run", str(recipe_file), *out, "--quiet"]
    subprocess.run(cmd, check=True)


def shards(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in folder.glob("*.safetensors"):
        tensors |= load_file(shard)
    return tensors


def compare(
    ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], label: str
) -> dict[str, int]:
    """Print the largest |nanmerge - mergekit| per tensor group and overall; return, per
    tensor, the entries that differ by more than float32 rounding (1e-5 relative)."""
    if ours.keys() != theirs.keys():
        print(f"{label}: tensor names differ: {sorted(set(ours) ^ set(theirs))[:8]}")
        return {}
    diffs = {n: (ours[n] - theirs[n]).abs() for n in ours}
    beyond = {n: int((d > 1e-5 * (1 + theirs[n].abs())).sum()) for n, d in diffs.items()}
    worst = max((float(d.max()), n) for n, d in diffs.items())
    groups: dict[str, float] = {}
    for name, d in diffs.items():
        group = next((g for g in ("self_attn", "mlp", "layernorm") if g in name), name)
        groups[group] = max(groups.get(group, 0.0), float(d.max()))
    print(f"{label}: tensors: {len(ours)} (mergekit wrote {len(theirs)})")
    for group, diff in groups.items():
        print(f"  {group:30s} max |nanmerge - mergekit| = {diff:.3g}")
    print(f"  largest: {worst[0]:.3g} at {worst[1]}")
    return beyond


def run_mega(root: Path, mergekit_bin: Path) -> None:
    densities = DENSITIES
    for seed, name in enumerate(["a", "b", "c", "base"]):
        write_llama(root / name, seed)
    for i, doc in enumerate(mega(root, root / "mk-slerp", densities)):
        alone = {k: v for k, v in doc.items() if k != "out_path"}  # mergekit-yaml's is an argument
        (root / f"mk{i}.yml").write_text(yaml.safe_dump(alone))
        out = root / ("mk-slerp" if i == 0 else "mk")
        mergekit = [str(mergekit_bin / "mergekit-yaml"), str(root / f"mk{i}.yml"), str(out)]
        subprocess.run(mergekit, check=True)
    (root / "mega.yml").write_text(
        yaml.safe_dump_all(mega(root, root / "nm-slerp", densities), sort_keys=False)
    )
    nanmerge_run(root / "mega.yml", None)
    print(f"form: mega; densities {densities}")
    compare(shards(root / "nm-slerp"), shards(root / "mk-slerp"), "document 1 (slerp)")
    ours, theirs = shards(root / "nm"), shards(root / "mk")
    beyond = compare(ours, theirs, "document 2 (ties)")
    print(
        f"  entries beyond float rounding: {sum(beyond.values())} of "
        f"{sum(t.numel() for t in ours.values())}, in {sum(v > 0 for v in beyond.values())} "
        "tensors"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--form",
        choices=["slices", "models", "frankenmerge", "gradient-slices", "mega"],
        default="models",
    )
    parser.add_argument(
        "--plain-gradient",
        action="store_true",
        help="t: [0.1, 0.9] for every tensor, to compare where embeddings, norms and head fall",
    )
    args = parser.parse_args()
    if args.plain_gradient:
        EXAMPLE["parameters"] = {"t": [0.1, 0.9]}
    mergekit_bin = Path(os.environ.get("MERGEKIT_BIN", "/tmp/mk/bin"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.form == "mega":
            run_mega(root, mergekit_bin)
            return
        write_llama(root / "a", 0)
        write_llama(root / "b", 1)
        (root / "recipe.yml").write_text(yaml.safe_dump(recipe(root / "a", root / "b", args.form)))
        subprocess.run(
            [str(mergekit_bin / "mergekit-yaml"), str(root / "recipe.yml"), str(root / "mk")],
            check=True,
        )
        nanmerge_run(root / "recipe.yml", root / "nm")
        compare(shards(root / "nm"), shards(root / "mk"), f"form: {args.form}")


if __name__ == "__main__":
    main()
