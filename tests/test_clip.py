"""mini_clip, CLIP guidance and CLIP score: InfoNCE by hand, the temperature's clamp, the guidance gradient, scale 0 bit
for bit, CLIP score against torchmetrics, and the CLI end to end on tiny settings (digits_clip -> guided sampling,
text_encoder=mini_clip)."""

from __future__ import annotations

import math
import subprocess
import sys
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from difflab.diffusion.contrastive import symmetric_info_nce
from difflab.diffusion.schedules import NoiseSchedule, linear_betas
from difflab.nets.clip import MAX_LOGIT_SCALE, MiniCLIP, NoisyImageEncoder
from difflab.nets.text import ScratchTextEncoder
from difflab.nets.unet import UNet
from difflab.samplers import DDIM, DDPM
from difflab.samplers.generate import Guidance, check_clip_fits, generate
from difflab.samplers.guidance import clip_grad


def tiny_clip(image_size: int = 8, seed: int = 0) -> MiniCLIP:
    torch.manual_seed(seed)
    return MiniCLIP(image_encoder=NoisyImageEncoder(image_size=image_size, in_channels=1, embed_dim=16, ch=8,
                                                    ch_mult=(1, 2)),
                    text_encoder=ScratchTextEncoder(width=16, depth=1, heads=2, token_dim=4, context_length=16)).eval()


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(image_size=8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    for p in net.parameters():  # the zero-initialised output conv would make eps = 0
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return net.eval()


def test_symmetric_info_nce_matches_a_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [1.5, -0.5, 0.25]])

    def ce(row: list[float], target: int) -> float:  # -log softmax(row)[target]
        return -(row[target] - math.log(sum(math.exp(v) for v in row)))

    rows, cols = logits.tolist(), logits.T.tolist()
    want = 0.5 * (sum(ce(rows[i], i) for i in range(3)) / 3 + sum(ce(cols[i], i) for i in range(3)) / 3)
    assert symmetric_info_nce(logits).item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="square"):
        symmetric_info_nce(torch.zeros(2, 3))
    clip = tiny_clip()  # MiniCLIP's logits: exp(logit_scale) times the cosines of unit embeddings
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 999])
    ids, mask = clip.tokenizer(["a seven", "a two", "the digit 7"])
    cos = clip.encode_image(x, t) @ clip.encode_text(ids, mask).T
    torch.testing.assert_close(clip(x, t, ids, mask), cos / 0.07, rtol=1e-5, atol=1e-5)
    assert cos.abs().max() <= 1 + 1e-6


def test_the_learned_temperature_is_clamped_after_every_step():
    from difflab.lit.clip import MiniCLIPModule

    module = MiniCLIPModule(net=tiny_clip(), betas=linear_betas(100), optimizer=lambda params: torch.optim.SGD(params, 1.0),
                            zero_shot_timesteps=[0, 50])
    assert module.net.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    for value, want in ((7.0, MAX_LOGIT_SCALE), (-3.0, 0.0), (2.0, 2.0)):
        module.net.logit_scale.data.fill_(value)
        module.on_train_batch_end(None, None, 0)  # what Lightning calls after the optimizer step
        assert module.net.logit_scale.item() == pytest.approx(want)
    assert MAX_LOGIT_SCALE == pytest.approx(math.log(100))
    with pytest.raises(ValueError, match="zero_shot_timesteps=\\[0, 100\\]"):
        MiniCLIPModule(net=tiny_clip(), betas=linear_betas(100), optimizer=torch.optim.SGD, zero_shot_timesteps=[0, 100])


def test_clip_guidance_gradient_increases_the_similarity():
    clip = tiny_clip()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 50, 300, 900])
    text = clip.encode_prompts(["a handwritten seven"] * 4).detach()
    cond_fn = clip_grad(clip.encode_image, text, scale=1e-2)
    with torch.inference_mode():  # as generate() calls it
        step = cond_fn(x, t)
    before = (clip.encode_image(x, t) * text).sum(-1)
    after = (clip.encode_image(x + step, t) * text).sum(-1)
    assert (after > before).all(), (before, after)
    torch.testing.assert_close(clip_grad(clip.encode_image, text, scale=2e-2)(x, t), 2 * step)


