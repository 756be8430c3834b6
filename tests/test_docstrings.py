"""Shapes in docstrings: every public function and method of `esm_gearnet.models` and `esm_gearnet.tasks` that
takes or returns tensors says their shapes, in the design notes' letters (B proteins, N residues, L padded length,
E edges, R relations, D channels; others where needed, said in place), as `data/protein.py` does.

The rule, checked on every public function of every module of those packages (found by walking them, so a new
module is checked without editing this file), and on every public method, `forward` and `__call__` included, of
their public classes (methods a public class inherits from a private class of the same module too):

1. A parameter is a *tensor parameter* when
   a. its annotation names `Tensor` or `ProteinBatch`, or an alias of the module that holds tensors
      (`Features = Dict[str, torch.Tensor]`), e.g. `Optional[torch.Tensor]`, `Dict[str, torch.Tensor]`;
   b. or, unannotated, it overrides a parameter of the same name that is one by (a) (`MSP.loss(pred, target)`
      inherits `Task.loss(pred: torch.Tensor, target: torch.Tensor)`);
   c. or, whatever its annotation, its name is one the package gives only to tensors and batches
      (`TENSOR_NAMES`: `batch` is a batch dict, even annotated `Dict[str, Any]`; `graph` a `ProteinBatch`; `x` a
      node feature, ...).
2. The return is a *tensor return* when its annotation (or, unannotated, the overridden method's) is one by (1a),
   and for every `forward` (a module's forward returns tensors).
3. A function with a tensor parameter has a docstring with an `Args:` section (the class docstring stands in for
   `__init__`), with an entry `name: ...` (or `name, other: ...`) for every tensor parameter, and the entry holds
   a shape in brackets: `[N, 3]`, `[B]`, `[]` (a scalar), `{"graph": ProteinBatch [B], "targets": [B, T]}`.
4. A function with a tensor return has a docstring with a `Returns:` section that holds a shape; a property's
   docstring is its `Returns:`.

A shape is a bracket not right after a name (indexing, `x[j]`) that holds no string (a list of names,
`["label"]`; a prime, `[E', 3]`, is no string).
Returns that are not annotated and not a `forward` cannot be told from the signature; they are documented all the
same but not checked.
"""
import importlib
import inspect
import pkgutil
import re
import typing

import pytest

import esm_gearnet.models
import esm_gearnet.tasks

TENSOR = re.compile(r"\b(Tensor|ProteinBatch)\b")
# parameters of these names hold tensors or batches wherever the package uses them, annotated or not (rule 1c)
TENSOR_NAMES = {"batch", "graph", "x", "pos", "frames", "residue_number", "num_residues", "adjacency"}
# [N, 3], [B], [E', 3], [N, node_h_dim[0]], [] (a scalar): a bracket not right after a name (indexing, x[j])
BRACKET = re.compile(r"(?<![\w\]])\[((?:[^\[\]\n]|\[[^\[\]\n]*\])*)\]")
# ... that holds no string (a list of names, ["label"]); a prime (E') is no string
STRING = re.compile(r"[\"`]|(?:^|,)\s*'")


def has_shape(text: str) -> bool:
    return any(not STRING.search(match.group(1)) for match in BRACKET.finditer(text))
ENTRY = re.compile(r"^(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)\s*:(.*)$")


def _modules(package):
    """`package` and every module under it."""
    yield package
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        yield from (_modules(module) if info.ispkg else [module])


def _members(cls, module):
    """(attribute, function, is_property) of the public methods of `cls` written in `module` (its own and those of
    its bases in the module), `forward`, `__call__` and `__init__` included, without what @dataclass writes."""
    seen = set()
    for owner in cls.__mro__:
        if owner.__module__ != module.__name__:
            continue
        for attribute, member in vars(owner).items():
            if attribute.startswith("_") and attribute not in ("__call__", "__init__") or attribute in seen:
                continue
            is_property = isinstance(member, property)
            member = member.fget if is_property else member
            member = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
            if inspect.isfunction(member) and member.__code__.co_filename == module.__file__:
                seen.add(attribute)
                yield attribute, member, is_property


def public_functions():
    """{qualified name: (function, its class or None, is_property)} of everything the rule checks."""
    found = {}
    for package in (esm_gearnet.models, esm_gearnet.tasks):
        for module in _modules(package):
            for name, value in vars(module).items():
                if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                    continue
                if inspect.isfunction(value):
                    found[f"{module.__name__}.{name}"] = (value, None, False)
                elif inspect.isclass(value):
                    for attribute, function, is_property in _members(value, module):
                        found.setdefault(f"{module.__name__}.{function.__qualname__}", (function, value, is_property))
    return found


