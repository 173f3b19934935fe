"""Captions, the CLIP BPE tokenizer and the text encoders (scratch and a tiny saved CLIP), nothing downloaded."""

from __future__ import annotations

import json
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from difflab.data import DigitsDataModule, ImageFolderDataModule
from difflab.data.captions import (
    CAPTION_SETS,
    VAL_EPOCH,
    canonical_prompts,
    caption_choice,
    class_prompts,
    pick_caption,
)
from difflab.data.latents import LatentDataset
from difflab.lit.from_config import text_encoder_from_config
from difflab.nets.text import CLIPBPETokenizer, CLIPTextEncoder, ScratchTextEncoder

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# --- captions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", sorted(CAPTION_SETS))
def test_heldout_phrasings_are_disjoint_and_class_words_are_seen(dataset):
    train, heldout = class_prompts(dataset, "train"), class_prompts(dataset, "heldout")
    spec = CAPTION_SETS[dataset]
    assert len(train) == len(heldout) == len(spec.class_names) == 10
    every_train = {p for prompts in train for p in prompts}
    every_heldout = {p for prompts in heldout for p in prompts}
    assert every_train.isdisjoint(every_heldout)
    assert sum(map(len, train)) == len(every_train)  # no phrasing shared by two classes
    for k, words in enumerate(spec.synonyms):
        assert train[k][0] == canonical_prompts(dataset)[k]
        assert len(heldout[k]) >= 4 and len(train[k]) >= 6
        for word in words:  # every class word occurs in training, in at least 3 templates
            assert sum(word in p for p in train[k]) >= 3, (dataset, word)
        for template in spec.heldout_templates:  # held-out templates never occur in training
            assert not any(p == template.format(w) for p in every_train for w in words)


def test_canonical_prompts_and_examples():
    assert canonical_prompts("digits")[7] == "a handwritten seven"
    assert canonical_prompts("fashion_mnist")[1] == "a pair of trousers"
    assert {"a photo of a sneaker", "a running shoe", "a trainer, black and white"} <= set(
        class_prompts("fashion_mnist", "train")[7])
    assert {"the digit 7", "the number seven, handwritten"} <= set(class_prompts("digits", "train")[7])
    with pytest.raises(ValueError, match="cifar10.*allowed"):
        class_prompts("cifar10", "train")
    with pytest.raises(ValueError, match="split='test'"):
        class_prompts("digits", "test")


def test_caption_choice_is_a_function_of_seed_epoch_index():
    draws = [caption_choice(0, e, i, 12) for e in range(3) for i in range(200)]
    assert draws == [caption_choice(0, e, i, 12) for e in range(3) for i in range(200)]
    assert set(draws) == set(range(12))  # every phrasing gets used
    assert draws[:200] != draws[200:400]  # another epoch, other captions
    assert [caption_choice(1, 0, i, 12) for i in range(200)] != draws[:200]  # another seed too


def _digits(**overrides) -> DigitsDataModule:
    args = dict(image_size=8, channels=1, batch_size=16, num_workers=0, val_fraction=0.1, seed=3, hflip=False,
                captions=True)
    return DigitsDataModule(**{**args, **overrides})


def _ranks(world_size: int, **overrides) -> list[DigitsDataModule]:
    modules = []
    for rank in range(world_size):
        dm = _digits(**overrides)
        dm.trainer = types.SimpleNamespace(world_size=world_size, global_rank=rank, current_epoch=0)
        dm.setup("fit")
        dm.trainer = None  # the loader then reads the epoch from the sampler (set_epoch)
        modules.append(dm)
    return modules


def _epoch(dm, epoch: int, resume: dict | None = None) -> list[tuple]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    if resume is not None:
        loader.load_state_dict(resume)
    return list(loader)


