"""DeepRAFT with randomized smoothing: the scanner learns to tell [x, x'] apart under Gaussian noise,
[x, x'] + N(0, std²), so that it can be certified with `python -m smoothing.certify` at sigma = std.

    python train_rs.py --run_name rs050 --max_step 200000 --std 0.5 --train_path PATH/mirflickr
"""
from engine import build_parser, run_cli
from engine.cli import positive_float
from smoothing import gaussian_noise_view


def main(argv=None):
    parser = build_parser(__doc__)
    parser.add_argument_group("randomized smoothing").add_argument(
        "--std", type=positive_float, default=0.5,
        help="std σ of the Gaussian noise added to the scanner's input, in [0,1] pixel units (the paper: 0.25, "
             "0.5, 0.75); certify with the same sigma")
    args = parser.parse_args(argv)
    return run_cli(parser, args, gaussian_noise_view(args.std))


if __name__ == "__main__":
    main()
