"""The ``shpeft`` command line (click): each command parses its options, calls one function of the
library, prints and exits (0 ok, 1 a failed run, 2 invalid input). Nothing imports the CLI."""
