"""The model seam: only verify.models knows a diffusers model's classes, and every model module answers the same
questions."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import verify
from verify import models
from verify.errors import VerifyError

ROOT = Path(verify.__file__).parent
# a diffusers model, block, embedding or pipeline class, or the module that defines one
MODEL_CLASS = re.compile(r"^(Qwen\w*|\w*Transformer2DModel|\w*Pipeline|apply_rotary_emb_\w+)$")
MODEL_MODULE = re.compile(r"^diffusers\.(models\.transformers|pipelines)(\.|$)")


def model_class_imports(tree: ast.AST) -> list[str]:
    """Every diffusers model class or model module `tree` imports or reaches as `diffusers.X`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusers"):
            if MODEL_MODULE.match(node.module):
                found.append(node.module)
            found += [a.name for a in node.names if MODEL_CLASS.match(a.name)]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if MODEL_MODULE.match(a.name)]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "diffusers"
              and MODEL_CLASS.match(node.attr)):
            found.append(f"diffusers.{node.attr}")
    return found


def test_no_module_outside_verify_models_imports_a_diffusers_model_class():
    outside = [p for p in ROOT.rglob("*.py") if ROOT / "models" not in p.parents]
    assert len(outside) > 40  # the whole library is scanned
    offenders = {str(p.relative_to(ROOT)): names for p in outside
                 if (names := model_class_imports(ast.parse(p.read_text())))}
    assert offenders == {}


@pytest.mark.parametrize("source, names", [
    ("from diffusers import QwenImageTransformer2DModel", ["QwenImageTransformer2DModel"]),
    ("from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen",
     ["diffusers.models.transformers.transformer_qwenimage", "apply_rotary_emb_qwen"]),
    ("import diffusers.pipelines.qwenimage", ["diffusers.pipelines.qwenimage"]),
    ("import diffusers\ndiffusers.QwenImagePipeline", ["diffusers.QwenImagePipeline"]),
    ("from diffusers.models.attention_processor import Attention", []),
    ("from diffusers.hooks.tensor_parallel import PackedColwiseParallel", []),
])
def test_the_seam_check_sees_each_way_of_reaching_a_model_class(source, names):
    assert model_class_imports(ast.parse(source)) == names


def test_the_seam_holds_for_verify_models_own_modules_only_by_exemption():
    """The model modules do import diffusers' classes: the scan above would flag them, so it is not vacuous."""
    assert model_class_imports(ast.parse((ROOT / "models" / "qwen_image.py").read_text()))


@pytest.mark.parametrize("name", list(models.MODELS))
def test_every_model_module_answers_the_seams_questions(name):
    module = models.load(name)
    assert set(module.CONFIGS) >= {"tiny", "small", "full"}
    assert {case.component for case in module.CASES.values()} == {"attention", "block", "model"}
    assert module.FIXTURES
    assert models.from_class_name(module.CLASS_NAME) == name


def test_an_unknown_model_is_one_line_naming_the_known_ones():
    with pytest.raises(VerifyError, match=r"unknown model 'qwen-image-9'; expected one of qwen-image"):
        models.load("qwen-image-9")
