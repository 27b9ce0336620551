"""``transformers serve`` for row (d), runnable where ``accelerate`` is not installed.

transformers' serve CLI always loads its model with ``device_map=<--device>``, and transformers
refuses any device map without ``accelerate``. For ``--device cpu`` a device map changes nothing
(the model loads on the CPU anyway), so when ``accelerate`` is missing this launcher drops a
plain "cpu" device map before running the unchanged CLI: ``python -m bench.hf_serve ARGS`` is
``transformers serve ARGS``.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any


def accelerate_installed() -> bool:
    return importlib.util.find_spec("accelerate") is not None


def _patch_cpu_device_map() -> None:
    import transformers.modeling_utils as modeling_utils

    # modeling_utils imports the function without re-exporting it (mypy's attr-defined), and
    # from_pretrained looks it up there: it is replaced there.
    original = modeling_utils.check_and_set_device_map  # type: ignore[attr-defined]

    def check(device_map: Any) -> Any:
        if device_map == "cpu" or device_map == {"": "cpu"}:
            return None
        return original(device_map)

    modeling_utils.check_and_set_device_map = check  # type: ignore[attr-defined]


def main() -> int:
    if not accelerate_installed():
        _patch_cpu_device_map()
    from transformers.cli.transformers import main as cli_main

    sys.argv = ["transformers", "serve", *sys.argv[1:]]
    result = cli_main()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
