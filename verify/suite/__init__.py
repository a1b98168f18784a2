"""The candidate property suite that ships with the package: `qkv-verify test SPEC` runs it (verify.commands.test)."""
