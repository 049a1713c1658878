"""One module per `moekit` subcommand: `add_arguments(parser)` and `run(args)`."""
