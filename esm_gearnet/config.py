"""Config files: Jinja2 template -> YAML -> key overrides -> EasyDict.

A config may hold Jinja variables (`branch: {{ branch }}`); every undeclared variable becomes a command-line
option of the scripts (`--branch MF`, see `arguments`). Values are read as Python literals where they are one
(`3`, `0.1`, `[1, 2]`, `None`), else kept as strings. A variable that is not given renders as YAML null, as in the
original. Key overrides (`--engine.batch_size 4`) set keys of the rendered config (`apply_overrides`).

Configs are data. A template is rendered in a sandbox (`_Sandbox`): it may use its variables, a few filters
(`SAFE_FILTERS`), Jinja's tests, its own macros, `range` and `dict`; it can reach no Python internals (`__class__`,
`__globals__`, methods), include, import or extend no other file, and renders within bounded work: at most
`RENDER_SECONDS` of wall time, `RENDER_BYTES` of text (and no value made while rendering larger), `RANGE_ITEMS`
items per `range`; every value made (by an operator, a filter, a call, a `{% set %}` block or a macro body) is
checked against RENDER_BYTES, and so is all the text `{{ }}` writes, wherever it goes. The YAML is read with
`yaml.safe_load`'s rules plus `YAML_NODES` values with aliases expanded and `NESTING_DEPTH` levels of nesting
(override key paths too). Every string inserted by `{{ }}` (a value typed on the command line, or one a filter or
an operator made from it) stays one scalar: one that YAML would not read back as one value on one line, that
holds a flow indicator or that is longer than `ONE_LINE` is inserted quoted. A run directory's `config.yaml` is the
config as it ran, read as plain YAML with the same limits and never rendered again (`load_run_config`). Every
refusal is one `ConfigError` sentence naming the file (and line, where there is one).
"""
from __future__ import annotations

import ast
import difflib
import functools
import json
import os
import re
import time
import traceback
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence, Set, Tuple

import easydict
import jinja2
import jinja2.meta
import yaml
from jinja2 import nodes
from jinja2.runtime import LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer


Override = Tuple[str, str]  # (key path, VALUE as typed)

