"""The README and docs/ stay true: their links resolve, and every command line they show composes.

Every `difflab-train`, `difflab-sample`, `difflab-eval` (and `difflab-train-classifier`) line in a
fenced code block of README.md or docs/*.md, `make train ARGS="..."` and `python -m` / `torchrun -m
difflab.cli.<x>` included, is composed with Hydra's compose API against the repository's config
tree. Then:
- difflab-train: the LightningModule is built (build_module, model.num_classes=auto resolved as the
  CLI does) and the data module instantiated (no setup, no download);
- difflab-sample: the sampler is instantiated and its precision name checked;
- difflab-eval: every sampler entry is built, the extractor and precision names checked.
Placeholders (`ckpt_path=...`, `outputs/<date>/...`, `data.root=/path/to/images`) get stand-ins: a
folder of a few small PNGs, an empty checkpoint file. For a multirun (`-m`) sweep the first value of
each comma list is composed. Config files the docs show (a ```yaml block whose first line is a
comment among its first lines naming its path, e.g. `# my_configs/model/wide.yaml`) are written to a temporary folder, and
`--config-dir` / `hydra.searchpath` lines naming that folder compose against it.
"""

from __future__ import annotations

import importlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from difflab.cli.config import config_dir

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONF = config_dir()

FENCE = re.compile(r"^```[ \t]*(\S*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CONFIG_FILE = re.compile(r"^#\s*([\w.-]+(?:/[\w.-]+)+\.yaml)\b")  # "# my_configs/model/wide.yaml: ..."
COMMANDS = {"difflab-train": "train", "difflab-sample": "sample", "difflab-eval": "eval",
            "difflab-train-classifier": "train_classifier", "difflab-edit": "edit", "difflab-export": "export"}
MODULES = {"difflab.cli.train": "train", "difflab.cli.sample": "sample", "difflab.cli.evaluate": "eval",
           "difflab.cli.train_classifier": "train_classifier", "difflab.cli.edit": "edit", "difflab.cli.export": "export"}
INFO_KINDS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}  # hydra --info <kind>
WITH_PATHS = {"train", "eval", "train_classifier"}  # configs that have the paths group
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|^/path/")


def page_text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m.group(1).lower(), m.group(2)) for m in FENCE.finditer(text)]


def shell_lines(body: str) -> list[str]:
    """Logical lines of a shell block: `\\` continuations joined."""
    return body.replace("\\\n", " ").splitlines()


# ---------------------------------------------------------------------------------------- links


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page_text(page))  # links inside code blocks are not links
    targets = []
    for target in LINK.findall(text):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        targets.append(target.split("#", 1)[0])
    return [t for t in targets if t]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    missing = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_readme_links_every_docs_page():
    linked = {(ROOT / t).resolve() for t in relative_links(ROOT / "README.md")}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link to {unlinked}"


# ------------------------------------------------------------------------------ command lines


@dataclass(frozen=True)
class Command:
    config: str                     # train | sample | eval | train_classifier
    overrides: tuple[str, ...]
    search_path: tuple[str, ...]    # folders added with --config-dir / hydra.searchpath
    source: str                     # "docs/models.md: difflab-train ..." (for the test id)


