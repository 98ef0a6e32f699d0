"""BERT tokenizer ids, CompVis BERTEmbedder state-dict keys, and encoder numerics."""
from __future__ import annotations

import math

import pytest
import torch

from ldm.config import TextEncoderConfig
from ldm.modules.text_encoder import BERTEmbedder, load_bert_tokenizer

CLS, SEP, PAD = 101, 102, 0
A, RED = 1037, 2417  # bert-base-uncased ids of "a" and "red"


@pytest.fixture(scope="module")
def tokenizer():
    return load_bert_tokenizer(max_length=77)


def tiny_cfg(**kw) -> TextEncoderConfig:
    base = dict(n_embed=32, n_layer=2, vocab_size=30522, max_seq_len=77)
    base.update(kw)
    return TextEncoderConfig(**base)


# --- tokenizer -----------------------------------------------------------------------------

def test_tokenizer_ids_are_bert_base_uncased(tokenizer):
    ids, truncated = tokenizer.tokenize(["a red", "A RED"])
    assert ids.dtype == torch.int64 and ids.shape == (2, 77)
    expected = [CLS, A, RED, SEP] + [PAD] * 73
    assert ids[0].tolist() == expected
    assert ids[1].tolist() == expected  # uncased
    assert truncated == [False, False]
    assert tokenizer.vocab_size == 30522


def test_tokenizer_single_string_and_call(tokenizer):
    ids = tokenizer("a")
    assert ids.shape == (1, 77)
    assert ids[0, :3].tolist() == [CLS, A, SEP]


def test_tokenizer_reports_truncation(tokenizer):
    exact = " ".join(["red"] * 75)  # 75 words + [CLS] + [SEP] = 77: fits exactly
    long = " ".join(["red"] * 76)
    ids, truncated = tokenizer.tokenize([exact, long, "a"])
    assert truncated == [False, True, False]
    assert ids[0].tolist() == [CLS] + [RED] * 75 + [SEP]
    assert ids[1].tolist() == [CLS] + [RED] * 75 + [SEP]  # cut, still closed by [SEP]


