"""One module per qkv-verify subcommand: its arguments and its run (verify.cli dispatches). May import every layer
below; nothing imports it but verify.cli."""
