"""House rules that keep the code walkable: the linter is clean and every import runs down a floor (the contracts
in pyproject.toml: nodes/cli/testing > sampling > loaders > quant > models > errors; provenance aside; no circles)."""

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tool(name):
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return found


def test_ruff_is_clean():
    result = subprocess.run([tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_imports_run_down_the_floors_without_circles():
    result = subprocess.run([tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def unannotated(function):
    """Parameters (and the return) of `function` without a type hint."""
    signature = inspect.signature(function)
    missing = [name for name, p in signature.parameters.items()
               if name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               and p.annotation is inspect.Parameter.empty]
    if function.__name__ != "__init__" and signature.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


def test_the_public_api_is_annotated():
    import klein_nodes as kn
    from klein_nodes.models.autoencoder import AutoEncoder
    from klein_nodes.models.safety import ImageSafety, PromptSafety
    from klein_nodes.models.text_encoder import KleinTextEncoder
    from klein_nodes.models.transformer import Flux2

    functions = [getattr(kn, name) for name in kn.__all__ if inspect.isfunction(getattr(kn, name))]
    functions += [kn.quant.dequantize, kn.KleinPipeline.__init__, kn.KleinPipeline.__call__,
                  kn.KleinPipeline.encode_prompt, kn.KleinPipeline.encode_images, kn.KleinPipeline.decode,
                  KleinTextEncoder.encode, AutoEncoder.encode, AutoEncoder.decode, Flux2.forward,
                  PromptSafety.__call__, PromptSafety.check, ImageSafety.classify, ImageSafety.screen]
    assert len(functions) > 25
    gaps = {f.__qualname__: unannotated(f) for f in functions if unannotated(f)}
    assert not gaps, gaps


def test_node_entry_points_are_annotated(comfyui):
    from klein_nodes.nodes import NODE_CLASS_MAPPINGS

    missing = []
    for key, node in NODE_CLASS_MAPPINGS.items():
        methods = {"INPUT_TYPES": node.INPUT_TYPES, node.FUNCTION: getattr(node, node.FUNCTION)}
        if hasattr(node, "VALIDATE_INPUTS"):
            methods["VALIDATE_INPUTS"] = node.VALIDATE_INPUTS
        for name, method in methods.items():
            signature = inspect.signature(method)  # follows the reporting wrapper's __wrapped__ to the method
            missing += [f"{key}.{name}({p})" for p in signature.parameters.values()
                        if p.name != "self" and p.annotation is inspect.Parameter.empty]
            if signature.return_annotation is inspect.Signature.empty:
                missing.append(f"{key}.{name} -> ?")
    assert len(NODE_CLASS_MAPPINGS) > 15 and not missing, missing
