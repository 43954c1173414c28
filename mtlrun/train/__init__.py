"""Training: build the parts of a run from the config (build), train epoch by epoch (loop, epoch), evaluate
and report (evaluate)."""
