"""How it is judged: tolerance, comparison, the runners (equivalence, streaming, report), claims; the fixtures and
cases they run are each model's, in verify.models. Imports verify.models, verify.maths, verify.files and
verify.implementations."""
