"""Configs are data: a config template that reaches for Python, for another file or for unbounded work, a run's
config.yaml holding template text, YAML that expands or nests without end, and a string where a function is
wanted each end in one sentence with exit code 2, within seconds, before anything is made (no run directory, no
output file, no `pwned` file of the payload)."""
import time
from pathlib import Path

import pytest
import yaml

from esm_gearnet import config as config_module
from esm_gearnet.commands.main import main
from esm_gearnet.config import load_config, load_run_config, render_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "config" / "demo" / "esm_gearnet.yaml"
LINE = 5  # the line each template below is put on, right after output_dir
PAYLOAD = "__globals__.os.system('touch pwned')"
ESCAPES = [  # (case, template line, what the sentence says the sandbox refused)
    ("cycler's globals", f"# {{{{ cycler.__init__.{PAYLOAD} }}}}",
     "access to attribute '__init__' of 'NoneType' object is unsafe"),
    ("lipsum's globals", "# {{ lipsum.__globals__['os'].system('touch pwned') }}",
     "access to attribute '__globals__' of 'NoneType' object is unsafe"),
    ("the subclasses of object", "# {{ ''.__class__.__mro__[1].__subclasses__() }}",
     "access to attribute '__class__' of 'str' object is unsafe"),
    ("self", f"# {{{{ self.__init__.{PAYLOAD} }}}}",
     "access to attribute '__init__' of 'TemplateReference' object is unsafe"),
    ("a method call", "# {{ '{:>999999999}'.format(1) }}", "str.format is not callable in a config"),
    ("namespace, a value a loop can grow", "{% set ns = namespace(s='x') %}",
     "a 'NoneType' object is not callable in a config"),
]
REFUSED = ("the Jinja template does what a config may not ({}); a config is data: use its variables, filters, tests, "
           "macros and range() only.")
TOO_LONG = ("rendering the Jinja template takes longer than RENDER_SECONDS ({} s); a config renders in bounded work, "
            "so remove the loop or recursion that runs on.")
TOO_LARGE = "the Jinja template makes a value larger than RENDER_BYTES (10000000); a config renders to a short text."
OTHER_FILE = "{} is not available in a config, which is one file; copy the text in instead."
BOUNDED = [  # (case, template line, sentence, RENDER_SECONDS for the row: None keeps the real limit)
    ("a range bomb", "{% for i in range(10**12) %}{% endfor %}",
     "range() of 1000000000000 items is more than RANGE_ITEMS (100000); a config renders in bounded work.", None),
    ("nested loops", "{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}",
     TOO_LONG.format(5), None),
    ("nested loops over a string, no call", "{% set r = 'x' * 100000 %}{% for i in r %}{% for j in r %}{% endfor %}"
     "{% endfor %}", TOO_LONG.format(0.5), 0.5),
    ("a huge string", "# {{ 'x' * 10**10 }}", TOO_LARGE, None),
    ("a macro doubling its text", "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}# {{ f('x') }}", TOO_LARGE, None),
    ("join with a huge separator", "{% set s = range(3) | join('x' * 9000000) %}", TOO_LARGE, None),
    ("a set block whose loop grows", "{% set s %}{% for i in range(1000) %}{% for j in range(1000) %}xxxxxxxxxxx"
     "{% endfor %}{% endfor %}{% endset %}",
     TOO_LARGE, None),
    ("a set block whose loop writes large values", "{% set s %}{% for i in range(100000) %}{{ 'x' * 9000000 ~ i }}"
     "{% endfor %}{% endset %}", TOO_LARGE, None),
    ("a macro body that grows", "{% macro f() %}{% for i in range(100000) %}" + "x" * 101 + "{% endfor %}"
     "{% endmacro %}# {{ f() }}", TOO_LARGE, None),
    ("a list repeating a large string, as text", "{% set s = 'x' * 9000000 %}# {{ [s, s, s] }}", TOO_LARGE, None),
    ("a list repeating a large string, through a filter", "{% set s = 'x' * 9000000 %}# {{ [s, s, s] | string }}",
     TOO_LARGE, None),
    ("sum of lists, quadratic time", "# {{ ([[1]] * 100000) | sum(start=[]) }}",
     REFUSED.format("sum of anything but numbers is not available in a config"), None),
    ("tojson, whose indent repeats", "# {{ [[[1]]] | tojson(10**9) }}",
     "Jinja template error: No filter named 'tojson'.", None),
    ("a huge %-format", "# {{ '%0999999999d' % 1 }}", "a %-format with a width of a million or more characters makes "
     "a value larger than RENDER_BYTES (10000000).", None),
    ("include", "{% include 'other.yaml' %}", OTHER_FILE.format("{% include %}"), None),
    ("import", "{% import 'other.yaml' as other %}", OTHER_FILE.format("{% import %}"), None),
    ("from import", "{% from 'other.yaml' import x %}", OTHER_FILE.format("{% from ... import %}"), None),
    ("extends", "{% extends 'other.yaml' %}", OTHER_FILE.format("{% extends %}"), None),
]


