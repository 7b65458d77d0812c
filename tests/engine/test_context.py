"""Tensor contexts: the layer, stack size and role read from the common families' names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanmerge.engine._context import config_layers, tensor_contexts

# name -> (layer, role), as a reader of each architecture's modeling code would place it
FAMILIES = {
    "llama": {
        "model.embed_tokens.weight": (None, "embedding"),
        "model.layers.0.self_attn.q_proj.weight": (0, "attention"),
        "model.layers.0.mlp.down_proj.weight": (0, "mlp"),
        "model.layers.2.input_layernorm.weight": (2, "norm"),
        "model.layers.2.block_sparse_moe.experts.7.w1.weight": (2, "mlp"),
        "model.norm.weight": (None, "norm"),
        "lm_head.weight": (None, "head"),
    },
    "gpt2": {
        "transformer.wte.weight": (None, "embedding"),
        "transformer.h.0.ln_1.weight": (0, "norm"),
        "transformer.h.0.attn.c_proj.weight": (0, "attention"),
        "transformer.h.2.mlp.c_proj.weight": (2, "mlp"),
        "transformer.ln_f.bias": (None, "norm"),
    },
    "bert": {
        "bert.embeddings.word_embeddings.weight": (None, "embedding"),
        "bert.embeddings.LayerNorm.weight": (None, "norm"),
        "bert.encoder.layer.0.attention.self.query.weight": (0, "attention"),
        "bert.encoder.layer.0.attention.output.LayerNorm.weight": (0, "norm"),
        "bert.encoder.layer.2.intermediate.dense.weight": (2, "mlp"),
        "bert.encoder.layer.2.output.dense.weight": (2, "mlp"),
        "bert.pooler.dense.weight": (None, "other"),
        "classifier.weight": (None, "head"),
    },
    "clip": {
        "vision_model.embeddings.patch_embedding.weight": (None, "embedding"),
        "vision_model.encoder.layers.0.self_attn.k_proj.weight": (0, "attention"),
        "vision_model.encoder.layers.2.mlp.fc1.weight": (2, "mlp"),
        "vision_model.post_layernorm.weight": (None, "norm"),
    },
    "openclip": {
        "visual.transformer.resblocks.0.attn.in_proj_weight": (0, "attention"),
        "visual.transformer.resblocks.2.mlp.c_fc.weight": (2, "mlp"),
        "visual.ln_post.weight": (None, "norm"),
    },
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_places_layers_counts_the_stack_and_names_roles(family: str) -> None:
    expected = FAMILIES[family]
    contexts = tensor_contexts(expected)
    for name, (layer, role) in expected.items():
        context = contexts[name]
        assert (context.name, context.layer, context.role) == (name, layer, role)
        assert context.num_layers == (None if layer is None else 3)


def test_t5_encoder_and_decoder_are_two_stacks() -> None:
    names = [
        "shared.weight",
        "encoder.block.0.layer.1.DenseReluDense.wi.weight",
        "encoder.block.1.layer.0.SelfAttention.q.weight",
        "decoder.block.5.layer.0.SelfAttention.q.weight",
    ]
    contexts = tensor_contexts(names)
    assert contexts["shared.weight"].role == "embedding"
    assert [(contexts[n].layer, contexts[n].num_layers) for n in names[1:]] == [
        (0, 2),
        (1, 2),
        (5, 6),
    ]
    assert [contexts[n].role for n in names[1:]] == ["mlp", "attention", "attention"]


def test_a_config_states_the_layer_count_of_a_single_stack(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 32}))
    layers = config_layers(tmp_path)
    assert layers == 32
    contexts = tensor_contexts(["model.layers.3.mlp.up_proj.weight"], configured_layers=layers)
    assert contexts["model.layers.3.mlp.up_proj.weight"].num_layers == 32
    assert config_layers(tmp_path / "absent") is None


def test_unknown_names_get_no_layer() -> None:
    context = tensor_contexts(["weird.thing.7.weight"])["weird.thing.7.weight"]
    assert (context.layer, context.num_layers, context.role) == (None, None, "other")
