"""Recommender policies: classic, matrix factorisation, pipelines, re-rankers and LLM stages."""