# ---- limits: a config renders and loads in bounded work ---------------------------------------------------
RENDER_SECONDS = 5.0  # wall time of rendering one template
RENDER_BYTES = 10_000_000  # characters of a rendered config (or a run's config.yaml), and size of any value made
RANGE_ITEMS = 100_000  # items of one `range(...)` in a template
YAML_NODES = 100_000  # values of a YAML document, its aliases (*name) expanded
NESTING_DEPTH = 100  # levels of nested YAML values (aliases expanded) and keys of an override path
ONE_LINE = 1_000  # characters of the longest string `{{ }}` inserts unquoted (YAML reads longer ones slowly)
# DEVIATION: the original rendered with every Jinja filter; these are the ones that cannot build huge text or
# reach into objects (no format/center/indent/replace/wordwrap/attr/map/tojson, whose indent repeats): real
# configs use `default`. `join`'s separator is checked before it repeats, and `sum` adds numbers only.
SAFE_FILTERS = ("abs", "capitalize", "d", "default", "dictsort", "first", "float", "int", "items", "join", "last",
                "length", "list", "lower", "max", "min", "reverse", "round", "sort", "string", "sum", "title",
                "trim", "unique", "upper")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file or key and what to do."""


class _Refused(Exception):
    """A limit reached while rendering or reading YAML; the message is the sentence without the file."""

    def __init__(self, sentence: str, line: Optional[int] = None):
        super().__init__(sentence)
        self.line = line


#: the configs that ship with the package (`config/` of the repository): `esm-gearnet configs` lists them
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def packaged_configs():
    """The names of the configs that ship with the package (`EC/esm_gearnet.yaml`, ...), sorted."""
    return sorted(os.path.relpath(os.path.join(folder, name), CONFIGS).replace(os.sep, "/")
                  for folder, _, names in os.walk(CONFIGS) for name in names if name.endswith(".yaml"))


def locate(path: str) -> str:
    """`path` when that file exists, else the packaged config of that name (`EC/esm_gearnet.yaml`, also written
    `config/EC/esm_gearnet.yaml` as in the original's command lines), so a pip-installed package finds its
    configs from any folder; the path itself when neither exists."""
    path = os.path.expanduser(str(path))
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    name = path.replace(os.sep, "/")
    for candidate in (name, name[len("config/"):] if name.startswith("config/") else None):
        if candidate and os.path.isfile(os.path.join(CONFIGS, candidate)):
            return os.path.join(CONFIGS, candidate)
    return path


def _read(path: str) -> str:
    path = locate(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist, nor among the configs that ship with the package "
                          "(`esm-gearnet configs` lists them); pass an existing YAML file with -c.")
    if os.path.getsize(path) > RENDER_BYTES:
        raise ConfigError(f"config file {path} is larger than RENDER_BYTES ({RENDER_BYTES} bytes); a config is a "
                          "short text.")
    with open(path, "r", encoding="utf-8") as handle:
        return handle.read()


def _one_value_on_one_line(text: str) -> bool:
    """Whether YAML reads `text` back as one scalar on one line: itself, or a null, boolean, number or date."""
    if "\n" in text or "\r" in text:
        return False
    try:
        value = yaml.load(text, Loader=_Loader)
    except Exception:  # noqa: BLE001 - a YAML error or a limit: not one plain value
        return False
    return not isinstance(value, (dict, list)) and (value == text or not isinstance(value, str))


def _size(value: Any, seen: Optional[Dict[int, int]] = None) -> int:
    """Characters of a string; items of a list, tuple or dict plus their sizes (a value shared counts once per
    use); 1 for anything else. Stops counting past RENDER_BYTES."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if not isinstance(value, (list, tuple, dict)):
        return 1
    seen = {} if seen is None else seen
    if id(value) not in seen:
        seen[id(value)] = RENDER_BYTES + 1  # a value inside itself is too large
        total = len(value)
        for item in (list(value.keys()) + list(value.values()) if isinstance(value, dict) else value):
            total += _size(item, seen)
            if total > RENDER_BYTES:
                break
        seen[id(value)] = total
    return seen[id(value)]


_LOOP, _CONCAT = "bounded loop", "bounded concat"  # names of the sandbox's own filters, unusable in a template


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox (no `_attribute`, no mutation of lists or dicts) with bounded work: every call,
    attribute, item, operator, filter and loop item checks the deadline; `*`, `+`, `**`, `%`, `~`, filters, calls,
    `{% set %}` blocks and macro bodies refuse values larger than RENDER_BYTES; only macros, `range` (at most
    RANGE_ITEMS items) and `dict` can be called."""

    intercepted_binops = frozenset(["*", "+", "**", "%"])

    def __init__(self):
        super().__init__(finalize=self._finalize, undefined=jinja2.StrictUndefined)
        # DEVIATION: the original's globals held cycler, joiner, namespace (a value a loop can grow) and lipsum;
        # a config has range (bounded) and dict only. Those names are now plain variables (null unless given).
        self.globals = {"range": self._range, "dict": dict}
        self.filters = {name: self._bounded_filter(name, self.filters[name]) for name in SAFE_FILTERS}
        self.filters.update({_LOOP: self._loop, _CONCAT: self._join})
        self.concat = self._join  # `{% set %}` blocks and macro bodies
        self.deadline, self.written = float("inf"), 0

    def start(self) -> None:
        self.deadline, self.written = time.monotonic() + RENDER_SECONDS, 0

    def _finalize(self, value: Any) -> str:
        """The text `{{ value }}` writes. None renders as YAML null (the original rendered the text "null"), while
        `{{ x | default(1, true) }}` still sees a missing variable as None.
        DEVIATION: a string that YAML would not read back as one value on one line, that holds a flow indicator
        (`x\\nevil: 1`, `{a: 1}`, `a # b`, `1], [2`) or that is longer than ONE_LINE is inserted as a quoted
        scalar, whether it was typed on the command line or made by a filter, `~` or `+` from one, so a value
        typed on the command line cannot change the config's structure. A list or mapping (`--dims "[1, 2]"`)
        is still inserted as its text, and text written in the template outside `{{ }}` is the template's own.
        All text written by `{{ }}` (into the config, a `{% set %}` block or a macro body) counts against
        RENDER_BYTES, so a loop cannot pile up parts larger than RENDER_BYTES before they are joined."""
        if value is None:
            text = "null"
        elif not isinstance(value, str):
            text = str(self.bounded(value))  # a list's text is about its size: checked before it is made
        elif len(value) > ONE_LINE or re.search(r"[,\[\]{}#]", value) or not _one_value_on_one_line(value):
            text = json.dumps(value)  # a JSON string is a YAML double-quoted scalar
        else:
            text = value
        self.written += len(text)
        self.bounded(None, self.written)
        return text

    def _bounded_filter(self, name: str, function):
        """`function` with its arguments (before) and result (after) checked; `join` also checks the text it would
        make, as its separator repeats, and `sum` adds numbers only (adding lists takes quadratic time)."""
        @functools.wraps(function)  # keeps jinja2's pass_eval_context/pass_environment marks
        def bounded(*args, **kwargs):
            self.tick()
            self.bounded(None, sum(map(_size, args + tuple(kwargs.values()))))
            if name == "sum" and not isinstance(kwargs.get("start", args[3] if len(args) > 3 else 0), (int, float)):
                raise SecurityError("sum of anything but numbers is not available in a config")
            if name == "join":  # do_join(eval_ctx, value, d="", attribute=None)
                items = list(args[1])
                separator = str(kwargs.get("d", args[2] if len(args) > 2 else ""))
                self.bounded(None, len(separator) * max(len(items) - 1, 0) + _size(items))
                args = (args[0], items) + args[2:]
            return self.bounded(function(*args, **kwargs))
        return bounded

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Refused(f"rendering the Jinja template takes longer than RENDER_SECONDS ({RENDER_SECONDS:g} s); "
                           "a config renders in bounded work, so remove the loop or recursion that runs on.")

    def bounded(self, value: Any, size: Optional[int] = None) -> Any:
        """`value`, refused when it (or `size`, what it would be) is larger than RENDER_BYTES."""
        if (_size(value) if size is None else size) > RENDER_BYTES:
            raise _Refused(f"the Jinja template makes a value larger than RENDER_BYTES ({RENDER_BYTES}); a config "
                           "renders to a short text.")
        return value

    def _range(self, *args: int) -> range:
        items = range(*args)
        if len(items) > RANGE_ITEMS:
            raise _Refused(f"range() of {len(items)} items is more than RANGE_ITEMS ({RANGE_ITEMS}); a config "
                           "renders in bounded work.")
        return items

    def _loop(self, iterable: Any) -> Iterator[Any]:
        for item in iterable:
            self.tick()
            yield item

    def _join(self, parts: Iterable[Any]) -> str:
        """The parts joined, refused before joining when that would be larger than RENDER_BYTES."""
        parts = list(parts)
        self.bounded(None, sum(map(_size, parts)))  # a list's text is about its size: checked before it is made
        return self.bounded("".join(map(str, parts)))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - the sandbox's own signature
        __self.tick()
        owner = getattr(__obj, "__self__", None)
        # DEVIATION: the original called any Python callable (str.format, dict.items, ...): configs call macros
        if not (isinstance(__obj, (Macro, LoopContext, jinja2.Undefined)) or isinstance(owner, LoopContext)
                or __obj is dict or __obj == __self._range):
            name = getattr(__obj, "__qualname__", None) or f"a {type(__obj).__name__!r} object"
            raise SecurityError(f"{name} is not callable in a config")
        return __self.bounded(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.tick()
        if attribute.startswith("_"):  # also where the object has no such attribute (a variable left null)
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.tick()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        """`left operator right`, its result size checked before it is made where that can be large."""
        self.tick()
        integers = all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right))
        if operator == "**" and integers and abs(left) > 1 and right > 0:
            self.bounded(None, abs(left).bit_length() * right // 8)  # bytes of the power
        elif operator == "*" and not integers and isinstance(left, int) != isinstance(right, int):
            count, sequence = (left, right) if isinstance(left, int) else (right, left)
            self.bounded(None, _size(sequence) * count)
        elif operator == "%" and isinstance(left, str) and re.search(r"%[^a-zA-Z%]*(\d{7,}|\*)", left):
            raise _Refused("a %-format with a width of a million or more characters makes a value larger than "
                           f"RENDER_BYTES ({RENDER_BYTES}).")
        return self.bounded(super().call_binop(context, operator, left, right))


# (node type, how a sentence names it): a config is one file, and the sandbox has no loader for others
_OTHER_FILES = ((nodes.Include, "{% include %}"), (nodes.Import, "{% import %}"),
                (nodes.FromImport, "{% from ... import %}"), (nodes.Extends, "{% extends %}"))


class _Bounded(NodeTransformer):
    """Every loop's items and every `~` go through the sandbox's bounded filters."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _LOOP, [], [], None, None, lineno=node.iter.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        node = self.generic_visit(node)
        return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), _CONCAT, [], [], None, None,
                            lineno=node.lineno)


