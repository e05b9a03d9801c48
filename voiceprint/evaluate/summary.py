"""One line per eval set from ``metrics.json``: what ``make run`` and ``voiceprint results`` print.

``dvc metrics show`` prints every key of every set on one very wide row; this keeps the numbers a
reader looks at first: EER with its 95 % interval, EER after AS-norm, minDCF, top-1 and the trials.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

COLUMNS = ("set", "EER % (95 % CI)", "AS-norm EER %", "minDCF 0.01", "top-1 %", "trials", "speakers")


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, int | float) else "-"


def _row(name: str, m: Mapping[str, Any]) -> list[str]:
    eer = _pct(m.get("eer"))
    if isinstance(m.get("eer_ci_low"), int | float) and isinstance(m.get("eer_ci_high"), int | float):
        eer += f" ({_pct(m['eer_ci_low'])}-{_pct(m['eer_ci_high'])})"
    dcf = m.get("min_dcf_p0.01")
    trials = m.get("n_trials")
    return [
        name,
        eer,
        _pct(m.get("eer_snorm")),
        f"{dcf:.3f}" if isinstance(dcf, int | float) else "-",
        _pct(m.get("top1")),
        f"{trials:,} ({m.get('trials', '?')})" if isinstance(trials, int) else "-",
        str(m.get("n_eval_speakers", "-")),
    ]


def metric_sets(metrics: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """``{set: block}``; a single-set file (the keys at the top level) is one set named ``-``."""
    if "eer" in metrics:
        return {"-": metrics}
    return {name: block for name, block in metrics.items() if isinstance(block, Mapping)}


def summary_table(metrics: Mapping[str, Any]) -> str:
    """A Markdown table, one row per set, headed by the model id."""
    sets = metric_sets(metrics)
    if not sets:
        raise ValueError("metrics.json holds no evaluation set")
    rows = [list(COLUMNS), ["---"] * len(COLUMNS)] + [_row(n, m) for n, m in sets.items()]
    model = next((m.get("model_id") for m in sets.values() if m.get("model_id")), None)
    lines = [f"model: {model}", ""] if model else []
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
