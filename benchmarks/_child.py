"""Child process of the harness: builds one case, measures it, prints one JSON line."""

from __future__ import annotations

import json
import sys

from . import _harness
from .ops import load_cases


def main() -> None:
    request = json.loads(sys.argv[1])
    import torch

    dtype = request["key"].split("|")[3]
    dtype = getattr(torch, dtype)
    cases = [*load_cases(request["op"], request["device"], dtype, quick=False),
             *load_cases(request["op"], request["device"], dtype, quick=True)]
    case = next((c for c in cases if c.key == request["key"]), None)
    if case is None:
        print(json.dumps({"status": "error", "reason": f"case {request['key']} not found"}))
        return
    try:
        fn = case.setup(request["mode"])
    except _harness.Skip as skip:
        print(json.dumps({"status": "skipped", "reason": str(skip)}))
        return
    result = _harness.measure(fn, request["device"], request["repeat"], request["warmup"], request["min_time"])
    result["status"] = "ok"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