_COMMENTED_EXPRESSION = re.compile(r"^(\s*#.*?)\{\{.*?\}\}", re.M)


def _without_commented_expressions(text: str) -> str:
    """The text with every `{{ ... }}` on a YAML comment line removed (`# model_checkpoint: {{ ckpt }}`): what
    `detect_variables` reads, so a commented-out key is no option of the config."""
    while True:
        stripped = _COMMENTED_EXPRESSION.sub(r"\1", text)
        if stripped == text:
            return text
        text = stripped


def _parse_template(text: str, path: str):
    """(sandbox, template, undeclared variables); a syntax error, an unknown filter or test, or a tag that reads
    another file ends in one sentence."""
    # StrictUndefined: `{{ x.y }}` of a variable without that attribute is an error, not an empty value
    environment = _Sandbox()
    try:
        tree = environment.parse(text)
        for kind, tag in _OTHER_FILES:
            for node in tree.find_all(kind):
                raise ConfigError(f"{path}, line {node.lineno}: {tag} is not available in a config, which is one "
                                  "file; copy the text in instead.")
        variables = set(jinja2.meta.find_undeclared_variables(tree))
        tree = _Bounded().visit(tree)
        tree.set_environment(environment)
        return environment, environment.from_string(tree), variables
    except jinja2.TemplateSyntaxError as error:  # an unknown filter is a TemplateAssertionError, one of these
        raise ConfigError(f"{path}, line {error.lineno}: Jinja template error: {error.message.rstrip('.')}.") from None


