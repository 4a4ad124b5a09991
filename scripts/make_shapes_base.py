"""Packs the built-in task's pretrained base from a from-scratch demo into the package
(jaxpref/tasks/shapes/assets/base: model files, jaxpref_base.json, a model card):

    jaxpref demo --from-scratch --until pretrain2 --out runs/base
    python scripts/make_shapes_base.py runs/base [--out jaxpref/tasks/shapes/assets/base]

`jaxpref demo` then starts from it (its tower, pretrain and pretrain2 stages take the base instead of
running); `jaxpref demo --from-scratch` runs them again.
"""

from __future__ import annotations

import argparse
import json

from jaxpref.tasks.shapes.demo import BASE_DIR, write_base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("demo_dir", help="a `jaxpref demo --from-scratch` output directory that finished pretrain2")
    p.add_argument("--out", default=BASE_DIR, help=f"where the base goes (default: {BASE_DIR})")
    p.add_argument("--commit", default=None,
                   help="the commit the demo ran at (default: the one its summary.json records, else HEAD)")
    args = p.parse_args()
    info = write_base(args.demo_dir, args.out, commit=args.commit)
    print(json.dumps({k: info[k] for k in ("command", "commit", "stages")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
