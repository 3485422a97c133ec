"""``blipdiff eval`` on DreamBench: config and job planning, the run, its Ray actors, the DreamBooth baseline, scoring, history, report and the catalog of generations."""