def _template_line(error: BaseException) -> str:
    """", line N" of the template line that raised while rendering, from the traceback jinja2 rewrites."""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if frame.filename == "<template>"]
    return f", line {lines[-1]}" if lines else ""


def detect_variables(path: str) -> Set[str]:
    """The undeclared Jinja variables of a config file (each one is a command-line option), those that appear
    only on YAML comment lines left out (`# model_checkpoint: {{ ckpt }}` is no option). The comment lines are
    still rendered, in the sandbox, with every undeclared variable None (`render_config`)."""
    text = _read(path)
    _parse_template(text, path)  # the whole file is checked: syntax, unknown filters, tags reading other files
    return _parse_template(_without_commented_expressions(text), path)[2]


MARK = "__jinja_variable__"


def variable_keys(path: str) -> Dict[str, str]:
    """{key path: variable} of the keys whose whole value is one Jinja variable of the config (found by
    rendering every variable as a marker); {} when the config cannot be rendered so."""
    names = detect_variables(path)
    try:
        config = _yaml(render_config(path, {name: f"{MARK}{name}{MARK}" for name in names}), path)
    except Exception:  # noqa: BLE001 - arithmetic or filters on a variable: no marker survives
        return {}
    return {path: value[len(MARK):-len(MARK)] for path, value in key_items(config)
            if isinstance(value, str) and value.startswith(MARK) and value.endswith(MARK)}


