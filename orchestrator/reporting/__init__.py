"""Human-readable results: the job report (``job_report``), the comparison report (``compare_report``)
and the PNGs both use (``plots``). Reports read the store; they never train or evaluate."""