@pytest.mark.parametrize("hflip", [False, True])
def test_captioned_batches_resume_and_shard_exactly(hflip):
    (single,) = _ranks(1, hflip=hflip)
    full = _epoch(single, 2)
    x, y, captions = full[0]
    assert x.shape == (16, 1, 8, 8) and y.dtype == torch.int64 and isinstance(captions, list)
    train = class_prompts("digits", "train")
    assert all(c in train[int(k)] for batch in full for k, c in zip(batch[1], batch[2]))
    assert [b[2] for b in full] == [b[2] for b in _epoch(single, 2)]  # the same epoch: the same captions
    assert [b[2] for b in full] != [b[2] for b in _epoch(single, 3)]
    torch.manual_seed(5)  # the global RNG plays no part
    ranks = _ranks(2, hflip=hflip)
    for k in (0, 3):  # resumed after k global batches, on two processes
        parts = [_epoch(dm, 2, {"epoch": 2, "images": 16 * k}) for dm in ranks]
        for j, (a, b) in enumerate(zip(*parts)):
            images = torch.stack([a[0], b[0]], 1).flatten(0, 1)
            glued = [c for pair in zip(a[2], b[2]) for c in pair]
            assert torch.equal(images, full[k + j][0]) and glued == full[k + j][2]


def test_validation_captions_are_fixed_and_plain_batches_unchanged():
    dm = _digits()
    first = [b[2] for b in dm.val_dataloader()]
    assert first == [b[2] for b in dm.val_dataloader()]
    phrasings = dm.split_phrasings("val")
    assert first[0][0] == pick_caption(phrasings[0], seed=3, epoch=VAL_EPOCH, index=0)
    plain = _digits(captions=False)
    assert len(next(iter(plain.train_dataloader()))) == 2 and len(next(iter(plain.val_dataloader()))) == 2
    with pytest.raises(ValueError, match="captions=false"):
        plain.split_phrasings()


@pytest.mark.parametrize("hflip", [False, True])
def test_captions_follow_cached_latents(hflip):
    dm = _digits(hflip=hflip)
    n = dm.num_images("train")
    labels = dm.train_dataset.dataset.labels[dm.train_dataset.indices]
    moments = torch.randn(n, 4, 2, 2)
    dm.use_train_latents(LatentDataset(moments, labels, moments.flip(-1) if hflip else None))
    image_batches = _epoch(_digits(hflip=hflip), 1)
    for (z, y, captions), (_, y_img, captions_img) in zip(_epoch(dm, 1), image_batches):
        assert z.shape == (16, 4, 2, 2) and torch.equal(y, y_img) and captions == captions_img


# --- image folders ------------------------------------------------------------------------------


def _folder(tmp_path: Path, names: list[str]) -> Path:
    root = tmp_path / "images"
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 20 * len(name), np.uint8), "RGB").save(root / name)
    return root


def _folder_module(root: Path, **overrides) -> ImageFolderDataModule:
    args = dict(root=root, image_size=8, channels=3, batch_size=2, num_workers=0, val_fraction=0.25, seed=0,
                hflip=False, in_memory=False, captions=True)
    return ImageFolderDataModule(**{**args, **overrides})


@pytest.mark.parametrize("in_memory", [False, True])
def test_image_folder_reads_txt_and_jsonl_captions(tmp_path, in_memory):
    root = _folder(tmp_path, ["a.png", "b.png", "c.png", "sub/d.png"])
    (root / "a.txt").write_text("a red square\n\na dark square\n")
    (root / "b.png.txt").write_text("a blue square")
    rows = [{"file": "c.png", "text": "a green square"}, {"file": "sub/d.png", "text": " a grey square "},
            {"file": "a.png", "text": "a plain square"}]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = _folder_module(root, in_memory=in_memory)
    dm.setup("fit")
    every = dict(zip(dm.index.paths, dm._caption_phrasings(None)))
    assert every[root / "a.png"] == ("a plain square", "a red square", "a dark square")
    assert every[root / "b.png"] == ("a blue square",) and every[root / "sub/d.png"] == ("a grey square",)
    x, y, captions = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 8, 8) and all(isinstance(c, str) and c for c in captions)


