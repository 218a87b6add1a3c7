"""The stage table, the presets, the notebooks' parameters cells, the exported functions and the README's diagram
agree: a knob's default is written once (in `PRESETS`), and the picture of the lifecycle is the one `STAGES` runs."""
import importlib, inspect, json, re

import pytest

from llm_lifecycle.cli import notebook_params, present_stages
from llm_lifecycle.core import COMMON_KNOBS, PRESETS, STAGES, get_stage, project_root

COMMON_DEFAULTS = {"preset": "auto", "run_dir": None, "device": "auto", "seed": 0}


def stage_knobs(stage) -> dict:
    "Every knob `stage` takes, with its tiny-preset value."
    return {k: v for sec in stage.sections for k, v in PRESETS["tiny"].get(sec, {}).items()}


@pytest.mark.parametrize("stage", present_stages(), ids=lambda s: s.notebook)
def test_parameters_cell_names_the_preset_knobs_and_no_default(stage):
    "The parameters cell lists exactly the stage's knobs, each `None` (the preset's value) with a meaning."
    params = notebook_params(stage)
    assert list(params)[:len(COMMON_KNOBS)] == list(COMMON_KNOBS)
    assert {k: json.loads(params[k]["default"].replace("None", "null")) for k in COMMON_KNOBS} == COMMON_DEFAULTS
    assert set(params) - set(COMMON_KNOBS) == set(stage_knobs(stage)), "the parameters cell and PRESETS disagree"
    for k in stage_knobs(stage):
        assert params[k]["default"] == "None", f"{stage.notebook}: {k} has a default of its own; PRESETS holds it"
        assert params[k]["help"].strip(), f"{stage.notebook}: {k} has no comment saying what it means"


NEUTRAL = (None, False, 0, 1)  # a library default that switches a thing off or does nothing (top_k=None, temperature=1)


def literal(v):
    return list(map(literal, v)) if isinstance(v, (list, tuple)) else v


@pytest.mark.parametrize("stage", [s for s in STAGES if importlib.util.find_spec(f"llm_lifecycle.{s.name}")],
                         ids=lambda s: s.name)
def test_function_defaults_do_not_drift_from_the_preset(stage):
    "An exported function's parameter named like one of its stage's knobs defaults to the tiny preset's value, or to a neutral one."
    mod, knobs, drift = importlib.import_module(f"llm_lifecycle.{stage.name}"), stage_knobs(stage), []
    for name in mod.__all__:
        try: sig = inspect.signature(getattr(mod, name))
        except (TypeError, ValueError): continue
        for p in sig.parameters.values():
            d = p.default
            if p.name not in knobs or d is inspect.Parameter.empty or not isinstance(d, (str, int, float, list, tuple, type(None))):
                continue
            if literal(d) != literal(knobs[p.name]) and not any(d is n or (type(d) in (int, float) and d == n) for n in NEUTRAL):
                drift.append(f"{name}({p.name}={d!r}) but PRESETS['tiny'][...]['{p.name}'] = {knobs[p.name]!r}")
    assert not drift, "\n".join(drift)


def diagram_edges() -> set:
    "The solid arrows between stages in the README's mermaid diagram (in nbs/index.ipynb), as (from, to) stage names."
    nb = json.loads((project_root()/"nbs"/"index.ipynb").read_text())
    text = next("".join(c["source"]) for c in nb["cells"] if "```{mermaid}" in "".join(c["source"]))
    body = text.split("```{mermaid}")[1].split("```")[0]
    nodes = {m[0]: get_stage(m[1]).name for m in re.findall(r"(\w+)\[(\d\d) [^\]]*\]", body)}
    edges = set()
    for line in body.splitlines():
        m = re.match(r'\s*(\w+)(?:\[[^\]]*\])?\s*(?:--\s*"[^"]*"\s*)?-->\s*(\w+)', line)
        if m and m[1] in nodes and m[2] in nodes: edges.add((nodes[m[1]], nodes[m[2]]))
    return edges


def test_readme_diagram_is_the_stage_table():
    assert diagram_edges() == {(i, s.name) for s in STAGES for i in s.inputs}


def test_stages_read_only_earlier_stages():
    order = [s.name for s in STAGES]
    for s in STAGES:
        assert all(order.index(i) < order.index(s.name) for i in s.inputs), s
        assert all(o.split("/")[0] for o in s.outputs) and any(o.endswith("metrics.json") for o in s.outputs), s
