"""Accuracy vs image tokens for the toy model (one line per method, stock LLaVA as a reference line)."""

from __future__ import annotations


def accuracy_plot(results, path, title: str = "Toy LLaVA (synthetic shapes), held-out accuracy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluate import test_split
    from .scenes import chance_accuracy

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=110)
    groups: dict[str, list] = {}
    for result in results:
        if result.setting.kind == "llava":
            axes.axhline(100 * result.accuracy, color="black", linestyle="--", linewidth=1,
                         label=f"stock LLaVA, {result.mean_tokens:.0f} tokens ({100 * result.accuracy:.1f}%)")
            continue
        family = result.setting.kind if "sign False" not in result.setting.label else "trim (sign False)"
        groups.setdefault(family, []).append(result)
    styles = {
        "visionzip": ("tab:blue", "o", "VisionZip (fixed budget)"),
        "visionzip-tuned": ("tab:green", "*", "VisionZip, tuned projector"),
        "trim": ("tab:red", "s", "TRIM (mean tokens; sign True)"),
        "trim (sign False)": ("tab:orange", "^", "TRIM, sign False"),
        "prumerge": ("tab:purple", "D", "PruMerge / PruMerge+ (mean tokens)"),
    }
    for family, members in groups.items():
        color, marker, label = styles.get(family, ("gray", "x", family))
        members = sorted(members, key=lambda r: r.mean_tokens)
        linestyle = "-" if family == "visionzip" else "none"
        axes.plot([r.mean_tokens for r in members], [100 * r.accuracy for r in members], marker=marker,
                  color=color, linestyle=linestyle, label=label)
    questions = test_split().questions
    axes.axhline(100 * chance_accuracy(questions), color="gray", linestyle=":", linewidth=1, label="chance")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("image tokens seen by the language model (log scale)")
    axes.set_ylabel("accuracy on the held-out split (%)")
    axes.set_ylim(0, 100)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
