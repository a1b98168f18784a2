"""The packaged suite's session: the shared Hypothesis profiles and determinism (its fixtures come from the
qkv-verify pytest plugin)."""

from verify.suite.setup import deterministic, load_profile

load_profile()
deterministic()


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "qkv_model(name): the property is of that model (verify.models)")


def pytest_collection_modifyitems(config, items) -> None:
    """Only the properties of the model --qkv-model names are run; the others are deselected, as -k would."""
    model = config.getoption("--qkv-model")
    other = [i for i in items if i.get_closest_marker("qkv_model").args[0] != model]
    if other:
        config.hook.pytest_deselected(items=other)
        items[:] = [i for i in items if i not in other]