def _is_tensor_annotation(annotation, function) -> bool:
    """Rule 1a: the annotation (a string under `from __future__ import annotations`) names a tensor or a batch,
    directly or through an alias of the function's module (`Features`)."""
    if annotation is inspect.Parameter.empty:
        return False
    text = annotation if isinstance(annotation, str) else repr(annotation)
    if TENSOR.search(text):
        return True
    for word in re.findall(r"[A-Za-z_]\w*", text):
        alias = function.__globals__.get(word)
        if alias is not None and not inspect.isclass(alias) and typing.get_origin(alias) is not None \
                and TENSOR.search(repr(alias)):
            return True
    return False


def _overridden(function, cls):
    """The methods of the same name that `function` overrides in the bases of `cls`, nearest first."""
    name = function.__name__
    below = False
    for owner in cls.__mro__ if cls is not None else ():
        member = vars(owner).get(name)
        if member is None:
            continue
        member = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
        if below and inspect.isfunction(member):
            yield member
        if member is function:
            below = True


def tensor_parameters(function, cls=None):
    """The names of the tensor parameters of `function` (rule 1) and "return" for a tensor return (rule 2)."""
    names = []
    for name, parameter in inspect.signature(function).parameters.items():
        if name in ("self", "cls") or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.annotation is not parameter.empty:
            tensor = _is_tensor_annotation(parameter.annotation, function)
        else:
            inherited = [(base, inspect.signature(base).parameters.get(name)) for base in _overridden(function, cls)]
            inherited = [(base, p) for base, p in inherited if p is not None and p.annotation is not p.empty]
            tensor = bool(inherited) and _is_tensor_annotation(inherited[0][1].annotation, inherited[0][0])
        if tensor or name in TENSOR_NAMES:
            names.append(name)
    returns = inspect.signature(function).return_annotation
    if returns is inspect.Signature.empty:
        bases = [b for b in _overridden(function, cls) if inspect.signature(b).return_annotation is not
                 inspect.Signature.empty]
        tensor_return = bool(bases) and _is_tensor_annotation(inspect.signature(bases[0]).return_annotation, bases[0])
    else:
        tensor_return = _is_tensor_annotation(returns, function)
    if tensor_return or function.__name__ == "forward":
        names.append("return")
    return names


