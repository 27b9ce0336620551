"""GPU workers: RQ consumers that load a model once and stream jobs' output to Redis."""
