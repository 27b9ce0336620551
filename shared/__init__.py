"""Pieces shared by the front (api/) and the workers (worker/): settings, schemas, Redis keys."""
