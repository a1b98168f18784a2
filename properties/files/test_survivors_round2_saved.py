"""The call an engine rebuilds from an inputs folder, for the survivors of the second mutation run
(reports/mutation/verdicts-messages-writes.txt) in verify/files/saved.py: a complex tensor (RoPE's frequencies) comes
back complex, as README.txt says ({"complex": true}: torch.view_as_complex of the saved real view)."""

from __future__ import annotations

import torch
from safetensors.torch import load

from verify.files import saved


def test_complex_tensors_come_back_complex_alone_and_in_tuples():
    """Kills x_decode_call__mutmut_7 (never view_as_complex) and _12 (the flag read as "COMPLEX"): a call's complex
    tensors, saved as their real view, decode to the same complex values, alone and inside a tuple; a real tensor
    and a plain value come back as they were."""
    g = torch.Generator().manual_seed(0)
    img, txt, alone = (torch.polar(torch.ones(n, 4, dtype=torch.float64), torch.rand(n, 4, generator=g,
                                                                                       dtype=torch.float64))
                       for n in (6, 2, 3))
    hidden = torch.randn(1, 6, 8, generator=g, dtype=torch.float64)
    call = {"hidden_states": hidden, "image_rotary_emb": (img, txt), "freqs": alone, "txt_seq_lens": [2]}
    tensors, kwargs = saved.encode_call(call, torch.float64)
    back = saved.decode_call(kwargs, load(saved.tensor_bytes(tensors)))  # through the bytes written to the file
    assert back["freqs"].dtype == torch.complex128 and torch.equal(back["freqs"], alone)
    assert [t.dtype for t in back["image_rotary_emb"]] == [torch.complex128] * 2
    assert all(torch.equal(a, b) for a, b in zip(back["image_rotary_emb"], (img, txt)))
    assert torch.equal(back["hidden_states"], hidden)
    assert back["txt_seq_lens"] == (2,)  # a list of scalars comes back as the tuple diffusers passes
