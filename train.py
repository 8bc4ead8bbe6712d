"""Baseline DeepRAFT: the scanner learns to tell [x, x'] apart as they are (no noise). With --aug, also under a
chain of corruptions (Table 1's "Plain+DA"): CE(plain) + CE(chain(x), chain(x')).

    python train.py --run_name baseline --max_step 200000 --train_path PATH/mirflickr
    python train.py --run_name plain_da --max_step 200000 --aug --train_path PATH/mirflickr
    python train.py --recipe robust --run_name demo --image_size 64 --scanner narrow     (small crops, CPU)
"""
from augment.view import augmentation_chain, augmented_view
from engine import build_parser, plain_view, run_cli
from engine.cli import add_aug_flags, parse as parse_flags
from engine.training import combine_views


def parse(argv=None):
    """(parser, args, views): the flags and the views this script trains on (bench.py times them too)."""
    parser = build_parser(__doc__, "train")
    add_aug_flags(parser, parser.add_argument_group("augmentation (Plain+DA)"))
    args = parse_flags(parser, argv)
    views = plain_view(args.rs_w)
    if args.aug:
        try:
            chain = augmentation_chain(args, kind="plain_da")
        except ValueError as e:
            parser.error(f"--augs: {e}")
        views = combine_views(views, augmented_view(chain, args.rs_w, args.aug_downscale, args.aug_resample))
    return parser, args, views


def main(argv=None):
    return run_cli(*parse(argv))


if __name__ == "__main__":
    main()
