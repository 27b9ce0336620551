"""The job store: everything streamq writes to and reads from Redis about a job.

- ``vocabulary``: statuses, event names, finish reasons and the job hash's field names.
- ``payloads``: the typed data of each event in a job's stream, and its JSON encoding.
- ``scripts``: the Lua scripts that move a job's state, each with the typed function that
  builds its KEYS and ARGV; its docstring follows one job from submit to end.
- ``records``: the job hash the front creates, and the public view read back from it.

The key names themselves are in ``shared.keys``.
"""
