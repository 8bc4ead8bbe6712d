"""DeepRAFT with randomized smoothing and augmentation: on top of the clean pair [x, x'] and the noisy one
[x, x'] + N(0, std²), the scanner learns L_A^DA on clamp(chain([x, x'])) + N(0, std²), where the chain applies
a random subset of corruptions (rotation, crop, colour jitter, blurs, perspective, noise, resize, JPEG) in
random order with per-sample parameters. Its strength and its weight ramp from 0 at --aug_start to 1 at
--aug_end.

    python train_rs_aug.py --run_name rs_aug --max_step 200000 --std 0.5 --aug_start 5000 --aug_end 100000
"""
from augment import CORRUPTIONS, StochasticChain
from augment.view import augmented_noisy_view
from engine import build_parser, plain_view, run_cli
from engine.cli import non_negative_int, probability
from engine.training import combine_views
from smoothing import add_std_flag, gaussian_noise_view


def parse(argv=None):
    """(parser, args, views): the flags and the views this script trains on (bench.py times them too)."""
    parser = build_parser(__doc__)
    group = parser.add_argument_group("randomized smoothing and augmentation")
    add_std_flag(group)
    group.add_argument("--aug_start", type=non_negative_int, default=5_000,
                       help="step at which the augmented view starts, at strength and weight 0")
    group.add_argument("--aug_end", type=non_negative_int, default=100_000,
                       help="step from which the augmented view has full strength (the training preset's ranges, "
                            "see README) and weight 1 in L_A")
    group.add_argument("--augs", default="all",
                       help=f"comma-separated corruptions for the chain, or 'all': {', '.join(CORRUPTIONS)}")
    group.add_argument("--aug_prob", type=probability, default=0.5,
                       help="probability that the chain applies each corruption to each image")
    args = parser.parse_args(argv)
    if args.aug_end < args.aug_start:
        parser.error(f"--aug_end ({args.aug_end}) must not be before --aug_start ({args.aug_start})")
    try:
        chain = StochasticChain.from_names(args.augs, preset="train", p=args.aug_prob)
    except ValueError as e:
        parser.error(f"--augs: {e}")
    views = combine_views(plain_view, gaussian_noise_view(args.std),
                          augmented_noisy_view(chain, args.std, args.aug_start, args.aug_end))
    return parser, args, views


def main(argv=None):
    return run_cli(*parse(argv))


if __name__ == "__main__":
    main()