def test_vocab_folder_override(tmp_path, monkeypatch):
    """$LDM_BERT_VOCAB and the argument are honoured (an empty folder must then fail)."""
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        load_bert_tokenizer(vocab_dir=tmp_path)
    monkeypatch.setenv("LDM_BERT_VOCAB", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        load_bert_tokenizer()


# --- state-dict keys -----------------------------------------------------------------------

def compvis_keys(n_embed: int, n_layer: int, vocab: int, seq: int) -> list[tuple[str, tuple]]:
    """Keys CompVis's BERTEmbedder gets from x_transformer.TransformerWrapper(Encoder(...)).

    Encoder layers alternate ('a', 'f'); each is ModuleList([LayerNorm, block, Residual]);
    Attention has heads=8, dim_head=64 (inner 512), bias-free q/k/v; FeedForward is
    Sequential(Sequential(Linear, GELU), Dropout, Linear) with mult 4.
    """
    d, inner, ff = n_embed, 8 * 64, 4 * n_embed
    t = "transformer."
    keys = [(t + "token_emb.weight", (vocab, d)), (t + "pos_emb.emb.weight", (seq, d))]
    for i in range(n_layer):
        for k, kind in ((2 * i, "a"), (2 * i + 1, "f")):
            p = f"{t}attn_layers.layers.{k}."
            keys += [(p + "0.weight", (d,)), (p + "0.bias", (d,))]
            if kind == "a":
                keys += [
                    (p + "1.to_q.weight", (inner, d)),
                    (p + "1.to_k.weight", (inner, d)),
                    (p + "1.to_v.weight", (inner, d)),
                    (p + "1.to_out.weight", (d, inner)),
                    (p + "1.to_out.bias", (d,)),
                ]
            else:
                keys += [
                    (p + "1.net.0.0.weight", (ff, d)),
                    (p + "1.net.0.0.bias", (ff,)),
                    (p + "1.net.2.weight", (d, ff)),
                    (p + "1.net.2.bias", (d,)),
                ]
    keys += [
        (t + "norm.weight", (d,)),
        (t + "norm.bias", (d,)),
        (t + "to_logits.weight", (vocab, d)),
        (t + "to_logits.bias", (vocab,)),
    ]
    return keys


def test_state_dict_keys_match_compvis():
    model = BERTEmbedder(tiny_cfg(vocab_size=1000, max_seq_len=20))
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == compvis_keys(32, 2, 1000, 20)
    assert list(model.buffers()) == []


# --- numerics ------------------------------------------------------------------------------

def reference_encoder(sd: dict[str, torch.Tensor], ids: torch.Tensor, n_layer: int) -> torch.Tensor:
    """x-transformers Encoder math in plain torch ops: pre-norm residual blocks of
    8-head softmax attention (scale 64**-0.5, no mask) and erf-GELU MLP, then LayerNorm."""
    t = "transformer."

    def layer_norm(x, prefix):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * sd[prefix + "weight"] + sd[prefix + "bias"]

    def heads(x):  # (B, N, 512) -> (B, 8, N, 64)
        b, n, _ = x.shape
        return x.reshape(b, n, 8, 64).permute(0, 2, 1, 3)

    n = ids.shape[1]
    x = sd[t + "token_emb.weight"][ids] + sd[t + "pos_emb.emb.weight"][:n][None]
    for i in range(n_layer):
        p = f"{t}attn_layers.layers.{2 * i}."
        h = layer_norm(x, p + "0.")
        q, k, v = (heads(h @ sd[p + f"1.to_{c}.weight"].T) for c in "qkv")
        scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(64)
        w = torch.exp(scores - scores.amax(-1, keepdim=True))
        w = w / w.sum(-1, keepdim=True)
        o = torch.einsum("bhij,bhjd->bhid", w, v).permute(0, 2, 1, 3).flatten(2)
        x = x + o @ sd[p + "1.to_out.weight"].T + sd[p + "1.to_out.bias"]

        p = f"{t}attn_layers.layers.{2 * i + 1}."
        h = layer_norm(x, p + "0.")
        h = h @ sd[p + "1.net.0.0.weight"].T + sd[p + "1.net.0.0.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + h @ sd[p + "1.net.2.weight"].T + sd[p + "1.net.2.bias"]
    return layer_norm(x, t + "norm.")


def randomize_(model: torch.nn.Module) -> None:
    """Non-trivial values everywhere (LayerNorm affine and biases included)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_embed_tokens_matches_reference_math():
    model = BERTEmbedder(tiny_cfg(vocab_size=500, max_seq_len=12)).eval()
    randomize_(model)
    ids = torch.randint(0, 500, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.embed_tokens(ids)
        want = reference_encoder(model.state_dict(), ids, n_layer=2)
        logits = model.transformer(ids)
    assert got.shape == (3, 12, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    sd = model.state_dict()
    w, b = sd["transformer.to_logits.weight"], sd["transformer.to_logits.bias"]
    torch.testing.assert_close(logits, want @ w.T + b, rtol=1e-5, atol=1e-5)


def test_pad_tokens_are_attended():
    """No attention mask, as CompVis: changing a [PAD] position changes every output."""
    model = BERTEmbedder(tiny_cfg(max_seq_len=6)).eval()
    ids = torch.tensor([[CLS, A, SEP, 0, 0, 0]])
    other = ids.clone()
    other[0, -1] = 7
    with torch.no_grad():
        assert not torch.allclose(model.embed_tokens(ids)[0, 0], model.embed_tokens(other)[0, 0])


def test_forward_on_text(tokenizer):
    model = BERTEmbedder(tiny_cfg(n_layer=1)).eval()
    model._tokenizer = tokenizer  # reuse the module fixture instead of loading it again
    with torch.no_grad():
        z = model(["a red", "a"])
        z_ids = model.embed_tokens(tokenizer(["a red", "a"]))
        z_enc = model.encode("a red")
    assert z.shape == (2, 77, 32)
    torch.testing.assert_close(z, z_ids)
    torch.testing.assert_close(z_enc[0], z[0])


def test_forward_on_ids_without_tokenizer():
    model = BERTEmbedder(tiny_cfg(vocab_size=200, max_seq_len=8, use_tokenizer=False)).eval()
    ids = torch.randint(0, 200, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model.embed_tokens(ids))


def test_default_init_is_small_normal_embeddings():
    torch.manual_seed(0)
    model = BERTEmbedder(tiny_cfg(vocab_size=4000, max_seq_len=77))
    for w in (model.transformer.token_emb.weight, model.transformer.pos_emb.emb.weight):
        assert abs(w.std().item() - 0.02) < 0.002
        assert abs(w.mean().item()) < 0.002


def test_the_unused_logits_head_can_be_left_out():
    import torch

    from ldm.config import TextEncoderConfig
    from ldm.modules.text_encoder import BERTEmbedder

    cfg = dict(n_embed=32, n_layer=1, use_tokenizer=False)
    full, slim = (BERTEmbedder(TextEncoderConfig(**cfg, logits_head=h)) for h in (True, False))
    dropped = {k for k in full.state_dict() if k not in slim.state_dict()}
    assert dropped == {"transformer.to_logits.weight", "transformer.to_logits.bias"}
    slim.load_state_dict({k: v for k, v in full.state_dict().items() if k not in dropped})
    ids = torch.randint(0, 30522, (2, 77))
    torch.testing.assert_close(slim.embed_tokens(ids), full.embed_tokens(ids))
    with pytest.raises(ValueError, match="no logits head"):
        slim.transformer(ids)
