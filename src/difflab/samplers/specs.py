"""Short sampler specs for difflab-eval's `samplers=[...]` list: heun-18, dpmpp-20, ode, pc-1000, ald-100."""

from __future__ import annotations

import re

from difflab.samplers.langevin import ALD
from difflab.samplers.pf_ode import PFODE
from difflab.samplers.predictor_corrector import PC
from difflab.samplers.solvers import DPMSolverPP, Heun

FAST_SPEC = re.compile(
    r"^(heun-(?P<heun>\d+)(-churn(?P<churn>[0-9.]+))?|dpmpp-(?P<dpmpp>\d+)|ode(-tol(?P<tol>[0-9.e-]+))?"
    r"|pc-(?P<pc>\d+)(-(?P<pred>rd|em|anc))?|ald-(?P<ald>\d+))$"
)
FAST_SPECS_HELP = ("heun-<steps>[-churn<S>], dpmpp-<steps>, ode[-tol<tol>], pc-<steps>[-rd|-em|-anc] "
                   "(rd/em/anc predictor with a Langevin corrector), ald-<steps per level>")
PREDICTORS = {"rd": "reverse_diffusion", "em": "euler_maruyama", "anc": "ancestral", None: "reverse_diffusion"}


def parse_fast_sampler(spec: str):
    """A sampler object from a spec such as 'heun-18', 'dpmpp-20', 'ode-tol1e-4', 'pc-500-em', 'ald-10'."""
    m = FAST_SPEC.match(spec)
    if not m:
        raise ValueError(f"sampler {spec!r} is not understood; use {FAST_SPECS_HELP}")
    g = m.groupdict()
    if g["heun"]:
        return Heun(steps=int(g["heun"]), s_churn=float(g["churn"] or 0.0))
    if g["dpmpp"]:
        return DPMSolverPP(steps=int(g["dpmpp"]))
    if g["pc"]:
        return PC(steps=int(g["pc"]), predictor=PREDICTORS[g["pred"]])
    if g["ald"]:
        return ALD(n_steps_each=int(g["ald"]))
    tol = float(g["tol"]) if g["tol"] else 1e-5
    return PFODE(rtol=tol, atol=tol)
