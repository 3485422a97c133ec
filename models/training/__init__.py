"""Training loops: few-step subject fine-tuning (and, later, stage-2 pre-training)."""