def test_clip_guidance_scale_zero_is_a_no_op_bit_for_bit_and_a_scale_changes_the_images():
    net, clip, schedule = tiny_unet(), tiny_clip(), NoiseSchedule.from_betas(linear_betas(50))
    for sampler in (DDIM(steps=4), DDPM(steps=5)):
        plain = generate(net, schedule, sampler, [0, 1], parameterization="eps")
        off = generate(net, schedule, sampler, [0, 1], parameterization="eps", prompts="a handwritten seven",
                       guidance=Guidance(clip=clip, clip_scale=0.0))
        on = generate(net, schedule, sampler, [0, 1], parameterization="eps", prompts="a handwritten seven",
                      guidance=Guidance(clip=clip, clip_scale=50.0))
        assert torch.equal(plain, off)
        assert not torch.allclose(plain, on)
    from difflab.samplers import Heun

    with pytest.raises(ValueError, match="sampler 'heun-3' cannot take"):
        generate(net, schedule, Heun(steps=3), [0], parameterization="eps", prompts="a seven",
                 guidance=Guidance(clip=clip, clip_scale=1.0))
    with pytest.raises(ValueError, match="guidance=clip needs a prompt"):
        generate(net, schedule, DDIM(steps=2), [0], parameterization="eps", guidance=Guidance(clip=clip, clip_scale=1.0))
    with pytest.raises(ValueError, match="does not read text"):  # a prompt without CLIP guidance: refused as before
        generate(net, schedule, DDIM(steps=2), [0], parameterization="eps", prompts="a seven")
    with pytest.raises(ValueError, match="clip_guidance_scale=-1"):
        Guidance(clip=clip, clip_scale=-1.0)


def test_clip_guidance_combines_with_classifier_free_guidance_on_a_text_model():
    from test_text_to_image import text_net

    net, clip, schedule = text_net(), tiny_clip(), NoiseSchedule.from_betas(linear_betas(50))
    cfg_only = generate(net, schedule, DDIM(steps=3), [0, 1], parameterization="eps", prompts="a seven",
                        guidance=Guidance(scale=3.0))
    both = generate(net, schedule, DDIM(steps=3), [0, 1], parameterization="eps", prompts="a seven",
                    guidance=Guidance(scale=3.0, clip=clip, clip_scale=50.0))
    off = generate(net, schedule, DDIM(steps=3), [0, 1], parameterization="eps", prompts="a seven",
                   guidance=Guidance(scale=3.0, clip=clip, clip_scale=0.0))
    assert torch.equal(cfg_only, off) and not torch.allclose(cfg_only, both)


def test_a_clip_of_another_size_or_channel_count_and_latent_models_are_refused():
    net = tiny_unet()
    with pytest.raises(ValueError, match="1-channel 16x16 images, the model draws 1-channel 8x8"):
        check_clip_fits(tiny_clip(image_size=16), net, latent=False)
    with pytest.raises(ValueError, match="latent diffusion model"):
        check_clip_fits(tiny_clip(), net, latent=True)
    from difflab.lit.base import check_clip_schedule

    clip = tiny_clip()
    clip.stored_config = {"path": "c.ckpt", "schedule": {"_target_": "difflab.diffusion.schedules.linear_betas", "T": 200}}
    with pytest.raises(ValueError, match="'T': 200.*'T': 1000"):
        check_clip_schedule(clip, {"_target_": "difflab.diffusion.schedules.linear_betas", "T": 1000})


