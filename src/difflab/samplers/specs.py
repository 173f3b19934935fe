"""Compact sampler specs, shorthand for a conf/sampler option with some of its options set.

    ddim-50           -> ("ddim", {"steps": 50})
    ddim-50-eta0.5    -> ("ddim", {"steps": 50, "eta": 0.5})
    ddpm-100-large    -> ("ddpm", {"steps": 100, "variance": "fixed_large"})
    heun-18-churn40   -> ("heun", {"steps": 18, "s_churn": 40.0})
    ode-tol1e-4       -> ("ode", {"rtol": 1e-4, "atol": 1e-4})
    pc-1000-em        -> ("pc", {"steps": 1000, "predictor": "euler_maruyama"})
    ddim              -> ("ddim", {})          (any bare name: that sampler config as it is)

Pure Python: the (name, options) pair is built the one way every sampler config is, by composing
conf/sampler/<name>.yaml and setting the options (difflab.cli.sampler_specs).
"""

from __future__ import annotations

import re
from typing import Any

_NUM = r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
SPECS_HELP = ("ddpm[-<steps>][-large], ddim-<steps>[-eta<eta>], heun-<steps>[-churn<S>], dpmpp-<steps>, "
              "ode[-tol<tol>], pc-<steps>[-rd|-em|-anc] (the predictor), ald-<steps per level>, consistency-<steps>, or a bare "
              "sampler config name (ddim, heun, ...)")
PREDICTORS = {"rd": "reverse_diffusion", "em": "euler_maruyama", "anc": "ancestral"}

_SPECS: list[tuple[str, re.Pattern[str]]] = [
    ("ddpm", re.compile(r"^ddpm(?:-(?P<steps>\d+))?(?P<large>-large)?$")),
    ("ddim", re.compile(rf"^ddim-(?P<steps>\d+)(?:-eta(?P<eta>{_NUM}))?$")),
    ("heun", re.compile(rf"^heun-(?P<steps>\d+)(?:-churn(?P<s_churn>{_NUM}))?$")),
    ("dpmpp", re.compile(r"^dpmpp-(?P<steps>\d+)$")),
    ("ode", re.compile(rf"^ode(?:-tol(?P<tol>{_NUM}))?$")),
    ("pc", re.compile(r"^pc-(?P<steps>\d+)(?:-(?P<predictor>rd|em|anc))?$")),
    ("ald", re.compile(r"^ald-(?P<n_steps_each>\d+)$")),
    ("consistency", re.compile(r"^consistency-(?P<steps>\d+)$")),
]
_BARE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """(sampler config name, options) of a compact spec such as 'ddim-50-eta0.5'; a bare name has no options."""
    if not isinstance(spec, str):
        raise TypeError(f"a sampler spec is a string, got {spec!r}")
    for name, pattern in _SPECS:
        m = pattern.match(spec)
        if m:
            return name, _options(name, {k: v for k, v in m.groupdict().items() if v is not None})
    if _BARE_NAME.match(spec):
        return spec, {}
    raise ValueError(f"sampler {spec!r} is not understood; use {SPECS_HELP}, or a mapping {{name: <sampler>, <option>: <value>}}")


def _options(name: str, groups: dict[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, text in groups.items():
        if key in ("steps", "n_steps_each"):
            options[key] = int(text)
        elif key in ("eta", "s_churn"):
            options[key] = float(text)
        elif key == "tol":
            options["rtol"] = options["atol"] = float(text)
        elif key == "large":
            options["variance"] = "fixed_large"
        elif key == "predictor":
            options["predictor"] = PREDICTORS[text]
    return options
