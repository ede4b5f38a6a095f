"""Mixed precision under a budget: units and candidates, the measurement, the exact solver, recipes."""