def test_clip_score_matches_torchmetrics_and_is_reported_per_prompt():
    from torchmetrics.multimodal import CLIPScore

    from difflab.metrics.clip_score import CLIPScoreBank, MiniCLIPScorer, clip_processor_pair, clip_score

    clip = tiny_clip()
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    prompts = ["a handwritten seven", "the digit 2", "a handwritten seven", "a one", "the digit 2", "a one"]
    cos = MiniCLIPScorer(clip)(images, prompts)
    reference = CLIPScore(model_name_or_path=lambda: clip_processor_pair(clip))
    reference.update(list(images), prompts)
    assert clip_score(cos) == pytest.approx(float(reference.compute()), abs=1e-4)
    assert clip_score(torch.tensor([-0.2, -0.1])) == 0.0  # floored at 0, as max(100 mean cos, 0)
    bank = CLIPScoreBank()
    bank.update(cos, torch.tensor([0, 1, 0, 2, 1, 2]))
    out = bank.compute()
    assert out["clip_score"] == pytest.approx(clip_score(cos))
    assert out["clip_scores"][0] == pytest.approx(clip_score(cos[[0, 2]]))


def test_sample_refuses_bad_clip_requests_naming_the_value():
    from difflab.cli.sample import clip_requested

    def cfg(**kw):
        return OmegaConf.create({"guidance": None, "clip_ckpt_path": None, "prompt": None, "prompts_file": None, **kw})

    assert not clip_requested(cfg())
    assert clip_requested(cfg(guidance="clip", clip_ckpt_path="c.ckpt", prompt="a seven"))
    with pytest.raises(ValueError, match="guidance='clap' is not allowed"):
        clip_requested(cfg(guidance="clap"))
    with pytest.raises(ValueError, match="guidance=clip needs clip_ckpt_path"):
        clip_requested(cfg(guidance="clip", prompt="a seven"))
    with pytest.raises(ValueError, match="guidance=clip needs prompt="):
        clip_requested(cfg(guidance="clip", clip_ckpt_path="c.ckpt"))
    with pytest.raises(ValueError, match="clip_ckpt_path='c.ckpt' is set but guidance=null"):
        clip_requested(cfg(clip_ckpt_path="c.ckpt"))


# ------------------------------------------------------------------------------------- end to end (tiny)

TINY_CLIP = ["experiment=digits_clip", "logger=csv", "schedule.T=100", "trainer.max_steps=4", "data.batch_size=32",
             "trainer.check_val_every_n_epoch=1", "trainer.limit_train_batches=4", "module.lr_warmup_steps=0",
             "clip_model.image_encoder.ch=8", "clip_model.image_encoder.ch_mult=[1,2]", "clip_model.image_encoder.embed_dim=16",
             "clip_model.text_encoder.width=16", "clip_model.text_encoder.depth=1", "clip_model.text_encoder.heads=2",
             "module.zero_shot_timesteps=[0,50]"]
TINY_MODEL = ["logger=csv", "schedule.T=100", "trainer.max_steps=2", "model.ch=8", "model.ch_mult=[1,2]",
              "model.num_res_blocks=1", "model.attn_resolutions=[]", "callbacks.evaluation=null", "callbacks.sample_grid=null",
              "trainer.check_val_every_n_epoch=1000"]


def run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0",
           "OMP_NUM_THREADS": "1", "DIFFLAB_CACHE_DIR": str(cwd / "cache")}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{module} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.mark.slow
