"""The base every layer stands on: the config schema, the error type, run-folder files."""
