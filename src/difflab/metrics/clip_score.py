"""CLIP score (Hessel et al. 2021) of generated images against the prompts they were asked for, as torchmetrics'
CLIPScore computes it: 100 * cos(E_I, E_C) per image, averaged, floored at 0 (max(mean, 0)); overall and per prompt.

The embeddings come from a scorer: `MiniCLIPScorer` (difflab's mini_clip, nets/clip.py, read at t = 0) or
`HFCLIPScorer` (a real CLIP from a local transformers folder). `clip_processor_pair` exposes mini_clip as the
(model, processor) pair torchmetrics' CLIPScore accepts, which the tests use to check the formula against it.
DDP: `CLIPScoreBank.compute()` is a collective (the scores and prompt ids of every rank are gathered).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from difflab.data.transforms import to_model_range


class CLIPScorer(Protocol):
    """cos(E_I, E_C) of uint8 images (B, C, H, W) and their prompts (B): (B,) float."""

    name: str

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...


def clip_score(cosines: Tensor) -> float:
    """max(100 * mean(cos), 0): torchmetrics' CLIPScore (Hessel et al. 2021, Eq. 1 with w = 100) over a set of pairs."""
    if cosines.numel() == 0:
        return float("nan")
    return max(100.0 * float(cosines.double().mean()), 0.0)


class MiniCLIPScorer(nn.Module):
    """Cosines from difflab's mini_clip: its image tower at t = 0 (clean images) and its text tower."""

    def __init__(self, clip: nn.Module, *, name: str = "mini_clip") -> None:
        super().__init__()
        self.clip, self.name = clip, name

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        x = to_model_range(images).to(self.clip.logit_scale.device)  # (B, C, H, W) in [-1, 1]
        f = self.clip.encode_image(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        return (f * self.clip.encode_prompts(list(prompts))).sum(dim=-1)  # (B,)


class HFCLIPScorer(nn.Module):
    """Cosines from a pretrained CLIP in a local folder (transformers' CLIPModel + CLIPProcessor, nothing downloaded);
    grey images are repeated to RGB, and the processor resizes them to the model's input size."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"clip_path={str(path)!r} holds no CLIP model (config.json not found); give a local "
                                    "folder saved with CLIPModel.save_pretrained and CLIPProcessor.save_pretrained")
        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
        self.processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        self.name = f"clip:{folder.name}"

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        device = next(self.model.parameters()).device
        pixels = self.processor(images=[im.cpu() for im in rgb], return_tensors="pt")["pixel_values"].to(device)
        text = self.processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
        f = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        g = F.normalize(_features(self.model.get_text_features(input_ids=text["input_ids"].to(device),
                                                               attention_mask=text["attention_mask"].to(device))).float(), dim=-1)
        return (f * g).sum(dim=-1)


def _features(out: Any) -> Tensor:
    """transformers >= 5 may return a model output whose pooler_output holds the projected features."""
    return out if isinstance(out, Tensor) else out.pooler_output


class _MiniCLIPProcessor:
    """What torchmetrics' CLIPScore asks of a processor, for mini_clip: images -> pixel_values in [-1, 1], text -> ids."""

    def __init__(self, clip: nn.Module) -> None:
        self.clip = clip

    def __call__(self, *, images: list[Tensor] | None = None, text: list[str] | None = None, **_: Any) -> dict[str, Tensor]:
        if images is not None:
            return {"pixel_values": to_model_range(torch.stack(images))}
        ids, mask = self.clip.tokenizer(list(text or []))
        return {"input_ids": ids, "attention_mask": mask}


class _MiniCLIPModel(nn.Module):
    """What torchmetrics' CLIPScore asks of a model, for mini_clip: get_image_features (t = 0) and get_text_features."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.config = SimpleNamespace()  # torchmetrics reads config.text_config when present (a real CLIP's)

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        t = torch.zeros(pixel_values.shape[0], dtype=torch.long, device=pixel_values.device)
        return self.clip.encode_image(pixel_values, t)

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.clip.encode_text(input_ids, attention_mask.bool())


def clip_processor_pair(clip: nn.Module) -> tuple[nn.Module, _MiniCLIPProcessor]:
    """(model, processor) of mini_clip for torchmetrics.multimodal.CLIPScore(model_name_or_path=lambda: ...)."""
    return _MiniCLIPModel(clip), _MiniCLIPProcessor(clip)


class CLIPScoreBank(Metric):
    """Per generated image its cosine with its prompt and the prompt's id; compute() -> overall and per-id CLIP score."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("cosines", default=[], dist_reduce_fx="cat")
        self.add_state("prompt_ids", default=[], dist_reduce_fx="cat")

    def update(self, cosines: Tensor, prompt_ids: Tensor) -> None:
        self.cosines.append(cosines.float())
        self.prompt_ids.append(prompt_ids.to(cosines.device, torch.long))

    def compute(self) -> dict[str, float | list[float]]:
        if not self.cosines:  # this rank saw no images: still take part in the gather
            self.update(torch.zeros(0, device=self.device), torch.zeros(0, dtype=torch.long, device=self.device))
        cos, ids = dim_zero_cat(self.cosines), dim_zero_cat(self.prompt_ids)
        per_id = [clip_score(cos[ids == k]) for k in range(int(ids.max()) + 1)] if ids.numel() else []
        return {"clip_score": clip_score(cos), "clip_scores": per_id}
