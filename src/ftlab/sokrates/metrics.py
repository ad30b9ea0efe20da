"""Loop metrics: pass@k, calibration (expected calibration error, reliability diagrams), trace summaries,
and the plot across iterations.

pass@k is the unbiased estimator of Chen et al. (2021): with n samples of which c are correct,
    pass@k = 1 - C(n - c, k) / C(n, k)
(the chance that k samples drawn without replacement from the n include a correct one), averaged over
problems; computed as a product so large n does not overflow.

ECE over `bins` equal-width bins of [0, 1] (the last bin includes 1.0):
    ECE = sum over bins b of (n_b / N) * |mean outcome_b - mean probability_b|
for probabilities of the outcome being 1 (a step is valid; the stated answer is right).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float | None:
    values = [pass_at_k(n, c, k) for n, c in counts if n >= k]
    return sum(values) / len(values) if values else None


def reliability(probs: list[float], outcomes: list[bool], bins: int = 10) -> list[dict[str, Any]]:
    """Per bin: [lo, hi), count, mean probability, observed frequency (None for an empty bin)."""
    table = [{"lo": b / bins, "hi": (b + 1) / bins, "n": 0, "p_sum": 0.0, "y_sum": 0.0} for b in range(bins)]
    for p, y in zip(probs, outcomes):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability {p} is outside [0, 1]")
        row = table[min(int(p * bins), bins - 1)]
        row["n"] += 1
        row["p_sum"] += p
        row["y_sum"] += float(y)
    out = []
    for row in table:
        n = row["n"]
        out.append({"lo": row["lo"], "hi": row["hi"], "n": n, "confidence": row["p_sum"] / n if n else None,
                    "frequency": row["y_sum"] / n if n else None})
    return out


def ece(probs: list[float], outcomes: list[bool], bins: int = 10) -> float | None:
    total = len(probs)
    if not total:
        return None
    return sum(r["n"] / total * abs(r["frequency"] - r["confidence"]) for r in reliability(probs, outcomes, bins)
               if r["n"])


def reliability_diagram(table: list[dict[str, Any]], out: Path, title: str) -> Path:
    """Observed frequency per bin against the diagonal, bar width = bin, bin counts written on the bars."""
    from ftlab.runs.report import plt

    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    filled = [r for r in table if r["n"]]
    bars = ax.bar([r["lo"] for r in filled], [r["frequency"] for r in filled],
                  width=[r["hi"] - r["lo"] for r in filled], align="edge", alpha=0.7, edgecolor="k", label="observed")
    ax.bar_label(bars, labels=[str(r["n"]) for r in filled], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def trace_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Answer accuracy, step validity (valid steps / all steps), fully valid traces, over records."""
    n = len(records)
    steps = sum(len(r["step_valid"]) for r in records)
    return {"traces": n,
            "answer_accuracy": sum(r["answer_correct"] for r in records) / n if n else None,
            "step_validity": sum(sum(r["step_valid"]) for r in records) / steps if steps else None,
            "fully_valid": sum(r["fully_valid"] for r in records) / n if n else None,
            "steps": steps}


def pass_counts(records: list[dict[str, Any]], key: str) -> list[tuple[int, int]]:
    """(samples, correct ones) per problem, `key` being 'answer_correct' or 'fully_valid'."""
    by: dict[Any, list[bool]] = {}
    for r in records:
        by.setdefault(r["problem"], []).append(bool(r[key]))
    return [(len(v), sum(v)) for v in by.values()]


def plot_iterations(rows: list[dict[str, Any]], out: Path, title: str = "OaK loop: held-out problems") -> Path:
    """One figure: the held-out rates of every iteration (0 = the starting policy), pass@k included."""
    from ftlab.runs.report import plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    its = [r["iteration"] for r in rows]
    keys = ["answer_accuracy", "step_validity", "fully_valid"] + sorted({k for r in rows for k in r if "pass@" in k})
    for key in keys:
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax.plot(its, [float("nan") if v is None else v for v in values], "o-", label=key)
    ax.set_xticks(its)
    ax.set_xlabel("iteration")
    ax.set_ylabel("rate")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
