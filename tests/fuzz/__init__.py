"""Fuzzers for pynbd: a stateful fuzzer against the server and a hostile server against the
clients. docs/fuzzing.md says how to run them and what each covers; ``scripts/fuzz`` runs a
long run, and the tests in this directory run bounded ones."""