@pytest.mark.parametrize("case, match", [
    ("missing_file", r"line 2 names file='nope.png', which is not an image of root=.*allowed"),
    ("outside_root", r"file='../a.png', which is not an image"),
    ("empty_text", r"line 1: text='  ' for file='a.png' is empty"),
    ("not_json", r"line 1 is not JSON"),
    ("wrong_keys", r"line 1 is .*each line must be"),
    ("no_caption", r"1 of 2 images .* have no caption, e.g. .*b\.png"),
    ("empty_txt", r"caption file .*a\.txt is empty"),
])
def test_image_folder_refuses_bad_captions_in_setup(tmp_path, case, match):
    root = _folder(tmp_path, ["a.png", "b.png"])
    (root / "b.txt").write_text("fine")
    lines = {"missing_file": ['{"file": "a.png", "text": "ok"}', '{"file": "nope.png", "text": "x"}'],
             "outside_root": ['{"file": "../a.png", "text": "x"}'],
             "empty_text": ['{"file": "a.png", "text": "  "}'],
             "not_json": ["{file: a.png}"],
             "wrong_keys": ['{"image": "a.png", "caption": "x"}']}.get(case)
    if lines is not None:
        (root / "captions.jsonl").write_text("\n".join(lines))
    if case == "empty_txt":
        (root / "a.txt").write_text("\n \n")
    if case == "no_caption":
        (root / "b.txt").unlink()
        (root / "a.txt").write_text("only a")
    dm = _folder_module(root)
    with pytest.raises(ValueError, match=match):
        dm.setup("fit")


# --- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_round_trip_mask_and_padding():
    tok = CLIPBPETokenizer(context_length=16)
    prompts = ["a photo of a sneaker", "the digit 7", ""]
    ids, mask = tok(prompts)
    assert ids.shape == mask.shape == (3, 16) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert tok.decode(ids, mask) == prompts
    lengths = mask.sum(1).tolist()
    assert lengths == [tok.token_count(p) for p in prompts] and lengths[2] == 2  # "" = start + end of text
    assert (ids[:, 0] == tok.sot_id).all()
    assert [ids[b, n - 1].item() for b, n in enumerate(lengths)] == [tok.eot_id] * 3
    assert (ids[~mask] == tok.pad_id).all() and mask[0, : lengths[0]].all()
    with pytest.raises(TypeError, match="wrap it"):
        tok("a bag")


