"""The tests' and benchmarks' harness, not part of what users install: fronts and workers
started as a user starts them (``python -m streamq ...``), private Redis servers, and a
Sentinel-managed Redis whose failures the failover tests and the chaos benchmark make."""
