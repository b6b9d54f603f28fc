"""Analysis: metric functions, per-cycle metric components, plots and comparisons."""
