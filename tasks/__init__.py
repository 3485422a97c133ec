"""The units of work that flows and commands run, each a pydantic config and a plain function: generate,
edit, interpolate, finetune, pre-training, DreamBooth, the DreamBench evaluation; and the Prefect task
wrappers (``prefect_tasks``, the one module here that imports Prefect)."""