def _template(tmp_path, line: str) -> Path:
    """The demo config with `line` put on line LINE."""
    lines = DEMO.read_text().splitlines()
    lines.insert(LINE - 1, line)
    (tmp_path / "bad.yaml").write_text("\n".join(lines) + "\n")
    return tmp_path / "bad.yaml"


def _small_demo(path: Path, output_dir, **changes) -> Path:
    config = yaml.safe_load(render_config(DEMO, {"num_protein": 20, "batch_size": 4, "num_epoch": 1}))
    config["output_dir"] = str(output_dir)
    config["task"]["model"]["structure_model"]["hidden_dims"] = [16]
    config.update(changes)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch demo run whose output_dir, typed on the command line, is template text:
    (run directory, that output_dir)."""
    root = tmp_path_factory.mktemp("trained")
    output_dir = str(root / f"{{{{ cycler.__init__.{PAYLOAD} }}}}")
    config = _small_demo(root / "demo.yaml", root / "runs")
    assert main(["downstream", "-c", str(config), "--output_dir", output_dir]) == 0
    (saved,) = Path(output_dir).rglob("config.yaml")
    return saved.parent, output_dir


def _command(command: str, config: Path, tmp_path: Path, trained_run) -> list:
    """The command line of `command` with config `config`, writing under tmp_path/out."""
    structure = ROOT / "tests" / "data"  # inputs are never read: the config is refused first
    return {"downstream": ["downstream", "-c", config, "--output_dir", tmp_path / "out"],
            "pretrain": ["pretrain", "-c", config, "--output_dir", tmp_path / "out"],
            "embed": ["embed", structure, "-o", tmp_path / "out" / "e.npz", "-c", config],
            "predict": ["predict", structure, "-o", tmp_path / "out" / "p.csv", "-c", config,
                        "--ckpt", trained_run]}[command]


@pytest.mark.parametrize("command", ["downstream", "pretrain", "embed", "predict"])
@pytest.mark.parametrize("case,line,refusal", ESCAPES, ids=[c[0] for c in ESCAPES])
def test_escape_is_one_sentence_and_runs_nothing(cli, tmp_path, monkeypatch, trained, command, case, line, refusal):
    monkeypatch.chdir(tmp_path)
    config = _template(tmp_path, line)
    start = time.monotonic()
    code, _, err = cli(*_command(command, config, tmp_path, trained[0]))
    assert time.monotonic() - start < 10
    assert (code, err) == (2, f"error: {config}, line {LINE}: {REFUSED.format(refusal)}\n")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case,line,sentence,seconds", BOUNDED, ids=[c[0] for c in BOUNDED])
def test_unbounded_template_is_one_sentence_within_seconds(cli, tmp_path, monkeypatch, case, line, sentence,
                                                          seconds):
    if seconds is not None:
        monkeypatch.setattr(config_module, "RENDER_SECONDS", seconds)
    config = _template(tmp_path, line)
    start = time.monotonic()
    code, _, err = cli("downstream", "-c", config, "--output_dir", tmp_path / "out")
    assert time.monotonic() - start < config_module.RENDER_SECONDS + 5
    assert (code, err) == (2, f"error: {config}, line {LINE}: {sentence}\n")
    assert not (tmp_path / "out").exists()


def test_resume_reads_template_text_in_the_run_config_as_data(cli, tmp_path, monkeypatch, trained):
    """`--output_dir "{{ ... }}"` was saved verbatim in config.yaml; resuming reads it as the string it is (the
    run is finished, so the resume changes nothing) and runs none of it."""
    run_dir, output_dir = trained
    monkeypatch.chdir(tmp_path)
    assert load_run_config(str(run_dir / "config.yaml")).output_dir == output_dir
    code, _, err = cli("downstream", "--resume", run_dir)
    assert code == 0, err
    assert not (tmp_path / "pwned").exists() and not (run_dir.parent / "pwned").exists()


def test_resume_of_a_run_config_with_a_jinja_loop_does_not_render_it(cli, tmp_path, trained):
    """A {% %} tag in a run's config.yaml is text too: a loop bomb in a comment costs nothing."""
    run_dir, _ = trained
    text = (run_dir / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text("# {% for i in range(10**12) %}{% endfor %}\n" + text)
    assert load_run_config(str(tmp_path / "config.yaml")).output_dir == yaml.safe_load(text)["output_dir"]


LAUGHS = "{" + ", ".join(["b0: &b0 [x, x, x, x, x, x, x, x, x, x]"] + [
    f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * 10)}]" for i in range(1, 10)]) + "}"


