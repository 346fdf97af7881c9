"""Human-readable results: the job report (``job_report``), the comparison report (``compare_report``,
its paired statistics in ``compare_stats`` over ``stats``) and the PNGs both use (``plots``). Reports read the store; they never train or evaluate."""
