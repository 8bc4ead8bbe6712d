"""DeepRAFT with randomized smoothing and augmentation: the scanner learns the noisy pair [x, x'] + N(0, std²)
(weight rs_w) and L_A^DA on clamp(chain([x, x'])) + N(0, std²), whose weight ramps linearly from 0 at --aug_start
to 1 at --aug_end (aug_w times faster). The original chain applies jitter, crop, blur, rotation, perspective and
JPEG in that order, each with probability aug_prb per batch; the stochastic chain (--recipe robust) a random
subset of corruptions in random order with per-sample parameters, its strength ramping with the weight, and the
plain pair as a third view.

    python train_rs_aug.py --run_name rs_aug --max_step 200000 --std 0.5 --aug_start 5000 --aug_end 100000
"""
from augment.view import augmentation_chain, augmented_noisy_view
from engine import build_parser, plain_view, run_cli
from engine.cli import RecipeGroup, add_aug_flags, non_negative_float, non_negative_int, on_off, parse as parse_flags

from engine.training import combine_views
from smoothing import add_std_flag, gaussian_noise_view


def parse(argv=None):
    """(parser, args, views): the flags and the views this script trains on (bench.py times them too)."""
    parser = build_parser(__doc__, "train_rs_aug")
    group = parser.add_argument_group("randomized smoothing and augmentation")
    add_std_flag(group)
    add_aug_flags(parser, group)
    g = RecipeGroup(parser, group, "train_rs_aug")
    g.add("--aug_start", type=non_negative_int, help="step at which the augmented view's weight starts rising from 0")
    g.add("--aug_end", type=non_negative_int,
          help="step at which the augmented view's weight reaches 1 (with aug_w = 1)")
    g.add("--aug_w", type=non_negative_float,
          help="slope of the weight ramp: min(aug_w·(step - aug_start)/(aug_end - aug_start), 1), as the original")
    g.add("--aug_strength_ramp", type=on_off,
          help="on: the corruptions' strength follows the weight ramp too (gentle at first); off: full strength "
               "from aug_start")
    g.add("--plain_ce", type=on_off, help="on: the plain pair [x, x'] is a third view in L_A (weight rs_w)")
    args = parse_flags(parser, argv)
    try:
        chain = augmentation_chain(args, kind="rs_aug")
    except ValueError as e:
        parser.error(f"--augs: {e}")
    views = [gaussian_noise_view(args.std, args.rs_w),
             augmented_noisy_view(chain, args.std, args.aug_start, args.aug_end, args.aug_w, args.aug_strength_ramp,
                                  args.aug_downscale, args.aug_resample)]
    if args.plain_ce:
        views.insert(0, plain_view(args.rs_w))
    return parser, args, combine_views(*views)


def main(argv=None):
    return run_cli(*parse(argv))


if __name__ == "__main__":
    main()
