"""The packaged suite's session: the shared Hypothesis profiles and determinism (its fixtures come from the
qkv-verify pytest plugin)."""

from verify.suite.setup import deterministic, load_profile

load_profile()
deterministic()
