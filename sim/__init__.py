"""Simulation core: scenario config, world state, scoring engine, the Mesa model, run store."""
