"""`make lock`: write constraints.txt, the exact versions of every dependency and extra,
from the report of a dry-run `pip install --report` (pip's own resolver, no extra tool)."""
from __future__ import annotations

import json
import sys


def main(report_path: str, out_path: str) -> int:
    with open(report_path) as f:
        report = json.load(f)
    pins = sorted(f"{item['metadata']['name']}=={item['metadata']['version']}"
                  for item in report["install"] if item["metadata"]["name"] != "atomicfs")
    with open(out_path, "w") as f:
        f.write("# Written by `make lock`: exact versions of every dependency and extra;\n"
                "# every pip install of the Makefile uses it (pip -c).\n")
        f.write("\n".join(pins) + "\n")
    print(f"wrote {out_path}: {len(pins)} packages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
