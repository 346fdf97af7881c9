"""Ray as shpeft uses it: connecting and sizing (``resources``), the warm worker pool, the progress board
and console, every task's log in the store (``tasklog``), and the Jobs API client that submits a job file
to a cluster (``jobs_api``). The stages and workflows run on top of this; nothing here knows a method."""