def literal(value: Any) -> Any:
    """`"3"` -> 3, `"[1, 2]"` -> [1, 2], `"None"` -> None; text that is no Python literal stays a string."""
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def render_config(path: str, variables: Optional[Dict[str, Any]] = None) -> str:
    """The config text after Jinja rendering in the sandbox (see the module's docstring). Every variable of the
    config that `variables` does not give is None, so one file renders to one config wherever it is read
    (training, pre-training, embed, predict, tests): `{{ true if x is none else x }}` means true everywhere.
    Variable values are data: jinja2 inserts them as text and never renders them again."""
    environment, template, names = _parse_template(_read(path), path)
    given = {name: None for name in names}
    given.update(variables or {})
    environment.start()
    chunks, size = [], 0
    try:
        for chunk in template.generate(given):
            size += len(chunk)
            if size > RENDER_BYTES:
                raise _Refused(f"the rendered config is larger than RENDER_BYTES ({RENDER_BYTES} characters); a "
                               "config renders to a short text.")
            environment.tick()
            chunks.append(chunk)
    except _Refused as error:
        raise ConfigError(f"{path}{_template_line(error)}: {error}") from None
    except SecurityError as error:
        raise ConfigError(f"{path}{_template_line(error)}: the Jinja template does what a config may not "
                          f"({str(error).rstrip('.')}); a config is data: use its variables, filters, tests, "
                          "macros and range() only.") from None
    except Exception as error:  # noqa: BLE001 - an undefined attribute, a division by zero, a failing filter
        raise ConfigError(f"{path}{_template_line(error)}: the Jinja template fails while rendering "
                          f"({type(error).__name__}: {error}); check the expression and the variables given on "
                          "the command line.") from None
    return "".join(chunks)


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document nested deeper than NESTING_DEPTH or holding more than YAML_NODES
    values once its aliases are expanded (billion laughs: `b1: &b1 [*b0, *b0, ...]`), or an alias inside its
    own anchor. SafeLoader shares an anchored value between its aliases; everything after it (EasyDict, the
    checks, saving config.yaml) copies, so the expanded size is what counts."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        if self.depth >= NESTING_DEPTH:
            raise _Refused(f"values are nested more than NESTING_DEPTH ({NESTING_DEPTH}) levels deep.",
                           self.peek_event().start_mark.line + 1)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _expanded(node, 1, {})
        return node


def _expanded(node: yaml.Node, depth: int, done: Dict[int, Tuple[int, int]]) -> Tuple[int, int]:
    """(values, levels) of a YAML node with its aliases expanded; a limit reached raises _Refused."""
    if depth > NESTING_DEPTH:
        raise _Refused(f"values are nested more than NESTING_DEPTH ({NESTING_DEPTH}) levels deep once aliases "
                       "(*name) are expanded.", node.start_mark.line + 1)
    if id(node) in done:
        count, levels = done[id(node)]
        if count < 0:
            raise _Refused("an alias (*name) stands inside the value of its own anchor (&name), which never ends.",
                           node.start_mark.line + 1)
        if depth + levels - 1 > NESTING_DEPTH:
            return _expanded(node, NESTING_DEPTH + 1, done)
        return count, levels
    done[id(node)] = (-1, 0)
    children = node.value if isinstance(node, yaml.SequenceNode) else \
        [item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) else []
    count, levels = 1, 0
    for child in children:
        child_count, child_levels = _expanded(child, depth + 1, done)
        count, levels = count + child_count, max(levels, child_levels)
        if count > YAML_NODES:
            raise _Refused(f"the YAML holds more than YAML_NODES ({YAML_NODES}) values once its aliases (*name) "
                           "are expanded; write the values out or use fewer aliases.", node.start_mark.line + 1)
    done[id(node)] = (count, levels + 1)
    return done[id(node)]


