"""How it is judged: fixtures, cases, tolerance, comparison, the runners (equivalence, streaming, report), claims.
Imports verify.maths, verify.files and verify.implementations."""
