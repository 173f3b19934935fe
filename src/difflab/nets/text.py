"""Text encoders for text-to-image diffusion: prompts -> token embeddings (B, L, width) + mask + pooled (B, width).

Notation: B prompts, L = context_length token slots, width = the U-Net's context_dim. A tokenizer turns
prompts into ids (B, L) and a mask (B, L) (True = a real token, start and end of text included; the
rest is padding); an encoder maps (ids, mask) to the embeddings of every slot and a pooled vector,
the output at the end-of-text token (as CLIP, Radford et al. 2021). Two encoders share that interface:

- ScratchTextEncoder: a small bidirectional transformer over CLIP's BPE tokens, trained jointly with the
  diffusion model (LDM's TransformerEmbedder, Rombach et al. 2022, Sec. 3.3); needs only the captions.
- CLIPTextEncoder: a frozen pretrained CLIP text transformer read from a local folder (transformers).

Both keep `trainable` (whether the optimiser should see their parameters) and `width`.
"""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

CLIP_CONTEXT_LENGTH = 77  # OpenAI CLIP's text context
CLIP_MODEL_TYPES = ("clip_text_model", "clip")  # config.json model_type of a CLIPTextConfig / CLIPConfig
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))  # either set makes a CLIPTokenizer


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """A list of prompt strings; refuses a bare string (its characters would become prompts) and non-strings."""
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a sequence of strings, got the string {prompts!r}; wrap it: [{prompts!r}]")
    prompts = list(prompts)
    bad = next((p for p in prompts if not isinstance(p, str)), None)
    if bad is not None:
        raise TypeError(f"prompts must be strings; got {bad!r} ({type(bad).__name__})")
    return prompts


