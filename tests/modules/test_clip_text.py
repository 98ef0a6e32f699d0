"""SD v1's text encoder: equal to transformers' CLIP text model, CompVis's keys, causal."""
from __future__ import annotations

import pytest
import torch

from ldm.config import CLIPTextConfig
from ldm.modules.clip_text import FrozenCLIPEmbedder

PREFIX = "transformer.text_model."


def random_embedder(cfg: CLIPTextConfig, seed: int = 0) -> FrozenCLIPEmbedder:
    torch.manual_seed(seed)
    model = FrozenCLIPEmbedder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # LayerNorms too: no identity weights
            p.normal_(0, 0.05)
    return model


def transformers_twin(model: FrozenCLIPEmbedder, cfg: CLIPTextConfig):
    """transformers' CLIPTextModel with ViT-L/14's published text config (openai/
    clip-vit-large-patch14 config.json) at `cfg`'s sizes, holding `model`'s weights."""
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel

    hf_cfg = HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embed,
                      intermediate_size=4 * cfg.n_embed, num_hidden_layers=cfg.n_layer,
                      num_attention_heads=cfg.n_head, max_position_embeddings=cfg.max_seq_len,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
                      bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    twin = CLIPTextModel(hf_cfg).eval()
    # transformers 4.x keys start with "text_model.", 5.x without: match what this one has.
    keep = "text_model." if any(k.startswith("text_model.") for k in twin.state_dict()) else ""
    state = {keep + k[len(PREFIX):]: v for k, v in model.state_dict().items()}
    twin.load_state_dict(state, strict=True)
    return twin


@pytest.mark.parametrize("cfg", [CLIPTextConfig(n_embed=64, n_layer=2, n_head=4),
                                 CLIPTextConfig()], ids=["reduced", "vit-l-14"])
def test_equals_transformers_clip_text_model(cfg):
    model = random_embedder(cfg)
    twin = transformers_twin(model, cfg)
    ids, _ = model.tokenize(["a photograph of an astronaut riding a horse", "", "a red circle"])
    with torch.no_grad():
        ours = model.embed_tokens(ids)
        theirs = twin(input_ids=ids).last_hidden_state
    assert ours.shape == (3, 77, cfg.n_embed)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5


def test_keys_are_compvis_frozen_clip_embedder_keys():
    cfg = CLIPTextConfig(n_embed=64, n_layer=2, n_head=4)
    keys = set(FrozenCLIPEmbedder(cfg).state_dict())
    layer = [f"{PREFIX}encoder.layers.1.{k}" for k in (
        "layer_norm1.weight", "self_attn.q_proj.weight", "self_attn.k_proj.bias",
        "self_attn.v_proj.weight", "self_attn.out_proj.bias", "layer_norm2.bias",
        "mlp.fc1.weight", "mlp.fc2.bias")]
    assert {f"{PREFIX}embeddings.token_embedding.weight",
            f"{PREFIX}embeddings.position_embedding.weight",
            f"{PREFIX}final_layer_norm.weight", *layer} <= keys
    assert len(keys) == 2 + 16 * 2 + 2  # embeddings, 16 tensors per layer, final norm
    assert not any("position_ids" in k or "causal_mask" in k for k in keys)


def test_attention_is_causal():
    model = random_embedder(CLIPTextConfig(n_embed=64, n_layer=2, n_head=4))
    ids, _ = model.tokenize(["a red circle", "a red square"])
    with torch.no_grad():
        out = model.embed_tokens(ids)
    # Tokens 0-3 ("<start> a red"): equal; from "circle"/"square" on, different.
    torch.testing.assert_close(out[0, :3], out[1, :3])
    assert not torch.allclose(out[0, 3:], out[1, 3:])


def test_strings_in_ids_out():
    model = random_embedder(CLIPTextConfig(n_embed=64, n_layer=1, n_head=4))
    with torch.no_grad():
        assert model("a fox").shape == (1, 77, 64)
        with pytest.raises(TypeError, match="strings, not ids"):
            model(torch.zeros(1, 77, dtype=torch.long))
