"""Which registry case runs a component on a drawn config and input spec: `case_for`, the one mapping from (component,
config flags, spec) to a model's case, for the property tests and the packaged suite (they draw sizes and flags, then
need the case whose name, builder and gradients fit them; run_case takes the drawn config and spec)."""

from __future__ import annotations

from verify.models import DEFAULT_MODEL, load
from verify.models.cases import Case


def _qwen_image(component: str, config: dict, spec) -> str:
    """Edit-2511's zero_cond_t has its own block and edit-model cases; a reference image (spec.edit), the edit ones.
    Layered's flags ride on whichever case this is (model-layered is that flag set at its own fixture)."""
    zero_cond = config.get("zero_cond_t", False)
    if component == "attention":
        return "attention"
    if component == "block":
        return "block-edit-zero-cond" if zero_cond else "block"
    if not spec.edit:
        return "model-text-to-image"
    return "model-edit-zero-cond" if zero_cond else "model-edit"


def _qwen_image_21(component: str, config: dict, spec) -> str:
    """Condition images (spec.conditions) make an edit; side by side (spec.adjacent) and causal_condition=False have
    their own cases. The KV-cache cases are another way of calling, not drawn sizes: they are named, never picked."""
    causal = config.get("causal_condition", True)
    if component == "attention":
        return "attention-adjacent" if spec.adjacent else "attention"
    if component == "block":
        return "block" if causal else "block-no-causal-condition"
    if not spec.conditions:
        return "model-text-to-image"
    if spec.adjacent:
        return "model-edit-adjacent"
    return "model-edit" if causal else "model-edit-no-causal-condition"


_RULES = {"qwen-image": _qwen_image, "qwen-image-2.1": _qwen_image_21}


def case_for(component: str, config: dict, spec, *, model: str = DEFAULT_MODEL) -> Case:
    """The case of `model`'s CASES that runs `component` ("attention", "block" or "model") for a drawn diffusers
    `config` and input `spec` (the model's InputSpec); run it with that config and spec."""
    if component not in ("attention", "block", "model"):
        raise ValueError(f"component {component!r}: expected attention, block or model")
    cases = load(model).CASES  # VerifyError naming the models there are
    return cases[_RULES[model](component, config, spec)]
