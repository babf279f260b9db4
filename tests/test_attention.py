import pytest
import torch
from torch import nn

from ch02_attention.attention import MultiHeadAttention


def make(use_sdpa=True, **kw):
    torch.manual_seed(0)
    args = dict(d_in=32, d_out=32, context_length=12, dropout=0.0, num_heads=4, qkv_bias=True)
    args.update(kw)
    return MultiHeadAttention(**args, use_sdpa=use_sdpa).eval()


def test_shapes():
    layer = make(d_in=24, d_out=32)
    assert layer(torch.randn(3, 7, 24)).shape == (3, 7, 32)


def test_sdpa_and_explicit_paths_agree():
    fused, explicit = make(True), make(False)
    x = torch.randn(2, 12, 32)
    assert torch.allclose(fused(x), explicit(x), atol=1e-6)


def test_matches_torch_multihead_attention():
    ours = make()
    ref = nn.MultiheadAttention(32, 4, bias=True, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.c_attn.weight)
        ref.in_proj_bias.copy_(ours.c_attn.bias)
        ref.out_proj.weight.copy_(ours.c_proj.weight)
        ref.out_proj.bias.copy_(ours.c_proj.bias)
    x = torch.randn(2, 9, 32)
    expected, _ = ref(x, x, x, attn_mask=ours.causal_mask[:9, :9], need_weights=False)
    assert torch.allclose(ours(x), expected, atol=1e-6)


def test_causal_output_ignores_the_future():
    layer = make(False)
    x = torch.randn(1, 10, 32)
    changed = x.clone()
    changed[:, 6:] = torch.randn(1, 4, 32)
    assert torch.allclose(layer(x)[:, :6], layer(changed)[:, :6], atol=1e-6)
    assert not torch.allclose(layer(x)[:, 6:], layer(changed)[:, 6:])


def test_attention_weights_rows_sum_to_one_and_are_causal():
    layer = make(False)
    q, k, _ = layer.queries_keys_values(torch.randn(2, 8, 32))
    weights = layer.attention_weights(q, k)
    assert weights.shape == (2, 4, 8, 8)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 8))
    assert torch.all(weights.triu(1) == 0)


def test_dropout_only_in_training():
    layer = make(False, dropout=0.5)
    x = torch.randn(1, 8, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    assert not torch.allclose(layer(x), layer.eval()(x))


def test_mask_is_not_saved():
    assert "causal_mask" not in make().state_dict()
    assert set(make().state_dict()) == {"c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"}


@pytest.mark.parametrize("kw, match", [
    (dict(d_out=30, num_heads=4), r"d_out \(30\) must be divisible by num_heads \(4\)"),
    (dict(num_heads=0), "num_heads must be a positive int"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(context_length=2.5), "context_length must be a positive int"),
])
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_too_long_input():
    with pytest.raises(ValueError, match="sequence length 13 exceeds the context length 12"):
        make()(torch.randn(1, 13, 32))