def test_digits_clip_end_to_end_guided_sampling_and_text_encoder(tmp_path):
    run("difflab.cli.train", *TINY_CLIP, f"hydra.run.dir={tmp_path / 'clip'}", cwd=tmp_path)
    clip_ckpt = tmp_path / "clip" / "checkpoints" / "last.ckpt"
    metrics = (tmp_path / "clip" / "csv" / "metrics.csv").read_text()
    assert "zero_shot/acc_t50" in metrics and "zero_shot/acc" in metrics
    from difflab.lit.checkpoint_io import load_clip, load_run

    clip = load_clip(clip_ckpt)
    assert clip.stored_config["schedule"]["T"] == 100 and clip.logit_scale.item() <= MAX_LOGIT_SCALE
    with pytest.raises(ValueError, match="of kind 'clip', not 'diffusion'"):
        load_run(clip_ckpt)

    run("difflab.cli.train", *TINY_MODEL, f"hydra.run.dir={tmp_path / 'pixel'}", cwd=tmp_path)
    ckpt = tmp_path / "pixel" / "checkpoints" / "last.ckpt"
    out = tmp_path / "s"
    proc = run("difflab.cli.sample", f"ckpt_path={ckpt}", "guidance=clip", f"clip_ckpt_path={clip_ckpt}",
               "prompt=a handwritten seven", "clip_guidance_scale=20", "num_samples=3", "sampler.steps=4",
               f"out_dir={out}", cwd=tmp_path)
    data = np.load(out / "ddim-4_n3_seed0_p-a-handwritten-seven_w1_clip20.npz")
    assert data["images"].shape == (3, 8, 8, 1) and data["prompts"].tolist() == ["a handwritten seven"] * 3, proc.stdout
    with pytest.raises(AssertionError, match="guidance=clip needs prompt"):
        run("difflab.cli.sample", f"ckpt_path={ckpt}", "guidance=clip", f"clip_ckpt_path={clip_ckpt}", cwd=tmp_path)

    # the text tower as a frozen text encoder of a text-to-image model; the checkpoint carries it
    run("difflab.cli.train", "experiment=digits_t2i", "text_encoder=mini_clip", f"text_encoder.ckpt_path={clip_ckpt}",
        *TINY_MODEL, "model.cross_attention_resolutions=[4]", f"hydra.run.dir={tmp_path / 't2i'}", cwd=tmp_path)
    t2i = load_run(tmp_path / "t2i" / "checkpoints" / "last.ckpt").module
    tower = t2i.net.text_encoder
    assert not tower.trainable and not any(p.requires_grad for p in tower.parameters())
    for name, value in clip.text_encoder.state_dict().items():
        assert torch.equal(tower.tower.state_dict()[name], value), name
    run("difflab.cli.sample", f"ckpt_path={tmp_path / 't2i' / 'checkpoints' / 'last.ckpt'}", "prompt=a handwritten seven",
        "guidance_scale=3", "guidance=clip", f"clip_ckpt_path={clip_ckpt}", "clip_guidance_scale=20", "num_samples=2",
        "sampler.steps=3", f"out_dir={out}", cwd=tmp_path)
    assert (out / "ddim-3_n2_seed0_p-a-handwritten-seven_w3_clip20.npz").is_file()


def _tiny_hf_clip(folder: Path) -> Path:
    """A randomly initialised transformers CLIPModel (16 px images) and its CLIPProcessor, saved with save_pretrained."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 40, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {"image_size": 16, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_path_scores_with_a_local_transformers_clip_as_torchmetrics_does(tmp_path, monkeypatch):
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    from difflab.metrics.clip_score import HFCLIPScorer, clip_score

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = _tiny_hf_clip(tmp_path / "clip")
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    prompts = ["a pair of trousers", "a bag", "an ankle boot", "a bag"]
    cos = HFCLIPScorer(folder)(images, prompts)  # grey images go in as RGB
    assert cos.shape == (4,) and bool(((cos >= -1) & (cos <= 1)).all())

    class Features(torch.nn.Module):  # torchmetrics expects tensors; transformers >= 5 returns outputs (pooler_output)
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kw):
            out = self.model.get_image_features(*args, **kw)
            return getattr(out, "pooler_output", out)

        def get_text_features(self, *args, **kw):
            out = self.model.get_text_features(*args, **kw)
            return getattr(out, "pooler_output", out)

    reference = CLIPScore(model_name_or_path=lambda: (Features(CLIPModel.from_pretrained(folder)),
                                                      CLIPProcessor.from_pretrained(folder)))
    reference.update(list(images.expand(-1, 3, -1, -1)), prompts)
    assert clip_score(cos) == pytest.approx(float(reference.compute()), abs=1e-3)
    with pytest.raises(FileNotFoundError, match=r"clip_path=.*holds no CLIP model \(config.json not found\)"):
        HFCLIPScorer(tmp_path / "empty")
