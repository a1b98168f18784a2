"""The one seam through which every check gets the implementation it judges: a SPEC resolved to a build callable.

A SPEC is `package.module:attr`, `path/to/file.py:attr`, or a built-in name (BUILTINS). `attr` is a callable
`build(standard, component)`: `standard` is a fresh copy of diffusers' standard component (in the dtype and on the
device of the check; the callable may change it in place and return it), `component` one of COMPONENTS. It returns
a module called like `standard` that returns what `standard` returns, or None for a component it does not provide.
The callable may carry `fused_modules` (names whose calls prove its fused path ran; () for an unfused one),
`layout` (of its fused parameters) and `precision` ("fp32": it computes in fp32 at best, as GPU kernels do, so its
fp64 runs are judged at fp32's floor) as attributes.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from verify.errors import VerifyError
from verify.implementations.spec_names import BUILTINS

COMPONENTS = ("attention", "block", "model")
DEFAULT_FUSED_MODULES = ("to_qkv", "add_qkv_proj", "to_added_qkv")
# What an implementation may declare it computes at, at best: "fp32" (fp64 runs judged at fp32's floor), or "fp64"
# (the same as declaring nothing).
DECLARABLE_PRECISIONS = ("fp64", "fp32")

Build = Callable[[nn.Module, str], "nn.Module | None"]


@dataclass(frozen=True)
class Implementation:
    """A resolved SPEC: its build callable, where it came from, and the module names that prove its fused path ran
    (empty: declared unfused)."""

    spec: str
    build: Build
    resolved: str
    source: str | None
    version: str | None
    fused_modules: tuple[str, ...]
    layout: str | None = None  # the layout its fused parameters use, when it declares one (else --layout says)
    precision: str | None = None  # the finest arithmetic it declares it computes at ("fp32"); None: fp64 as asked

    @property
    def fused(self) -> bool:
        return bool(self.fused_modules)

    def make(self, standard: nn.Module, component: str) -> nn.Module | None:
        """build(standard, component), checked: a module or None, else VerifyError naming the SPEC and component."""
        try:
            built = self.build(standard, component)
        except VerifyError:
            raise
        except Exception as e:  # the user's code failed: one line, never a traceback
            raise VerifyError(f"candidate {self.spec} ({component}): build raised {type(e).__name__}: {e}") from None
        if built is not None and not isinstance(built, nn.Module):
            raise VerifyError(f"candidate {self.spec} ({component}): build returned {type(built).__name__}, "
                              "not a torch.nn.Module or None")
        return built

    def describe(self) -> dict:
        """The summary.json object: what was asked for, what it resolved to, its file and package version."""
        return {"spec": self.spec, "resolved": self.resolved, "source": self.source, "version": self.version,
                "fused_modules": list(self.fused_modules) or None, "layout": self.layout,
                "precision": self.precision}


def resolve(spec: str | Build | Implementation, fused_modules: str | tuple[str, ...] | None = None,
            precision: str | None = None) -> Implementation:
    """The Implementation a SPEC (or a callable, or an Implementation) names; `fused_modules` overrides its default
    ('none': unfused), `precision` its declared precision ('fp64': none declared)."""
    if isinstance(spec, Implementation):
        impl = spec
    elif callable(spec):
        impl = _from_callable(getattr(spec, "__qualname__", repr(spec)), spec)
    else:
        if not isinstance(spec, str) or not spec.strip():
            raise VerifyError(f"candidate {spec!r}: expected a SPEC (module:attr, file.py:attr or a built-in name)")
        impl = _from_target(spec, BUILTINS.get(spec, spec))
    if fused_modules is not None:
        impl = replace(impl, fused_modules=parse_fused_modules(fused_modules))
    if precision is not None:
        impl = replace(impl, precision=_precision(impl.spec, precision, "--candidate-precision"))
    return impl


def resolve_reference(spec: str | Build | Implementation | None, standard_precision: str | None) -> Implementation:
    """The reference a SPEC names (None: diffusers' standard model), its precision that of its fp64 run, the oracle
    (`standard_precision`: the model's REFERENCE_PRECISION, for diffusers' own model)."""
    reference = resolve(spec or "diffusers")
    return replace(reference, precision=oracle_precision(reference, standard_precision))


def oracle_precision(reference: Implementation, standard_precision: str | None) -> str | None:
    """The finest arithmetic the reference's fp64 run, the oracle, computes at: for diffusers' own model what its
    model declares (`standard_precision`, verify.models' REFERENCE_PRECISION), for any other reference its own
    declaration."""
    return standard_precision if reference.spec == "diffusers" else reference.precision


def parse_fused_modules(text: str | tuple[str, ...]) -> tuple[str, ...]:
    """'to_qkv,add_qkv_proj' -> ('to_qkv', 'add_qkv_proj'); 'none' -> () (an unfused implementation)."""
    names = tuple(text) if isinstance(text, tuple) else tuple(t.strip() for t in text.split(",") if t.strip())
    if names == ("none",):
        return ()
    if not names or any(not n.replace("_", "").isalnum() for n in names):
        raise VerifyError(f"--fused-modules {text!r}: expected a comma list of module names, or none")
    return names


def _from_target(spec: str, target: str) -> Implementation:
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        known = ", ".join(BUILTINS)
        raise VerifyError(f"candidate {spec}: expected package.module:attr, path/to/file.py:attr or one of {known}")
    module = _load_file(spec, Path(where)) if where.endswith(".py") else _import(spec, where)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise VerifyError(f"candidate {spec}: {where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise VerifyError(f"candidate {spec}: {where}:{attr} is a {type(obj).__name__}, not a callable "
                          "build(standard, component)")
    impl = _from_callable(spec, obj)
    return replace(impl, resolved=f"{where}:{attr}", source=getattr(module, "__file__", None))


def _from_callable(spec: str, build: Build) -> Implementation:
    try:
        inspect.signature(build).bind(None, "block")
    except (TypeError, ValueError):
        raise VerifyError(f"candidate {spec}: build must take (standard, component)") from None
    module = sys.modules.get(getattr(build, "__module__", "") or "")
    fused = getattr(build, "fused_modules", DEFAULT_FUSED_MODULES)
    package = getattr(build, "package", None)  # an adapter names the distribution whose code it runs
    version = _distribution_version(package) if package else _version(module)
    return Implementation(spec, build, f"{getattr(build, '__module__', '?')}:{getattr(build, '__qualname__', '?')}",
                          getattr(module, "__file__", None), version, tuple(fused), getattr(build, "layout", None),
                          _precision(spec, getattr(build, "precision", None), "its precision attribute"))


def _precision(spec: str, value, where: str) -> str | None:
    """A declared precision, checked: 'fp32', or None ('fp64' and no declaration alike)."""
    if value not in (None, *DECLARABLE_PRECISIONS):
        raise VerifyError(f"candidate {spec}: {where} is {value!r}; expected one of "
                          f"{', '.join(DECLARABLE_PRECISIONS)}")
    return None if value in (None, "fp64") else value


def _import(spec: str, name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise VerifyError(f"candidate {spec}: no module {e.name!r} ({e})") from None
    except Exception as e:
        raise VerifyError(f"candidate {spec}: importing {name} raised {type(e).__name__}: {e}") from None


def _load_file(spec: str, path: Path):
    """Import a user's file as a module of its own (its folder on sys.path only while it loads, for its imports)."""
    if not path.is_file():
        raise VerifyError(f"candidate {spec}: no such file {path}")
    name = f"qkv_verify_candidate_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.resolve().parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise VerifyError(f"candidate {spec}: loading {path} raised {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


def _version(module) -> str | None:
    """The installed version of the distribution that provides `module` (None for a loose file)."""
    if module is None or not getattr(module, "__name__", None):
        return None
    top = module.__name__.split(".")[0]
    return next(filter(None, map(_distribution_version, importlib.metadata.packages_distributions().get(top, []))),
                None)


def _distribution_version(dist: str) -> str | None:
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return None
