"""The `mnpo` command line: one subcommand per job.

Each subcommand is a function ``_cmd_<name>(args) -> int`` registered in
``_build_parser``; imports of heavy modules happen inside the command so that
``mnpo --help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("mnpo")


def _cmd_synth(args: argparse.Namespace) -> int:
    from mnpo.data.synthetic import PRESETS, write_synthetic_dataset

    if args.preset not in PRESETS:
        raise SystemExit(f"mnpo synth: unknown preset {args.preset!r}; choose from {sorted(PRESETS)}")
    summary = write_synthetic_dataset(
        out=Path(args.out),
        preset=args.preset,
        seed=args.seed,
        image_size=args.image_size,
        num_classes=args.classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        test_per_class=args.test_per_class,
    )
    for split, count in summary.items():
        log.info("%s: %d images", split, count)
    print(f"wrote synthetic '{args.preset}' set to {args.out}: "
          + ", ".join(f"{split} {n}" for split, n in summary.items()))
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnpo",
        description="MNPO / MNPOs weakly supervised object localization toolkit.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = sub.add_parser(
        "synth",
        help="write a synthetic WSOL data set in the wsolevaluation layout",
        description="Write a deterministic synthetic WSOL data set (images, masks and "
        "metadata for train/val/test) in the wsolevaluation layout.",
    )
    synth.add_argument("--out", required=True, help="output folder (created)")
    synth.add_argument("--preset", default="parts", help="'shapes' (easy) or 'parts' (class given by a small mark)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--image-size", type=int, default=224, help="image side in pixels (default 224)")
    synth.add_argument("--classes", type=int, default=4, help="number of classes (default 4)")
    synth.add_argument("--train-per-class", type=int, default=40, help="training images per class (default 40)")
    synth.add_argument("--val-per-class", type=int, default=5, help="val images per class, fully supervised (default 5)")
    synth.add_argument("--test-per-class", type=int, default=20, help="test images per class (default 20)")
    synth.set_defaults(func=_cmd_synth)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