def test_billion_laughs_is_one_sentence(cli, tmp_path):
    config = _small_demo(tmp_path / "laughs.yaml", tmp_path / "out")
    lines = config.read_text().splitlines()
    line = next(i for i, text in enumerate(lines) if text.strip() == "transform:") + 1
    lines[line - 1:] = [lines[line - 1].replace("transform:", f"transform: {LAUGHS}")] + [
        text for text in lines[line:] if not text.startswith("    ")]  # the old transform block removed
    config.write_text("\n".join(lines) + "\n")
    start = time.monotonic()
    code, _, err = cli("downstream", "-c", config)
    assert time.monotonic() - start < 10
    assert (code, err) == (2, f"error: {config}, line {line}: the YAML holds more than YAML_NODES (100000) values "
                              "once its aliases (*name) are expanded; write the values out or use fewer aliases.\n")
    assert not (tmp_path / "out").exists()


def test_yaml_nested_20000_deep_is_one_sentence(cli, tmp_path):
    config = _small_demo(tmp_path / "deep.yaml", tmp_path / "out")
    lines = config.read_text().splitlines() + ["deep: " + "[" * 20000 + "]" * 20000]
    config.write_text("\n".join(lines) + "\n")
    code, _, err = cli("downstream", "-c", config)
    assert (code, err) == (2, f"error: {config}, line {len(lines)}: values are nested more than NESTING_DEPTH (100) "
                              "levels deep.\n")
    assert not (tmp_path / "out").exists()


def test_override_20000_keys_deep_is_one_sentence(cli, tmp_path):
    config = _small_demo(tmp_path / "demo.yaml", tmp_path / "out")
    code, _, err = cli("downstream", "-c", config, "--" + ".".join(["engine"] * 20000), "1")
    assert (code, err) == (2, f"error: option --{'.'.join(['engine'] * 20000)[:60]}... has 20000 keys, more than "
                              "NESTING_DEPTH (100); no config is nested that deep.\n")
    assert not (tmp_path / "out").exists()


def test_override_value_20000_deep_is_one_sentence(cli, tmp_path):
    config = _small_demo(tmp_path / "demo.yaml", tmp_path / "out")
    code, _, err = cli("downstream", "-c", config, "--engine.batch_size", "[" * 20000 + "]" * 20000)
    assert (code, err) == (2, f"error: option --engine.batch_size: cannot read {'[' * 60!r}... as a YAML value "
                              "(values are nested more than NESTING_DEPTH (100) levels deep).\n")
    assert not (tmp_path / "out").exists()


def test_text_for_a_function_argument_is_one_sentence(cli, tmp_path):
    scheduler = {"class": "LambdaLR", "lr_lambda": "lambda epoch: 0.95 ** epoch"}
    config = _small_demo(tmp_path / "demo.yaml", tmp_path / "out", scheduler=scheduler)
    code, _, err = cli("downstream", "-c", config)
    assert (code, err) == (2, "error: config key `scheduler.lr_lambda` takes a Python function, which a config "
                              "cannot give (got 'lambda epoch: 0.95 ** epoch'); use a class whose arguments are "
                              "plain values.\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["x\nevil: 1", "{evil: 1}", "x # evil", "1], [2", "{{ 7 * 7 }}",
                                   "{% for i in range(10**12) %}{% endfor %}"])
def test_a_value_given_on_the_command_line_stays_one_string(value):
    """Inserted by `{{ output_dir | default(...) }}`: neither YAML structure nor template code."""
    config = load_config(str(DEMO), {"output_dir": value})
    assert config.output_dir == value
    assert list(config) == list(load_config(str(DEMO)))  # no key added


@pytest.mark.parametrize("expression", ["branch", "branch | trim", "branch + ''", "branch ~ ''", "branch | lower",
                                        "[branch] | join(',')"])
@pytest.mark.parametrize("value", ["MF\nevil: 1", "{evil: 1}", "x # evil", "1], [2", "a: b", "- x"])
def test_a_string_made_from_a_command_line_value_stays_one_string(tmp_path, expression, value):
    """A filter or operator on a value typed on the command line makes a plain string; it is still inserted as
    one scalar: the config keeps one string and gains no key."""
    path = tmp_path / "c.yaml"
    path.write_text(f"branch: {{{{ {expression} }}}}\nengine:\n  batch_size: 2\n")
    config = load_config(str(path), {"branch": value})
    assert config == {"branch": value.lower() if "lower" in expression else value, "engine": {"batch_size": 2}}
