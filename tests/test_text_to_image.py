"""Text-to-image: cross-attention against a hand computation, the text U-Net's contract, CFG on prompts, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from difflab.nets.attention import CrossAttention, SpatialTransformer
from difflab.nets.conditioning import Conditioning
from difflab.nets.unet import UNet
from difflab.samplers.generate import Guidance, generate, guided_model_fn, text_conditions
from difflab.samplers import DDIM
from difflab.diffusion.schedules import NoiseSchedule, linear_betas


class WordTokenizer:
    """A tiny deterministic tokenizer for the net's tests: start 1, one id per word (2..8), end 9, padding 0."""

    context_length = 6

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(prompts), self.context_length, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = [1] + [2 + sum(map(ord, w)) % 7 for w in p.split()][: self.context_length - 2] + [9]
            ids[i, : len(words)] = torch.tensor(words)
        return ids, ids > 0


class BagEncoder(nn.Module):
    """Embeddings of the tokens (a stand-in for nets/text.py's encoders; those have their own tests)."""

    width, trainable = 8, True

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = WordTokenizer()
        self.embed = nn.Embedding(10, self.width)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embed(tokens)
        return e, (e * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def text_net(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(image_size=8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
               dropout=0.0, text_encoder=BagEncoder(), cross_attention_resolutions=(4,), cross_attention_heads=2)
    for p in net.parameters():  # the zero-initialised projections would hide the text path
        if p.abs().sum() == 0:
            nn.init.normal_(p, std=0.05)
    return net.eval()


def test_cross_attention_matches_a_hand_computation_and_ignores_padding():
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=4, context_dim=3, heads=2)
    x, ctx = torch.randn(2, 5, 4), torch.randn(2, 6, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    q = (x @ attn.to_q.weight.T).view(2, 5, 2, 2)
    k = (ctx @ attn.to_k.weight.T).view(2, 6, 2, 2)
    v = (ctx @ attn.to_v.weight.T).view(2, 6, 2, 2)
    scores = torch.einsum("bnhd,blhd->bhnl", q, k) / math.sqrt(2)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    heads = torch.einsum("bhnl,blhd->bnhd", scores.softmax(-1), v).reshape(2, 5, 4)
    want = heads @ attn.to_out.weight.T + attn.to_out.bias
    got = attn(x, ctx, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    changed = ctx.clone()
    changed[0, 3:] = 100.0  # the padded tokens of sample 0
    torch.testing.assert_close(attn(x, changed, mask), got)


def test_spatial_transformer_starts_as_the_identity():
    block = SpatialTransformer(channels=8, context_dim=3, heads=2)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(block(x, torch.randn(2, 5, 3), torch.ones(2, 5, dtype=torch.bool)), x)


def test_text_unet_reads_the_prompt_and_the_empty_prompt_is_its_null_condition():
    net = text_net()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    a = net(x, t, net.prompt_condition(["a seven", "a seven"]))
    b = net(x, t, net.prompt_condition(["a two", "a two"]))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(net(x, t), net(x, t, net.null_condition(2)))
    encoded = net.encode_condition(net.prompt_condition(["a seven", "a seven"]))
    torch.testing.assert_close(net(x, t, encoded), a)  # generate() encodes once per call
    with pytest.raises(ValueError, match="does not read"):
        net(x, t, Conditioning(labels=torch.tensor([1, 2])))
    with pytest.raises(ValueError, match="not both"):
        UNet(image_size=8, in_channels=1, ch=8, ch_mult=(1,), attn_resolutions=(), num_classes=10, text_encoder=BagEncoder())
    with pytest.raises(ValueError, match="needs a text encoder"):
        UNet(image_size=8, in_channels=1, ch=8, ch_mult=(1, 2), attn_resolutions=(), cross_attention_resolutions=(4,))


def test_prompt_guidance_scale_zero_and_one_are_the_unconditional_and_conditional_nets():
    net = text_net()
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 300)
    cond, null = text_conditions(net, ["a one", "a two", "a three"], None, x.device)
    with torch.no_grad():
        for w, want in ((1.0, net(x, t, cond)), (0.0, net(x, t)), (3.0, net(x, t) + 3.0 * (net(x, t, cond) - net(x, t)))):
            torch.testing.assert_close(guided_model_fn(net, cond, Guidance(scale=w), 1, null)(x, t), want,
                                       rtol=1e-4, atol=1e-5)
        neg, neg_null = text_conditions(net, ["a one"] * 3, "a two", x.device)
        torch.testing.assert_close(neg_null.context, net.encode_condition(net.prompt_condition(["a two"] * 3)).context)


def test_generate_with_prompts_and_its_refusals():
    net, schedule = text_net(), NoiseSchedule.from_betas(linear_betas(100))
    kwargs = dict(parameterization="eps", guidance=Guidance(scale=2.0))
    images = generate(net, schedule, DDIM(steps=3), [0, 1], prompts="a seven", **kwargs)
    again = generate(net, schedule, DDIM(steps=3), [1], prompts=["a seven"], **kwargs)
    torch.testing.assert_close(images[1:], again, rtol=0, atol=1e-4)  # per-sample seeds: batch-independent
    with pytest.raises(ValueError, match="empty"):
        generate(net, schedule, DDIM(steps=3), [0], prompts=[" "], **kwargs)
    with pytest.raises(ValueError, match="not label="):
        generate(net, schedule, DDIM(steps=3), [0], labels=[3], **kwargs)
    with pytest.raises(ValueError, match="2 prompts for 3 samples"):
        generate(net, schedule, DDIM(steps=3), [0, 1, 2], prompts=["a", "b"], **kwargs)
    plain = UNet(image_size=8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_classes=10).eval()
    with pytest.raises(ValueError, match="does not read text"):
        generate(plain, schedule, DDIM(steps=3), [0], prompts="a seven", **kwargs)
