"""One sampler language: difflab-eval's `samplers=[...]` entries are the `sampler=` config group's options.

An entry is a string, either a conf/sampler name (`ddim`) or a compact spec (`ddim-50-eta0.5`,
difflab.samplers.specs), or a mapping `{name: ddim, steps: 20, spacing: trailing}` whose other keys
are options of that sampler config (`name` may itself be a compact spec). Every entry is built the
same way: compose conf/sampler/<name>.yaml (through Hydra's search path, so your own sampler configs
work too), set the options (an unknown one is refused, naming the allowed ones), instantiate.

    difflab-eval ckpt_path=... 'samplers=[ddim-50,{name:ddim,steps:20,spacing:trailing}]'
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from difflab.cli.config import config_dir
from difflab.samplers.base import Sampler
from difflab.samplers.specs import SPECS_HELP, parse_spec

GROUP = "sampler"


@contextmanager
def _hydra() -> Iterator[None]:
    """The running app's Hydra (its search path included); outside an app, the package's config tree."""
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with hydra.initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        yield


def _search_path_override() -> list[str]:
    """The running app's `hydra.searchpath=[...]` (from the command line or a config), for a nested compose;
    `--config-dir` needs nothing: it is part of the app's Hydra already."""
    if not HydraConfig.initialized() or not HydraConfig.get().searchpath:
        return []
    return ["hydra.searchpath=[" + ",".join(str(p) for p in HydraConfig.get().searchpath) + "]"]


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """hydra.compose in the running app (its search path), or against the package's config tree outside one."""
    with _hydra():
        return hydra.compose(config_name, [*_search_path_override(), *overrides])


def sampler_config_names() -> list[str]:
    """The options of the sampler config group (conf/sampler/*.yaml and any on the search path)."""
    with _hydra():
        loader = GlobalHydra.instance().config_loader()
        return sorted(loader.get_group_options(GROUP, overrides=_search_path_override()))


def parse_entry(entry: Any) -> tuple[str, str, dict[str, Any]]:
    """(label, sampler config name, options) of one `samplers=[...]` entry."""
    if isinstance(entry, str):
        name, options = parse_spec(entry)
        return entry, name, options
    if isinstance(entry, (Mapping, DictConfig)):
        plain = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else dict(entry)
        spec = plain.pop("name", None)
        if not isinstance(spec, str):
            raise ValueError(f"sampler {plain!r} has no name; a mapping entry is {{name: <sampler config>, "
                             "<option>: <value>, ...}, e.g. {name: ddim, steps: 20, spacing: trailing}")
        name, options = parse_spec(spec)
        label = spec + ("(" + ",".join(f"{k}={v}" for k, v in plain.items()) + ")" if plain else "")
        return label, name, {**options, **plain}
    raise ValueError(f"sampler entry {entry!r} is neither a string (a sampler config name or compact spec: "
                     f"{SPECS_HELP}) nor a mapping {{name: <sampler config>, <option>: <value>}}")


def sampler_config(entry: Any, *, _names: list[str] | None = None) -> tuple[str, dict[str, Any]]:
    """(label, the sampler's config with the entry's options set: `_target_` plus every option), not instantiated."""
    label, name, options = parse_entry(entry)
    with _hydra():
        names = _names if _names is not None else sampler_config_names()
        if name not in names:
            raise ValueError(f"sampler {label!r}: {name!r} is not a sampler config; choose one of {names} "
                             f"(conf/sampler/), or a compact spec: {SPECS_HELP}")
        node = OmegaConf.to_container(compose_config("sample", [f"{GROUP}={name}"])[GROUP], resolve=True)
    allowed = [k for k in node if k != "_target_"]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ValueError(f"sampler {label!r}: {unknown[0]!r} is not an option of sampler={name} ({node['_target_']}); "
                         f"its options: {allowed}")
    return label, {**node, **options}


def build_sampler(entry: Any) -> Sampler:
    """The sampler one entry names (see the module docstring)."""
    _, config = sampler_config(entry)
    return hydra.utils.instantiate(config, _convert_="all")


def build_samplers(entries: Iterable[Any]) -> dict[str, Sampler]:
    """{label: sampler} for difflab-eval's samplers list, every entry checked before any is used."""
    out: dict[str, Sampler] = {}
    with _hydra():
        names = sampler_config_names()
        for entry in entries:
            label, config = sampler_config(entry, _names=names)
            out[label] = hydra.utils.instantiate(config, _convert_="all")
    return out