def split_top_level(value: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets, braces, parentheses and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(value):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(value[start:i])
            start = i + 1
    parts.append(value[start:])
    return parts


def first_sweep_value(override: str) -> str:
    """`key=a,b,c` of a multirun -> `key=a` (lists such as `[a,b]` are one value)."""
    key, eq, value = override.partition("=")
    if not eq:
        return override
    m = re.fullmatch(r"(?:choice|range)\((.*)\)", value)
    if m:
        value = m.group(1)
    return f"{key}={split_top_level(value)[0]}"


def parse_command(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(config name, arguments after the entry point) of a difflab command line, or None."""
    if tokens[:2] == ["make", "train"] or (tokens[:1] == ["make"] and "train" in tokens[1:]):
        args = [t.split("=", 1)[1] for t in tokens if t.startswith("ARGS=")]
        return "train", shlex.split(args[0]) if args else []
    for i, tok in enumerate(tokens):
        name = tok.rsplit("/", 1)[-1]
        if name in COMMANDS:
            return COMMANDS[name], tokens[i + 1:]
        if tok == "-m" and i + 1 < len(tokens) and tokens[i + 1] in MODULES:
            return MODULES[tokens[i + 1]], tokens[i + 2:]
    return None


def commands_of(page: Path) -> list[Command]:
    found = []
    for lang, body in fenced_blocks(page_text(page)):
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        for line in shell_lines(body):
            tokens = shlex.split(line.strip().removeprefix("$ "), comments=True)
            parsed = parse_command(tokens) if tokens else None
            if parsed is None:
                continue
            config, args = parsed
            found.append(to_command(config, args, f"{page.relative_to(ROOT).as_posix()}: {' '.join(tokens)}"))
    return found


def to_command(config: str, args: list[str], source: str) -> Command:
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides, search_path, rest = [], [], iter(args)
    for arg in rest:
        if arg in ("-m", "--multirun", "--help", "-h", "--hydra-help", "--resolve"):
            continue  # the overrides beside them are composed all the same
        if arg in ("--cfg", "-c", "-p", "--package"):
            next(rest)  # job | hydra | all; a package name
            continue
        if arg in ("--info", "-i"):
            nxt = next(rest, None)
            if nxt is not None and nxt not in INFO_KINDS:
                overrides.append(first_sweep_value(nxt) if multirun else nxt)
            continue
        if arg in ("--config-dir", "-cd"):
            search_path.append(next(rest))
        elif arg.startswith("-"):
            raise ValueError(f"{source}: flag {arg!r} is not handled by this test")
        elif arg.startswith("hydra.searchpath="):
            items = arg.split("=", 1)[1].strip("[]")
            search_path += [p.removeprefix("file://") for p in split_top_level(items) if p]
        else:
            overrides.append(first_sweep_value(arg) if multirun else arg)
    return Command(config, tuple(overrides), tuple(search_path), source)


def all_commands() -> list[Command]:
    unique: dict[tuple, Command] = {}
    for page in PAGES:
        for c in commands_of(page):
            unique.setdefault((c.config, c.overrides, c.search_path), c)
    return list(unique.values())


COMMAND_LINES = all_commands()


# ------------------------------------------------------------------------------------ stand-ins


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    """A folder of small PNGs in two class folders, an (empty) checkpoint file, the docs' own config files."""
    from PIL import Image

    root = tmp_path_factory.mktemp("docs")
    images = root / "images"
    for label in ("a", "b"):
        (images / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), (40 * i, 80, 120)).save(images / label / f"{i}.png")
    ckpt = root / "stand_in.ckpt"
    ckpt.touch()
    configs = root / "user_configs"
    for page in PAGES:
        for lang, body in fenced_blocks(page_text(page)):
            header = [line for line in body.splitlines() if line.startswith("#")][:3]
            names = [m.group(1) for m in map(CONFIG_FILE.match, header) if m] if lang in ("yaml", "yml") else []
            if names:
                path = configs / names[0]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(body)
    return {"images": images, "ckpt": ckpt, "configs": configs, "run": root / "run"}


def stand_in(override: str, paths: dict[str, Path], source: str) -> str:
    key, eq, value = override.partition("=")
    bare = key.lstrip("+~")
    if not eq:
        return override
    if bare == "data.root" or bare.endswith(".root"):
        return f"{key}={paths['images']}"
    if not PLACEHOLDER.search(value):
        return override
    if "ckpt" in bare or bare.endswith("path"):
        return f"{key}={paths['ckpt']}"
    if bare.endswith("dir"):
        return f"{key}={paths['run']}"
    raise ValueError(f"{source}: no stand-in for the placeholder in {override!r}")


def resolve_search_path(folder: str, paths: dict[str, Path], source: str) -> str:
    """A folder the docs name (`my_configs`, `/home/me/my_configs`) -> the written copy of the docs' config files."""
    name = Path(folder).name
    written = paths["configs"] / name
    if written.is_dir():
        return str(written)
    if Path(folder).is_dir():
        return str(Path(folder).resolve())
    raise ValueError(f"{source}: config folder {folder!r} is neither shown in the docs (# {name}/<group>/<file>.yaml) "
                     "nor present")


def compose_command(cmd: Command, paths: dict[str, Path]):
    overrides = [stand_in(o, paths, cmd.source) for o in cmd.overrides]
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    if "hydra.run.dir" not in keys:
        overrides.append(f"hydra.run.dir={paths['run']}")
    if cmd.config in WITH_PATHS:
        overrides.append(f"paths.output_dir={paths['run']}")
    if cmd.search_path:
        folders = [resolve_search_path(f, paths, cmd.source) for f in cmd.search_path]
        overrides.append("hydra.searchpath=[" + ",".join(f"file://{f}" for f in folders) + "]")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(cmd.config, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    for key, node in cfg.items():  # every interpolation resolves
        if key != "hydra" and OmegaConf.is_config(node):
            OmegaConf.to_container(node, resolve=True)
    return cfg


def find(name: str, *modules: str):
    """`name` from the first module that has it (the code is being reorganised; issue 16)."""
    for module in modules:
        try:
            obj = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if obj is not None:
            return obj
    raise ImportError(f"{name} is in none of {modules}")


def check_precision(name) -> None:
    find("autocast_dtype", "difflab.nets.inference")(name)  # raises on an unknown precision name


def tiny_diffusers_vae(folder: Path, channels: int) -> Path:
    """A randomly initialised diffusers AutoencoderKL saved with save_pretrained (f = 2)."""
    import diffusers

    path = folder / f"c{channels}"
    if not (path / "config.json").is_file():
        diffusers.AutoencoderKL(in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                layers_per_block=1, latent_channels=4, norm_num_groups=8).save_pretrained(path)
    return path


def mini_clip_text_stand_in(path: str):
    """For text_encoder=mini_clip (a checkpoint the user gives): clip_model=small's untrained text tower, frozen."""
    from difflab.nets.text import FrozenTextEncoder, ScratchTextEncoder

    tower = OmegaConf.to_container(OmegaConf.load(Path(CONF) / "clip_model" / "small.yaml").text_encoder)
    return FrozenTextEncoder(tower=ScratchTextEncoder(**{k: v for k, v in tower.items() if k != "_target_"}), ckpt_path=path)


def check_command(cmd: Command, paths: dict[str, Path]) -> None:
    cfg = compose_command(cmd, paths)
    if cmd.config == "train":
        build_module = find("build_module", "difflab.lit.from_config", "difflab.cli.trainer_setup")
        if (cfg.get("first_stage") or {}).get("kind") == "diffusers_vae":  # a tiny diffusers VAE stands in
            cfg.first_stage.path = str(tiny_diffusers_vae(paths["run"].parent / "vae", int(cfg.data.channels)))
        if (cfg.get("first_stage") or {}).get("kind") == "ckpt":  # latent diffusion on the user's autoencoder
            from test_configs import small_autoencoder

            module = build_module(cfg, load_autoencoder=small_autoencoder(cfg))
        elif (cfg.get("text_encoder") or {}).get("ckpt_path"):  # text_encoder=mini_clip: an untrained tower stands in
            module = build_module(cfg, load_clip_text=mini_clip_text_stand_in)
        else:
            module = build_module(cfg)
        assert module is not None
        datamodule = instantiate(cfg.data)
        assert datamodule.image_size == cfg.data.image_size
    elif cmd.config == "sample":
        sampler = instantiate(cfg.sampler, _convert_="all")
        sampler.validate(1000)
        check_precision(cfg.precision)
    elif cmd.config == "eval":
        build_samplers = find("build_samplers", "difflab.cli.sampler_specs")
        for sampler in build_samplers(cfg.samplers).values():  # the sampler= group's configs, options set
            sampler.validate(1000)
        check_precision(cfg.precision)
        find("resolve_extractor_kind", "difflab.metrics.build")(cfg.metrics.extractor, "digits")
    elif cmd.config == "edit":  # the task / method names, the sampler if one is named, the precision
        from difflab.cli.edit_inputs import METHODS, TASKS

        assert cfg.task in TASKS and (cfg.method is None or cfg.method in METHODS[cfg.task]), (cfg.task, cfg.method)
        if cfg.get("sampler") is not None:
            instantiate(cfg.sampler, _convert_="all").validate(1000)
        check_precision(cfg.precision)
    elif cmd.config == "export":  # the sigma_rel values; the reconstruction is tested in test_posthoc_ema
        from difflab.cli.export import sigma_rel_values
        from difflab.lit.power_ema import check_sigma_rels

        check_sigma_rels(sigma_rel_values(cfg.ema.sigma_rel))
    else:  # train_classifier: the data module; the classifier is built by its own tests
        instantiate(cfg.data)


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("cmd", COMMAND_LINES, ids=lambda c: c.source[:110])
def test_command_line_composes_and_instantiates(cmd, stand_ins):
    check_command(cmd, stand_ins)


def test_the_docs_show_commands_of_every_kind():
    kinds = {c.config for c in COMMAND_LINES}
    assert {"train", "sample", "eval"} <= kinds, kinds
    assert len(COMMAND_LINES) >= 30, f"only {len(COMMAND_LINES)} command lines found; is the extraction broken?"
    assert any(c.source.startswith("README.md: make train") for c in COMMAND_LINES)


@pytest.mark.parametrize("line", [
    "difflab-train modle.ch=64",                                       # misspelled key
    "difflab-train schedule=cosinus",                                  # unknown option
    "make train ARGS=\"trainer.max_stepz=10\"",
    "difflab-sample ckpt_path=... sampler=ddim sampler.stepz=50",
    "difflab-eval ckpt_path=... samplers=[ddim50]",                    # a spec the parser refuses
    "difflab-train -m schedule=linear,cosinus objective=simple",       # only the first value is composed: fine
])
def test_a_wrong_line_fails(line, stand_ins):
    tokens = shlex.split(line)
    config, args = parse_command(tokens)
    cmd = to_command(config, args, line)
    if "cosinus objective" in line:  # the sweep's first value is valid, so this one composes
        check_command(cmd, stand_ins)
        return
    with pytest.raises(Exception):
        check_command(cmd, stand_ins)


def test_make_targets_shown_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:", makefile, re.M))
    shown = set()
    for page in PAGES:
        for lang, body in fenced_blocks(page_text(page)):
            for line in shell_lines(body):
                tokens = shlex.split(line, comments=True) if lang in ("", "bash", "sh") else []
                while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):
                    tokens = tokens[1:]  # VAR=value make ...
                if tokens[:1] == ["make"]:
                    shown |= {t for t in tokens[1:] if "=" not in t and not t.startswith("-")}
    assert shown and shown <= targets, f"make targets shown but not in the Makefile: {shown - targets}"
