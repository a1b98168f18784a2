"""Module names of the Qwen-Image attention projections, standard and fused, in the two fused namings, and the fused
row layouts (torch-free: the command line's choices come from here)."""

from __future__ import annotations

from dataclasses import dataclass

from verify.errors import VerifyError


@dataclass(frozen=True)
class Stream:
    """One attention stream: its three standard projections and the name of its fused projection."""

    name: str  # "image" | "text"
    q: str
    k: str
    v: str
    fused: str

    @property
    def separate(self) -> tuple[str, str, str]:
        return (self.q, self.k, self.v)


# naming -> (image stream, text stream). "seed": the write-up and nunchaku; "diffusers": Attention.fuse_projections.
NAMINGS: dict[str, tuple[Stream, Stream]] = {
    "seed": (
        Stream("image", "to_q", "to_k", "to_v", "to_qkv"),
        Stream("text", "add_q_proj", "add_k_proj", "add_v_proj", "add_qkv_proj"),
    ),
    "diffusers": (
        Stream("image", "to_q", "to_k", "to_v", "to_qkv"),
        Stream("text", "add_q_proj", "add_k_proj", "add_v_proj", "to_added_qkv"),
    ),
}
DEFAULT_NAMING = "seed"
LAYOUTS = ("blocked", "interleaved")  # fused q/k/v row orders; verify.maths.qkv implements them


def streams(naming: str) -> tuple[Stream, Stream]:
    """The (image, text) streams of a naming, or VerifyError naming the valid ones."""
    try:
        return NAMINGS[naming]
    except KeyError:
        raise VerifyError(f"unknown naming {naming!r}; expected one of {', '.join(NAMINGS)}") from None


def detect_naming(module_names: set[str]) -> str:
    """The naming whose fused text projection appears among `module_names` (leaf names such as 'to_added_qkv'); for
    a model of one stream (a fused to_qkv and no text-stream projection at all: Qwen-Image 2.1) the namings agree, and
    the default one is returned."""
    found = [n for n, (_, text) in NAMINGS.items() if text.fused in module_names]
    text_names = {name for _, text in NAMINGS.values() for name in (*text.separate, text.fused)}
    if not found and NAMINGS[DEFAULT_NAMING][0].fused in module_names and not module_names & text_names:
        return DEFAULT_NAMING
    if len(found) != 1:
        raise VerifyError(
            "cannot tell the fused naming: expected exactly one of "
            + ", ".join(f"'{t.fused}' ({n})" for n, (_, t) in NAMINGS.items())
            + f", found {found or 'none'}"
        )
    return found[0]
