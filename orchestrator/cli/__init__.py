"""The ``shpeft`` command line (click): each command parses its options, calls one function of the
library, prints and exits (0 ok, 1 a failed run, 2 invalid input). Nothing imports the CLI.

One module per command group: ``main`` (the group and its ``add_command`` lines), ``common`` (exit
codes, ``fail``, the console, job file loading, shared options), ``jobs`` (run, compare, validate,
schema), ``cluster`` (submit, status, logs), ``results`` (list, show, report), ``predict`` (predict,
export), ``serve``, ``demo``, ``tasks`` (tasks list, tasks check).
"""
