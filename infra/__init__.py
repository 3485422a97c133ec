"""Command line, run-time set-up and file helpers shared by every stage."""
