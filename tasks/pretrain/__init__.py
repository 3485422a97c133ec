"""Stage-2 pre-training: its config and run folder, the loop one worker runs, and the Ray Train launch."""
