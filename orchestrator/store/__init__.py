"""The store: ``layout`` builds every path under a store and reads back what it writes (pointers, sweep
summaries); ``results`` is the catalogue of finished tasks (Parquet per job). A path in the store is
built here and nowhere else."""
