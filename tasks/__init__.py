"""Prefect tasks: coarse, idempotent wrappers that call one stage each."""
