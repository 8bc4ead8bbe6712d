"""PNG plots from results.json: accuracy against ε per attack, certified accuracy against radius, ROC."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def attack_plot(results: dict, path: Path) -> Path | None:
    attacks = (results.get("table3") or {}).get("attacks")
    if not attacks:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for attack, by_eps in attacks.items():
        eps = [max(r["eps"] * 255, 0.5) for r in by_eps.values()]  # ε = 0 drawn at 0.5 on the log axis
        line, = ax.plot(eps, [100 * r["acc"] for r in by_eps.values()], marker="o", label=f"{attack} overall")
        ax.plot(eps, [100 * r["acc_stamped"] for r in by_eps.values()], ls="--", color=line.get_color(),
                alpha=0.6, label=f"{attack} stamped")
    ax.set(xscale="log", xlabel="ε (L∞, /255)", ylabel="accuracy under attack (%)", ylim=(-2, 102),
           title="Adversarial robustness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def certification_plot(results: dict, path: Path) -> Path | None:
    cert = results.get("certification")
    if not cert:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for group in ("all", "clean", "stamped"):
        radii = [float(r) for r in cert[group]]
        ax.plot(radii, [100 * v for v in cert[group].values()], marker="o", label=group)
    ax.set(xlabel="L2 radius ([0,1] pixel units)", ylabel="certified accuracy (%)", ylim=(-2, 102),
           title=f"Certified accuracy, σ = {cert['sigma']}")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def roc_plot(results: dict, path: Path) -> Path | None:
    cal = results["calibration"]
    if not cal:  # a scanner-only model: no stamped photos, no ROC
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([max(f, 1e-4) for f in cal["roc"]["fpr"]], cal["roc"]["tpr"], drawstyle="steps-post",
            label=f"no corruption, AUC {cal['auc']:.4f}")
    for point in cal["operating_points"]:
        ax.scatter([max(point["fpr"], 1e-4)], [point["tpr"]], zorder=3,
                   label=f"threshold for FPR ≤ {100 * point['target_fpr']:g}%"
                         f"{'' if point['backed'] else ' (not backed)'}")
    ax.set(xscale="log", xlim=(1e-4, 1), ylim=(-0.02, 1.02), xlabel="false-positive rate (clean read as stamped)",
           ylabel="true-positive rate", title="ROC of the scanner's score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def write_plots(results: dict, out: Path) -> list[Path]:
    made = [attack_plot(results, out / "attack_accuracy.png"),
            certification_plot(results, out / "certified_accuracy.png"), roc_plot(results, out / "roc.png")]
    return [p for p in made if p is not None]
