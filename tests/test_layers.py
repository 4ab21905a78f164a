"""The package's layers import one way (README, "Code map"):

    pipeline -> train | esc -> formats -> core

``train`` and ``esc`` sit side by side and never import each other; ``esc/metrics`` uses numpy and
the strategy names only, so ``import decesc.metrics`` never imports torch. Every import statement
of every module is parsed (including imports inside functions), so the rule cannot be broken by
a lazy import either.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "decesc"

# layer -> the decesc layers it may import (itself included)
ALLOWED = {
    "core": {"core"},
    "formats": {"core", "formats"},
    "train": {"core", "formats", "train"},
    "esc": {"core", "formats", "esc"},
    "pipeline": {"core", "formats", "train", "esc", "pipeline"},
    "metrics": {"esc"},  # decesc.metrics: the public name of decesc.esc.metrics
}
# third-party packages a layer may use (the standard library is always fine)
THIRD_PARTY = {"torch", "tokenizers", "safetensors", "huggingface_hub", "numpy", "tqdm"}
CORE_THIRD_PARTY = {"torch", "tokenizers"}
METRICS_ALLOWED = {"decesc.esc.strategies", "decesc.esc.metrics"}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        yield rel, ast.parse(path.read_text(encoding="utf-8"), str(path))


def imported(tree: ast.AST, rel: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the module."""
    out = []
    package = ["decesc", *rel.parts[:-1]]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.append((node.lineno, name))
    return out


def layer_of(rel: Path) -> str | None:
    return rel.parts[0] if len(rel.parts) > 1 else None


def test_imports_point_one_way():
    bad = []
    for rel, tree in modules():
        layer = layer_of(rel)
        if layer is None:  # decesc/__init__.py: lazy names only, checked below
            continue
        for line, name in imported(tree, rel):
            top = name.split(".")[0]
            if top == "decesc":
                parts = name.split(".")
                target = parts[1] if len(parts) > 1 else None
                if target not in ALLOWED[layer]:
                    bad.append(f"decesc/{rel}:{line}: {layer} imports {name}")
                if rel.parts[:2] == ("esc", "metrics") and not name.startswith(tuple(METRICS_ALLOWED)):
                    bad.append(f"decesc/{rel}:{line}: esc/metrics imports {name} (numpy and strategies only)")
            elif top in THIRD_PARTY:
                if layer == "core" and top not in CORE_THIRD_PARTY:
                    bad.append(f"decesc/{rel}:{line}: core imports {top} (torch and tokenizers only)")
                if rel.parts[:2] == ("esc", "metrics") and top != "numpy":
                    bad.append(f"decesc/{rel}:{line}: esc/metrics imports {top} (numpy only)")
            elif top not in sys.stdlib_module_names and top != "__future__":
                bad.append(f"decesc/{rel}:{line}: imports {top}, not a runtime dependency")
    assert not bad, "imports that point the wrong way:\n" + "\n".join(bad)


def test_every_module_belongs_to_a_layer():
    layers = {layer_of(rel) for rel, _ in modules()} - {None}
    assert layers == set(ALLOWED)


@pytest.mark.parametrize("module", ["decesc", "decesc.metrics", "decesc.esc.metrics"])
def test_metrics_do_not_import_torch(module):
    code = (f"import sys, {module}; from decesc.metrics import preference_bias; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_short_names():
    from decesc import dpo_loss, load_pretrained, sequence_logprobs  # noqa: F401
    from decesc.metrics import (macro_f1, preference, preference_bias, strategy_confusion,  # noqa: F401
                                text_metrics, weighted_f1)
