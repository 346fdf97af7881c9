"""shpeft_core."""