def test_tokenizer_truncates_with_one_warning():
    tok = CLIPBPETokenizer(context_length=6)
    long = "a photo of a pair of trousers, black and white"
    n = tok.token_count(long)
    with pytest.warns(UserWarning, match=rf"has {n} tokens .*context_length=6"):
        ids, mask = tok([long, "a bag"])
    assert mask[0].all() and ids[0, -1] == tok.eot_id and tok.decode(ids[:1], mask[:1]) == ["a photo of a"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok([long])  # once per tokenizer


# --- scratch encoder ----------------------------------------------------------------------------


def test_scratch_encoder_shapes_padding_and_size():
    torch.manual_seed(0)
    enc = ScratchTextEncoder(width=32, depth=2, heads=4, token_dim=8, context_length=12)
    tokens, mask, pooled = enc.encode(["a running shoe", "a handwritten seven, written by hand"])
    assert tokens.shape == (2, 12, 32) and pooled.shape == (2, 32) and enc.trainable and enc.width == 32
    assert torch.equal(pooled, tokens[torch.arange(2), mask.sum(1) - 1])  # pooled = the end-of-text output
    ids, mask = enc.tokenizer(["a running shoe"])
    scrambled = torch.where(mask, ids, torch.randint(0, 49408, ids.shape))  # other ids at the padded slots
    (a, pa), (b, pb) = enc(ids, mask), enc(scrambled, mask)
    assert torch.allclose(a[mask], b[mask], atol=1e-6) and torch.allclose(pa, pb, atol=1e-6)
    (a[mask].sum() + pa.sum()).backward()
    assert enc.token_embedding.weight.grad[ids[mask]].abs().sum() > 0
    with pytest.raises(ValueError, match="not divisible by heads"):
        ScratchTextEncoder(width=30, heads=4)
    with pytest.raises(ValueError, match=r"must both be \(B, 12\)"):
        enc(ids[:, :5], mask[:, :5])


def test_the_configured_encoders_build():
    enc = text_encoder_from_config(OmegaConf.create({"text_encoder": OmegaConf.load(CONF / "text_encoder/scratch.yaml")}))
    assert isinstance(enc, ScratchTextEncoder) and enc.context_length == 16
    assert sum(p.numel() for p in enc.parameters()) == 1_191_552  # docs/text_to_image.md; the table: 790,528
    assert text_encoder_from_config({"text_encoder": None}) is None
    with pytest.raises(ValueError, match="needs text_encoder.path"):
        text_encoder_from_config(OmegaConf.create({"text_encoder": OmegaConf.load(CONF / "text_encoder/clip.yaml")}))
    with pytest.raises(ValueError, match=r"_target_='os.system' is not allowed"):
        text_encoder_from_config({"text_encoder": {"_target_": "os.system"}})


# --- a tiny saved CLIP --------------------------------------------------------------------------


def _tiny_clip(folder: Path, *, diffusers_layout: bool = False) -> Path:
    """A randomly initialised CLIPTextModel and a byte-level CLIPTokenizer (no merges), saved with save_pretrained."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from open_clip.tokenizer import bytes_to_unicode  # the byte-level alphabet CLIP (and CLIPTokenizer) use

    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=40, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model_dir, token_dir = (folder / "text_encoder", folder / "tokenizer") if diffusers_layout else (folder, folder)
    CLIPTextModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(token_dir)
    return folder


def test_tiny_saved_clip_loads_encodes_and_caches(tmp_path, monkeypatch):
    enc = CLIPTextEncoder(path=str(_tiny_clip(tmp_path / "clip")), cache_size=2)
    assert enc.width == 32 and enc.context_length == 40 and not enc.trainable
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.train().training
    prompts = ["a bag", "a pair of trousers"]
    tokens, mask, pooled = enc.encode(prompts)
    assert tokens.shape == (2, 40, 32) and pooled.shape == (2, 32) and mask.sum(1).tolist() == [6, 17]  # a byte-level vocabulary: a token per letter
    assert enc.tokenizer.decode(*enc.tokenizer(prompts)) == prompts
    out = enc.model(input_ids=enc.tokenizer(prompts)[0], attention_mask=mask.long())
    assert torch.allclose(pooled, out.last_hidden_state[torch.arange(2), mask.sum(1) - 1])  # the end-of-text state
    calls = []
    monkeypatch.setattr(enc.model, "forward", lambda *a, **k: calls.append(1) or out)
    again = enc.encode(["a pair of trousers", "a bag"])  # both cached: no forward
    assert not calls and torch.equal(again[0], tokens.flip(0)) and torch.equal(again[2], pooled.flip(0))
    clip_yaml = {**OmegaConf.to_container(OmegaConf.load(CONF / "text_encoder/clip.yaml")), "context_length": 8,
                 "path": str(_tiny_clip(tmp_path / "pipe", diffusers_layout=True))}
    pipeline = text_encoder_from_config({"text_encoder": clip_yaml})  # a diffusers pipeline folder, through the config
    assert isinstance(pipeline, CLIPTextEncoder) and pipeline.cache_size == 4096
    with pytest.warns(UserWarning, match=r"has 17 tokens .*context_length=8"):
        assert pipeline.encode(["a pair of trousers"])[0].shape == (1, 8, 32)


def test_a_folder_without_a_clip_text_model_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"text_encoder.path='.*nowhere' does not exist.*config.json"):
        CLIPTextEncoder(path=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no CLIP text model \(config.json not found\).*vocab.json"):
        CLIPTextEncoder(path=str(tmp_path / "empty"))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (bert / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"model_type='bert', not a CLIP text model; allowed"):
        CLIPTextEncoder(path=str(bert))
    weightless = _tiny_clip(tmp_path / "weightless")
    (weightless / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no CLIP text model weights could be read"):
        CLIPTextEncoder(path=str(weightless))
