"""`case_for`: every case of every model is found again from its own component, config and fixture (those named, not
picked, aside), and the drawn flags pick the case that computes them."""

from __future__ import annotations

import pytest

from verify import models
from verify.checks.cases import case_for
from verify.errors import VerifyError
from verify.models import qwen_image

# model -> the cases case_for never returns: a way of calling (the 2.1 KV cache) or a flag set that rides on the
# drawn config of another case (Layered)
NAMED_ONLY = {"qwen-image": {"model-layered"}, "qwen-image-2.1": {"attention-cache", "model-cache"}}


@pytest.mark.parametrize("model", sorted(models.MODELS))
def test_every_case_is_found_from_its_own_config_and_fixture(model):
    cases = models.load(model).CASES
    assert NAMED_ONLY[model] <= set(cases)
    for name, case in cases.items():
        if name not in NAMED_ONLY[model]:
            assert case_for(case.component, case.config, case.spec, model=model) is case, name


@pytest.mark.parametrize("component, zero_cond_t, edit, name", [
    ("attention", True, True, "attention"),
    ("block", False, True, "block"),
    ("block", True, False, "block-edit-zero-cond"),  # Edit-2511's block, whatever the images
    ("model", False, False, "model-text-to-image"),
    ("model", True, False, "model-text-to-image"),  # the flag rides on the drawn config
    ("model", False, True, "model-edit"),
    ("model", True, True, "model-edit-zero-cond"),
])
def test_drawn_flags_pick_the_qwen_image_case(component, zero_cond_t, edit, name):
    config = qwen_image.model_config("small", zero_cond_t=zero_cond_t)
    assert case_for(component, config, qwen_image.InputSpec(batch=1, edit=edit)).name == name


def test_layered_flags_ride_on_the_drawn_case():
    config = qwen_image.model_config("tiny", use_layer3d_rope=True, use_additional_t_cond=True)
    assert case_for("model", config, qwen_image.InputSpec(edit=True)).name == "model-edit"


def test_an_unknown_component_or_model_is_refused():
    config, spec = qwen_image.model_config("tiny"), qwen_image.InputSpec()
    with pytest.raises(ValueError, match="component 'mlp'"):
        case_for("mlp", config, spec)
    with pytest.raises(VerifyError, match="unknown model 'flux'"):
        case_for("block", config, spec, model="flux")
