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


# experiment=digits_t2i made tiny: a smaller net and text encoder, T = 200, 800 steps (~45 s on 2 cores; prompts
# learned from scratch need more steps than labels: measured 400 steps -> 17-27% of the prompted class,
# 600 -> 43-50%, 800 -> 83-87% at w = 3), no callbacks but the end-of-run grid
TINY_T2I = [
    "experiment=digits_t2i", "logger=csv", "model.ch=16", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
    "model.attn_resolutions=[]", "model.cross_attention_resolutions=[4]", "text_encoder.width=32",
    "text_encoder.depth=1", "text_encoder.token_dim=8", "schedule.T=200", "trainer.max_steps=800",
    "optimizer.lr=3e-3", "module.lr_warmup_steps=20", "trainer.check_val_every_n_epoch=1000",
    "callbacks.evaluation=null", "~callbacks.sample_grid.samplers.ddpm", "callbacks.sample_grid.samplers.ddim.steps=10",
    "callbacks.sample_grid.num_samples=20",
]


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory):
    from test_conditional_cli import run

    run_dir = tmp_path_factory.mktemp("t2i")
    run("difflab.cli.train", *TINY_T2I, f"hydra.run.dir={run_dir}", cwd=run_dir)
    return run_dir


@pytest.mark.slow
def test_digits_t2i_samples_the_prompted_class(t2i_run, tmp_path):
    import numpy as np

    from test_conditional_cli import digits_judge, run

    ckpt = t2i_run / "checkpoints" / "last.ckpt"
    assert (t2i_run / "samples" / "ddim_step0000800.png").is_file()  # one row per class prompt
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten seven\n\nthe digit 1\n")  # blank lines are skipped
    run("difflab.cli.sample", f"ckpt_path={ckpt}", f"prompts_file={prompts}", "guidance_scale=3", "num_samples=20",
        "sampler.steps=20", f"out_dir={tmp_path}", cwd=t2i_run)
    (npz,) = tmp_path.glob("ddim-20_n20_seed0_prompts-prompts-*_w3.npz")
    data = np.load(npz)
    assert list(data.keys())[0] == "images" and data["images"].shape == (40, 8, 8, 1)
    assert data["prompts"].tolist() == ["a handwritten seven"] * 20 + ["the digit 1"] * 20
    pred = digits_judge().predict(data["images"][..., 0].reshape(40, 64) / 255.0 * 16.0)
    sevens, ones = (pred[:20] == 7).mean(), (pred[20:] == 1).mean()
    assert sevens >= 0.6 and ones >= 0.6, f"'a handwritten seven' -> {pred[:20]}, 'the digit 1' -> {pred[20:]}"


@pytest.mark.slow
def test_text_model_eval_rows_and_bad_prompts(t2i_run, tmp_path):
    import json

    from hydra.core.global_hydra import GlobalHydra

    from difflab.cli.evaluate import evaluate
    from difflab.cli.sample import sample
    from test_ddp import random_classifier
    from test_distill import composed

    ckpt = t2i_run / "checkpoints" / "last.ckpt"
    clf = random_classifier(tmp_path / "clf.ckpt")
    try:
        evaluate(composed("eval", [f"ckpt_path={ckpt}", f"paths.cache_dir={tmp_path / 'cache'}", "num_samples=20",
                                   "batch_size=20", "samplers=[ddim-4]", "guidance_scales=[1,3]", "bpd.num_images=0",
                                   "metrics.extractor=classifier", f"metrics.classifier_ckpt={clf}",
                                   "metrics.names=[fid,precision_recall]", f"out_dir={tmp_path / 'eval'}"]))
        for overrides, match in (([], "is a text-to-image model: give prompt="),
                                 (["prompt=''"], "prompt 0 is empty"),
                                 (["label=3"], "not label="),
                                 (["prompt='a seven'", "prompts_file=x.txt"], "not both"),
                                 ([f"prompts_file={tmp_path / 'none.txt'}"], "is not a file")):
            with pytest.raises(ValueError, match=match):
                sample(composed("sample", [f"ckpt_path={ckpt}", "num_samples=2", f"out_dir={tmp_path}", *overrides]))
    finally:
        GlobalHydra.instance().clear()
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())["results"]
    assert [r["sampler"] for r in rows] == ["ddim-4-w1-train", "ddim-4-w3-train", "ddim-4-w1-heldout", "ddim-4-w3-heldout"]
    for r in rows:
        assert 0.0 <= r["prompt_accuracy"] <= 1.0 and len(r["prompt_accuracies"]) == 10 and len(r["prompt_fid"]) == 10
    assert (tmp_path / "eval" / "metrics_prompt_sweep.png").is_file()
