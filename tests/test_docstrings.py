"""Shapes in docstrings: every public function and method of `esm_gearnet.models` and `esm_gearnet.tasks` that
takes or returns tensors says their shapes, in the design notes' letters (B proteins, N residues, L padded length,
E edges, R relations, D channels; others where needed, said in place), as `data/protein.py` does.

The rule checked: a public function (or method, `forward` included) defined in one of those modules whose
signature names a tensor or a batch (a parameter or return annotated `Tensor`, `ProteinBatch`, `Features`, or a
container of them; an unannotated parameter of a name the package gives only to tensors, `TENSOR_NAMES`) has a
docstring, and that docstring holds a shape (`[...]`) for each such
parameter it names, or at least one shape when it names none (a `Returns:` or one sentence for everything)."""
import importlib
import inspect
import pkgutil
import re

import pytest

import esm_gearnet.models
import esm_gearnet.tasks

TENSOR = re.compile(r"\b(Tensor|ProteinBatch|Features)\b")
# parameters that hold tensors or batches wherever the package uses these names, annotated or not
TENSOR_NAMES = {"x", "pos", "frames", "residue_number", "num_residues", "batch", "graph", "pred", "target",
                "scores", "feature", "input", "edge_list", "residue_mask", "sequence", "structure"}
# [N, 3], [B], [n, T], [W + 1], [] (a scalar): brackets not after a name (indexing) and without quotes (keys)
SHAPE = re.compile(r"(?<![\w\]])\[[^\[\]\n\"'`]*\]")


# state dicts (parameter name -> a tensor of that parameter's shape), not batch tensors
STATE_DICTS = {"esm_gearnet.models.esm.hugging_face.read_weights", "esm_gearnet.models.esm.hugging_face.to_fair_esm"}


def _modules():
    for package in (esm_gearnet.models, esm_gearnet.tasks):
        yield package
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            yield importlib.import_module(info.name)


def _public_functions(module):
    """(qualified name, function) of every public function and method defined in `module`."""
    for name, value in vars(module).items():
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(value):
            yield f"{module.__name__}.{name}", value
        elif inspect.isclass(value):
            for attribute, member in vars(value).items():
                member = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                if inspect.isfunction(member) and (not attribute.startswith("_") or attribute == "__init__") \
                        and member.__code__.co_filename == module.__file__:  # not made by @dataclass
                    yield f"{module.__name__}.{name}.{attribute}", member


def _tensor_names(function):
    """The parameters (and "return") whose annotation is a tensor, a batch or a container of them."""
    names = [name for name, p in inspect.signature(function).parameters.items() if name not in ("self", "cls") and (
        TENSOR.search(str(p.annotation)) if p.annotation is not p.empty else name in TENSOR_NAMES)]
    returns = inspect.signature(function).return_annotation
    if returns is not inspect.Signature.empty and TENSOR.search(str(returns)):
        names.append("return")
    return names


def missing_shapes(function):
    """What the docstring of `function` lacks under the rule above ([] when nothing)."""
    names = _tensor_names(function)
    if not names:
        return []
    doc = inspect.getdoc(function)
    if not doc:
        return [f"no docstring, though it takes or returns {', '.join(names)}"]
    lacking = []
    for name in names:
        if name == "return":
            continue
        mentions = [m.start() for m in re.finditer(rf"(?<![\w.]){re.escape(name)}\b", doc)]
        if mentions and not any(SHAPE.search(doc[m:m + 200].split("\n    ")[0]) or SHAPE.search(
                doc[m:doc.find("\n", m) if doc.find("\n", m) > 0 else len(doc)]) for m in mentions):
            lacking.append(f"{name} is named without a shape")
    if not SHAPE.search(doc):
        lacking.append("no shape anywhere in the docstring")
    return lacking


def test_public_tensor_functions_of_models_and_tasks_say_their_shapes():
    found = {name: missing_shapes(function) for module in _modules() for name, function in _public_functions(module)
             if name not in STATE_DICTS}
    assert len(found) > 50, "the walk found too few functions: the test would check nothing"
    bad = {name: lacking for name, lacking in found.items() if lacking}
    assert not bad, "\n".join(f"{name}: {'; '.join(lacking)}" for name, lacking in sorted(bad.items()))


def _no_docstring(x: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    return x


def _no_shape(x: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """Doubles x."""
    return 2 * x


def _shape_elsewhere(x: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """Args:
        x: [N, D] features.
        y: the other features.
    Returns:
        [N, D]
    """
    return x + y


def _good(x: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """Args:
        x: [N, D] features.
        y: [N, D] the other features.
    Returns:
        [N, D]
    """
    return x + y


@pytest.mark.parametrize("function, lacking", [(_no_docstring, True), (_no_shape, True), (_shape_elsewhere, True),
                                               (_good, False)])
def test_the_rule_catches_a_docstring_without_shapes(function, lacking):
    assert bool(missing_shapes(function)) == lacking