def _yaml(text: str, source: str, after: str = "") -> Any:
    """Text read as YAML (yaml.safe_load's rules) within the limits; one sentence naming `source` otherwise."""
    try:
        return yaml.load(text, Loader=_Loader)
    except _Refused as error:
        where = f", line {error.line}" if error.line else ""
        raise ConfigError(f"{source}{where}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{source}{where}: not valid YAML{after} ({problem}).") from None


def _mapping(text: str, source: str, after: str = "") -> Dict[str, Any]:
    config = _yaml(text, source, after)
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: a config must be a YAML mapping of keys (output_dir, dataset, task, ...).")
    return config


def load_config(path: str, variables: Optional[Dict[str, Any]] = None,
                overrides: Sequence[Override] = ()) -> easydict.EasyDict:
    """Render a config with `variables`, parse it as YAML, set the key `overrides` and return it as an EasyDict.

    Raises:
        ConfigError: missing file, template error, YAML error, a limit or an unknown override, naming the file
            (and line).
    """
    config = _mapping(render_config(path, variables), path, " after rendering")
    return easydict.EasyDict(apply_overrides(config, overrides, path, list(variables or ())))


def load_run_config(path: str, overrides: Sequence[Override] = ()) -> easydict.EasyDict:
    """A run directory's config.yaml, the config as it ran (rendered, overrides applied), read as plain YAML
    within the same limits and never as a template: text such as `{{ x }}` in it is a string like any other.
    The key `overrides` are set on it.

    Raises:
        ConfigError: as `load_config`.
    """
    return easydict.EasyDict(apply_overrides(_mapping(_read(path), path), overrides, path))


def plain(value: Any) -> Any:
    """A config (EasyDict) as plain dicts and lists, for yaml.safe_dump."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _value(text: str, name: str) -> Any:
    """VALUE of `--name VALUE` read as YAML; `1e-4`, which YAML 1.1 reads as text, is a number as in YAML 1.2."""
    try:
        value = yaml.load(text, Loader=_Loader)
    except (_Refused, yaml.YAMLError) as error:
        problem = str(error).rstrip(".") if isinstance(error, _Refused) else getattr(error, "problem", error)
        raise ConfigError(f"option --{name}: cannot read {_short(text)} as a YAML value ({problem}).") from None
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        return float(value)
    return value


def _short(text: str, width: int = 60) -> str:
    return repr(text) if len(text) <= width else repr(text[:width]) + "..."


def key_items(node: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(key path, value) of every key of a config, depth first: `task.model`, `a.edge_layers[2].k`."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        path = f"{prefix}[{key}]" if isinstance(node, list) else f"{prefix}.{key}" if prefix else str(key)
        yield path, value
        yield from key_items(value, path)


def apply_overrides(cfg: Dict[str, Any], overrides: Sequence[Override], source: str,
                    variables: Sequence[str] = ()) -> Dict[str, Any]:
    """`cfg` with each (key path, VALUE) set; an unknown path ends in one sentence with the closest keys.

    Args:
        source: the config file, for messages; variables: the config's Jinja variables, offered as alternatives.
    """
    for name, text in overrides:
        keys = [k for k in re.split(r"\.|\[(\d+)\]\.?", name) if k]
        if len(keys) > NESTING_DEPTH:
            raise ConfigError(f"option --{name[:60]}... has {len(keys)} keys, more than NESTING_DEPTH "
                              f"({NESTING_DEPTH}); no config is nested that deep.")
        node, found = cfg, True
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            if isinstance(node, list) and key.isdigit() and int(key) < len(node):
                key = int(key)
            elif not (isinstance(node, dict) and (key in node or last and i > 0)):
                found = False
                break
            if last:
                node[key] = _value(text, name)
            else:
                node = node[key]
        if not found:
            candidates = list(dict.fromkeys([f"--{v}" for v in variables] + [f"--{p}" for p, _ in key_items(cfg)]))
            close = difflib.get_close_matches(f"--{name}", candidates, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else \
                f"; its top-level keys are {', '.join(map(str, cfg))}."
            raise ConfigError(f"option --{name} is neither an option of the script, a variable of {source} nor "
                              f"a key path of it{hint}")
    return cfg