def pad_and_truncate(token_lists: Sequence[Sequence[int]], prompts: Sequence[str], *, context_length: int, eot_id: int,
                     pad_id: int, warn: Callable[[str], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists ([start, ..., end] each) -> ids (B, L) long, mask (B, L) bool; a list longer than L keeps its
    first L - 1 tokens and the end-of-text token last, and `warn` is told the prompt, its length and L."""
    ids = torch.full((len(token_lists), context_length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(token_lists), context_length, dtype=torch.bool)
    for b, (tokens, prompt) in enumerate(zip(token_lists, prompts)):
        tokens = list(tokens)
        if len(tokens) > context_length:
            warn(f"prompt {prompt!r} has {len(tokens)} tokens (start and end of text included), more than "
                 f"context_length={context_length}: truncated to {context_length} (end-of-text kept last)")
            tokens = tokens[: context_length - 1] + [eot_id]
        ids[b, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[b, : len(tokens)] = True
    return ids, mask


class _WarnOnce:
    """A warning callback that speaks once per tokenizer (a long prompt in every batch warns once)."""

    def __init__(self) -> None:
        self.warned = False

    def __call__(self, message: str) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(message + " (warned once)", UserWarning, stacklevel=4)


@lru_cache(maxsize=1)
def _open_clip_bpe() -> Any:
    """open_clip's SimpleTokenizer over the BPE vocabulary its wheel ships (built once per process)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


class CLIPBPETokenizer:
    """CLIP's byte-pair tokenizer (49,408 tokens; open_clip's SimpleTokenizer, lower-cased, whitespace cleaned):
    prompts -> (ids (B, L), mask (B, L)); padding id 0 (masked), start 49406, end 49407."""

    def __init__(self, *, context_length: int = CLIP_CONTEXT_LENGTH) -> None:
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length={context_length!r} is not allowed; it must be an integer >= 2 "
                             "(start and end of text)")
        self.context_length = context_length
        self._bpe = _open_clip_bpe()
        self.vocab_size: int = self._bpe.vocab_size
        self.sot_id: int = self._bpe.sot_token_id
        self.eot_id: int = self._bpe.eot_token_id
        self.pad_id = 0
        self._warn = _WarnOnce()

    def token_count(self, prompt: str) -> int:
        """How many tokens `prompt` takes, start and end of text included."""
        return len(self._bpe.encode(prompt)) + 2

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = check_prompts(prompts)
        lists = [[self.sot_id, *self._bpe.encode(p), self.eot_id] for p in prompts]
        return pad_and_truncate(lists, prompts, context_length=self.context_length, eot_id=self.eot_id,
                                pad_id=self.pad_id, warn=self._warn)

    def decode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[str]:
        """ids (B, L) (and their mask) -> the cleaned prompts, start/end/padding dropped."""
        mask = ids != self.pad_id if mask is None else mask
        special = {self.sot_id, self.eot_id}
        return [self._bpe.decode([int(t) for t, m in zip(row, keep) if m and int(t) not in special]).strip()
                for row, keep in zip(ids.tolist(), mask.tolist())]

    def __reduce__(self) -> tuple:  # pickles and deep-copies as its options (the BPE tables are shared)
        return (_rebuild_bpe_tokenizer, (self.context_length,))


def _rebuild_bpe_tokenizer(context_length: int) -> CLIPBPETokenizer:
    return CLIPBPETokenizer(context_length=context_length)


class TextEncoder(nn.Module):
    """The interface: `tokenizer`, `width`, `trainable`, forward(ids, mask) -> (tokens (B, L, width), pooled
    (B, width)) and encode(prompts) -> (tokens, mask, pooled) on the encoder's device."""

    tokenizer: Any
    width: int
    trainable: bool

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(prompts)
        device = next(self.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        tokens, pooled = self(ids, mask)
        return tokens, mask, pooled


def end_of_text(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, L, D) at each row's last real token (the end of text, also after truncation) -> (B, D)."""
    last = mask.long().sum(dim=1).clamp(min=1) - 1  # (B,)
    return x[torch.arange(x.shape[0], device=x.device), last]


class _SelfAttention(nn.Module):
    """Bidirectional multi-head attention whose keys skip padding (Vaswani et al. 2017, Eq. 1)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, d_h)
        # every row keeps at least its start token, so no query attends to nothing
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, h, L, d_h)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = _SelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_ratio * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), mask))
        return x + self.drop(self.mlp(self.norm2(x)))


class ScratchTextEncoder(TextEncoder):
    """A small transformer trained with the diffusion model (LDM's TransformerEmbedder, Rombach et al. 2022):
    CLIP BPE ids -> a table of token_dim -> Linear to width + learned positions -> depth pre-norm blocks
    (bidirectional, padding masked) -> LayerNorm; pooled = the end-of-text token's output.

    The table covers the whole 49,408-token vocabulary at a small token_dim (16: 0.79M parameters) and a
    Linear lifts it to width, rather than a table over the tokens the captions use: any prompt maps to rows
    without a vocabulary pass over the data, and the checkpoint is self-contained. Only the rows of tokens
    that occur in the captions are ever trained; a never-seen word reads its untrained random rows.
    """

    trainable = True

    def __init__(self, *, width: int = 128, depth: int = 2, heads: int = 4, token_dim: int = 16,
                 context_length: int = CLIP_CONTEXT_LENGTH, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        for name, value in (("width", width), ("depth", depth), ("heads", heads), ("token_dim", token_dim),
                            ("mlp_ratio", mlp_ratio)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not allowed; it must be a positive integer")
        if width % heads:
            raise ValueError(f"width={width} is not divisible by heads={heads}; choose heads among the divisors of width")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} is not allowed; it must lie in [0, 1)")
        self.tokenizer = CLIPBPETokenizer(context_length=context_length)
        self.width, self.context_length = width, context_length
        self.token_embedding = nn.Embedding(self.tokenizer.vocab_size, token_dim)
        self.token_proj = nn.Linear(token_dim, width)
        self.position = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.ndim != 2 or tokens.shape != mask.shape or tokens.shape[1] != self.context_length:
            raise ValueError(f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} must both be (B, "
                             f"{self.context_length}) (context_length); use self.tokenizer")
        mask = mask.bool()
        x = self.token_proj(self.token_embedding(tokens)) + self.position  # (B, L, width)
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        return x, end_of_text(x, mask)


class HFCLIPTokenizer:
    """transformers' CLIPTokenizer behind the same call: prompts -> (ids (B, L), mask (B, L)), padded with its
    pad token (masked) and truncated with the end-of-text token kept last, warning once."""

    def __init__(self, tokenizer: Any, *, context_length: int) -> None:
        self.hf, self.context_length = tokenizer, context_length
        self.eot_id: int = tokenizer.eos_token_id
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._warn = _WarnOnce()

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = check_prompts(prompts)
        lists = self.hf(prompts, add_special_tokens=True)["input_ids"] if prompts else []
        return pad_and_truncate(lists, prompts, context_length=self.context_length, eot_id=self.eot_id,
                                pad_id=self.pad_id, warn=self._warn)

    def decode(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """ids (B, L) and their mask -> the prompts, special tokens dropped."""
        return [self.hf.decode(row[keep].tolist(), skip_special_tokens=True).strip() for row, keep in zip(ids, mask)]


def clip_folders(path: str | Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of a local CLIP text model: `path` itself, or its text_encoder/ and
    tokenizer/ subfolders (a diffusers pipeline); raises naming the path and the files expected."""
    root = Path(path).expanduser()
    expected = (f"config.json (a CLIPTextConfig or CLIPConfig, model_type one of {CLIP_MODEL_TYPES}) with its weights "
                "(model.safetensors or pytorch_model.bin), and tokenizer files (vocab.json + merges.txt, or "
                "tokenizer.json), in the folder itself or in its text_encoder/ and tokenizer/ subfolders")
    if not root.is_dir():
        raise FileNotFoundError(f"text_encoder.path={str(path)!r} {'is not a folder' if root.exists() else 'does not exist'}; "
                                f"it must be a folder holding {expected}")
    model_dir = root if (root / "config.json").is_file() else root / "text_encoder"
    token_dir = next((d for d in (root, root / "tokenizer")
                      if any(all((d / f).is_file() for f in files) for files in TOKENIZER_FILES)), None)
    config = model_dir / "config.json"
    if not config.is_file() or token_dir is None:
        missing = "config.json" if not config.is_file() else "tokenizer files"
        raise FileNotFoundError(f"text_encoder.path={str(path)!r} holds no CLIP text model ({missing} not found); "
                                f"expected {expected}")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{config} is not a JSON object ({err}); expected a CLIPTextConfig's config.json") from err
    if model_type not in CLIP_MODEL_TYPES:
        raise ValueError(f"text_encoder.path={str(path)!r}: {config} has model_type={model_type!r}, not a CLIP text "
                         f"model; allowed: {CLIP_MODEL_TYPES}")
    return model_dir, token_dir


def load_clip_text_model(cls: Any, model_dir: Path, path: str | Path) -> nn.Module:
    """CLIPTextModel.from_pretrained(model_dir) frozen in eval mode; refuses missing weights or weights that
    leave text-model parameters uninitialised (transformers would fill them at random)."""
    try:
        model, info = cls.from_pretrained(str(model_dir), local_files_only=True, output_loading_info=True)
    except OSError as err:
        raise FileNotFoundError(f"text_encoder.path={str(path)!r}: no CLIP text model weights could be read from "
                                f"{model_dir} ({err}); expected model.safetensors or pytorch_model.bin beside "
                                "config.json") from err
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ValueError(f"text_encoder.path={str(path)!r}: the weights in {model_dir} lack {len(missing)} parameters "
                         f"of the CLIP text model (e.g. {missing[0]!r}); they hold no CLIP text model")
    return model.eval().requires_grad_(False)


class CLIPTextEncoder(TextEncoder):
    """A frozen pretrained CLIP text transformer (Radford et al. 2021) from a local folder through transformers:
    tokens = last_hidden_state (B, L, hidden_size), pooled = pooler_output (the end-of-text token's state).

    Always in eval mode without gradients. With cache_size > 0, `encode` keeps the outputs of up to that many
    distinct prompts (least recently used dropped): a frozen encoder gives a caption the same embedding forever.
    """

    trainable = False

    def __init__(self, *, path: str, context_length: int | None = None, cache_size: int = 0) -> None:
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size={cache_size!r} is not allowed; it must be an integer >= 0 (0: no cache)")
        model_dir, token_dir = clip_folders(path)
        self.path = str(path)
        self.model = load_clip_text_model(CLIPTextModel, model_dir, path)
        limit = int(self.model.config.max_position_embeddings)
        context_length = limit if context_length is None else context_length
        if isinstance(context_length, bool) or not isinstance(context_length, int) or not 2 <= context_length <= limit:
            raise ValueError(f"context_length={context_length!r} is not allowed for the CLIP model at {path}; it must "
                             f"lie in 2..{limit} (its max_position_embeddings)")
        self.tokenizer = HFCLIPTokenizer(CLIPTokenizer.from_pretrained(str(token_dir), local_files_only=True),
                                         context_length=context_length)
        self.width, self.context_length, self.cache_size = int(self.model.config.hidden_size), context_length, cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()

    def train(self, mode: bool = True) -> CLIPTextEncoder:
        return super().train(False)  # frozen: dropout never on, whatever the surrounding module does

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=tokens, attention_mask=mask.long())
        return out.last_hidden_state, out.pooler_output

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> CLIPTextEncoder:
        self._cache.clear()  # moved or cast: cached outputs would live on the old device / dtype
        return super()._apply(fn, *args, **kwargs)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prompts = check_prompts(prompts)
        if not self.cache_size or not prompts:
            return super().encode(prompts)
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if todo:
            tokens, mask, pooled = super().encode(todo)
            for i, p in enumerate(todo):
                self._cache[p] = (tokens[i], mask[i], pooled[i])
        rows = [self._cache[p] for p in prompts]
        for p in prompts:
            self._cache.move_to_end(p)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return tuple(torch.stack(parts) for parts in zip(*rows))  # type: ignore[return-value]


class FrozenTextEncoder(TextEncoder):
    """A trained text tower used frozen by a text-to-image model: mini_clip's ScratchTextEncoder (nets/clip.py),
    read from its checkpoint (text_encoder=mini_clip text_encoder.ckpt_path=...), as LDM / Imagen use a frozen
    CLIP or T5 (Rombach et al. 2022, Sec. 3.3). tokens and pooled are the tower's own (before CLIP's projection).

    Always in eval mode without gradients; `tower` holds the weights (they travel in the diffusion checkpoint), and
    `ckpt_path` only records where they came from.
    """

    trainable = False

    def __init__(self, *, tower: TextEncoder, ckpt_path: str | None = None) -> None:
        super().__init__()
        if not isinstance(tower, TextEncoder):
            raise TypeError(f"tower must be a difflab text encoder (nets/text.py), got {type(tower).__name__}")
        self.tower = tower.requires_grad_(False).eval()
        self.tokenizer, self.width, self.ckpt_path = tower.tokenizer, tower.width, ckpt_path

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        return super().train(False)  # frozen: dropout never on, whatever the surrounding module does

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tower(tokens, mask)
