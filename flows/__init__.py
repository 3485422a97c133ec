"""Prefect flows: thin orchestration over the stage code in blipdiff.datasets."""
