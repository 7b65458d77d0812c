"""nanmerge against mergekit on layer-aware recipes, float32 inputs: mergekit's
examples/gradient-slerp.yml (as published, `--form slices`, or in `models:` form) and a
passthrough frankenmerge in the form of examples/orcamini-platy-44layer.yml
(`--form frankenmerge`: layers [0, 3) of one model, then [1, 5) of the other), and the
gradient-slerp parameters over two slices, [0, 3) and [3, 5) (`--form gradient-slices`:
mergekit counts each slice's depth from 0).

Builds two tiny random Llama checkpoints, merges them with mergekit (`mergekit-yaml`, from
the environment named by MERGEKIT_BIN, default /tmp/mk/bin) and with `nanmerge run`, and
prints the largest absolute difference per tensor group. Never a test dependency:
`python benchmarks/layered_vs_mergekit.py [--form slices|models|frankenmerge|gradient-slices]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--form", choices=["slices", "models", "frankenmerge", "gradient-slices"], default="models"
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
        write_llama(root / "a", 0)
        write_llama(root / "b", 1)
        (root / "recipe.yml").write_text(yaml.safe_dump(recipe(root / "a", root / "b", args.form)))
        subprocess.run(
            [str(mergekit_bin / "mergekit-yaml"), str(root / "recipe.yml"), str(root / "mk")],
            check=True,
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "nanmerge",
                "run",
                str(root / "recipe.yml"),
                "--output",
                str(root / "nm"),
                "--quiet",
            ],
            check=True,
        )
        theirs = {}
        for shard in (root / "mk").glob("*.safetensors"):
            theirs |= load_file(shard)
        ours = load_file(root / "nm" / "model.safetensors")
        if ours.keys() != theirs.keys():
            print(f"tensor names differ: {sorted(set(ours) ^ set(theirs))[:8]}")
            return
        worst = max((float((ours[n] - theirs[n]).abs().max()), n) for n in ours)
        groups: dict[str, float] = {}
        for name in ours:
            group = next((g for g in ("self_attn", "mlp", "layernorm") if g in name), name)
            groups[group] = max(
                groups.get(group, 0.0), float((ours[name] - theirs[name]).abs().max())
            )
        print(f"form: {args.form}; tensors: {len(ours)} (mergekit wrote {len(theirs)})")
        for group, diff in groups.items():
            print(f"  {group:30s} max |nanmerge - mergekit| = {diff:.3g}")
        print(f"largest: {worst[0]:.3g} at {worst[1]}")


if __name__ == "__main__":
    main()