def _section(doc: str, header: str):
    """The lines of a `header:` section (`Args:`, `Returns:`) of a cleaned docstring, or None when it has none."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped == header + ":" or stripped.startswith(header + ": "):
            indent = len(line) - len(line.lstrip())
            if i == 0:  # a header on the docstring's first line lost its indentation: the entries' tell it
                indent = min([len(f) - len(f.lstrip()) for f in lines[1:] if f.strip()][:1] or [1]) - 1
            body = [stripped[len(header) + 1:].strip()] if stripped != header + ":" else []
            for following in lines[i + 1:]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                body.append(following)
            return body
    return None


def args_entries(doc: str):
    """{parameter name: the text of its `Args:` entry} (a grouped entry `a, b: text` gives both names the text)."""
    body = _section(doc, "Args")
    if body is None:
        return None
    entries, current, indent = {}, None, None
    for line in body:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        match = ENTRY.match(line.strip())
        if match and (indent is None or depth <= indent):
            indent = depth
            current = [match.group(2)]
            for name in re.split(r"\s*,\s*", match.group(1)):
                entries[name.lstrip("*")] = current
        elif current is not None:
            current.append(line.strip())
    return {name: " ".join(text) for name, text in entries.items()}


def missing_shapes(function, cls=None, is_property=False):
    """What the docstring of `function` lacks under the rule (rules 3 and 4); [] when nothing."""
    names = tensor_parameters(function, cls)
    if not names:
        return []
    doc = inspect.getdoc(function)
    if not doc and function.__name__ == "__init__" and cls is not None:
        doc = inspect.getdoc(cls)
    if not doc:
        return [f"no docstring, though it takes or returns tensors ({', '.join(names)})"]
    lacking = []
    parameters = [name for name in names if name != "return"]
    if parameters:
        entries = args_entries(doc)
        if entries is None:
            lacking.append(f"no Args: section for its tensor parameters ({', '.join(parameters)})")
        else:
            for name in parameters:
                if name not in entries:
                    lacking.append(f"Args: has no entry for {name}")
                elif not has_shape(entries[name]):
                    lacking.append(f"the Args: entry of {name} has no shape")
    if "return" in names:
        returns = [doc] if is_property else _section(doc, "Returns")
        if returns is None:
            lacking.append("no Returns: section, though it returns tensors")
        elif not has_shape("\n".join(returns)):
            lacking.append("the Returns: section has no shape")
    return lacking


def test_public_tensor_functions_of_models_and_tasks_say_their_shapes():
    found = public_functions()
    checked = {name for name, (function, cls, _) in found.items() if tensor_parameters(function, cls)}
    assert len(checked) > 60, f"the walk found {len(checked)} functions taking or returning tensors: too few"
    bad = {name: missing_shapes(*found[name]) for name in sorted(checked)}
    bad = {name: lacking for name, lacking in bad.items() if lacking}
    assert not bad, "\n".join(f"{name}: {'; '.join(lacking)}" for name, lacking in bad.items())


def test_the_walk_finds_every_module():
    names = {name.rsplit(".", 1)[0] for name in public_functions()} | {
        name.rsplit(".", 2)[0] for name in public_functions()}
    for module in ("esm_gearnet.models.gearnet", "esm_gearnet.models.encoder", "esm_gearnet.tasks.pretrain",
                   "esm_gearnet.tasks.base", "esm_gearnet.models.esm.encoder", "esm_gearnet.models.esm.tokens"):
        assert module in names
    # a method inherited from a private base is checked where it is written
    assert "esm_gearnet.tasks.pretrain._PathPrediction.sample_paths" in public_functions()


# ---- the rule must catch bad docstrings (otherwise the test above could pass by checking nothing) ------------
def _no_docstring(x: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    return x


def _no_args_section(x: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """[N, D] x doubled, x: [N, D]."""
    return 2 * x


def _entry_without_shape(x: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """Args:
        x: [N, D] features.
        y: the other features, indexed like x[i].
    Returns:
        [N, D]
    """
    return x + y


def _missing_entry(x: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """Args:
        x: [N, D] features.
    Returns:
        [N, D]
    """
    return x + y


def _no_returns_shape(x: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """Args:
        x: [N, D] features.
    Returns:
        the features doubled.
    """
    return 2 * x


def _names_in_a_list_are_no_shape(batch) -> None:
    """Args:
        batch: a dict with the keys ["graph", "targets"].
    """


def _good(x: "torch.Tensor", y: "Optional[torch.Tensor]", width: int) -> "torch.Tensor":  # noqa: F821
    """Args:
        x: [N, D] features.
        y: [N, D] the other features (optional),
            written over two lines.
        width: D; not a tensor, so it needs no shape.
    Returns:
        [N, D]
    """
    return x + y


def _good_grouped(batch, graph) -> None:
    """Args:
        batch, graph: {"graph": ProteinBatch [B proteins, N residues]} and a ProteinBatch [B, N].
    """


class _Base:
    def loss(self, pred: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
        """Args:
            pred, target: [B, T].
        Returns:
            [] the loss.
        """


class _Override(_Base):
    def loss(self, pred, target):
        """The loss of pred against target."""  # unannotated: inherits the base's tensors (rule 1b)


@pytest.mark.parametrize("text, shape", [
    ("[N, 3] positions", True), ("[]", True), ("[E', 3]", True), ("[N, node_h_dim[0]]", True),
    ("{\"graph\": ProteinBatch [B]}", True), ("indexed like x[i]", False), ("keys [\"graph\", \"targets\"]", False),
    ("names ['a', 'b']", False), ("no bracket", False)])
def test_what_counts_as_a_shape(text, shape):
    assert has_shape(text) == shape


@pytest.mark.parametrize("function, cls, lacking", [
    (_no_docstring, None, True), (_no_args_section, None, True), (_entry_without_shape, None, True),
    (_missing_entry, None, True), (_no_returns_shape, None, True), (_names_in_a_list_are_no_shape, None, True),
    (_Override.loss, _Override, True), (_good, None, False), (_good_grouped, None, False), (_Base.loss, _Base, False)])
def test_the_rule_catches_a_docstring_without_shapes(function, cls, lacking):
    assert bool(missing_shapes(function, cls)) == lacking, missing_shapes(function, cls)
