"""Should a challenger replace the champion? Only when it is not worse on the figures users hear.

Auto-promotion (smoke) used to make every version that passed its gates the champion, so a quick
smoke run could replace a model trained for an hour. Now the challenger's quality figures are set
beside the champion's: a figure worse by more than its tolerance (run-to-run noise) blocks the
promotion, and the comparison goes into the sign-off report either way. A control share is
counted over few judged replies (32 for the speaker sweep of 8 turns), so one reply judged
otherwise is noise too: its tolerance is at least one reply's share. And a figure is only compared
when the same judge's weights measured both sides: a judge retrained on other data (a new corpus,
more training audio) gives the champion's figures no verdict until it is re-evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# (flat metric name as registered, higher is better, tolerance: differences within it are noise)
PROMOTION_FIGURES: tuple[tuple[str, bool, float], ...] = (
    ("codec.stoi", True, 0.01),
    ("codec.pesq_wb", True, 0.05),
    ("quality.codec_roundtrip.cer", False, 0.02),
    ("quality.replies.cer", False, 0.02),
    ("quality.replies.intelligibility_cer", False, 0.02),
    ("quality.replies.emotion_control", True, 0.03),
    ("quality.replies.speaker_control", True, 0.03),
    ("quality.replies.dnsmos_p808", True, 0.05),
)
# a figure -> the judge that measured it (tasks/evaluation/model_quality.load_judges): figures of two
# versions judged by different weights (a judge retrained on other data) are not comparable
JUDGE_OF: dict[str, str] = {
    "quality.codec_roundtrip.cer": "asr",
    "quality.replies.cer": "asr",
    "quality.replies.intelligibility_cer": "asr",
    "quality.replies.emotion_control": "emotion",
    "quality.replies.speaker_control": "speaker",
}
# a share -> how many judged replies it is counted over (tasks/evaluation/model_quality.judge)
JUDGED_COUNTS: dict[str, str] = {
    "quality.replies.emotion_control": "quality.replies.emotion_judged",
    "quality.replies.speaker_control": "quality.replies.speaker_judged",
}


@dataclass(frozen=True)
class FigureComparison:
    metric: str
    challenger: float | None
    champion: float | None
    higher_is_better: bool
    tolerance: float
    same_judge: bool = True  # False: the champion's figure was measured by another judge's weights

    @property
    def verdict(self) -> str:
        """better, same (within tolerance), worse, not compared (the champion lacks it), or other
        judge (measured by different judges: no verdict, and no auto-promotion on it)."""
        if self.champion is None:
            return "not compared"
        if not self.same_judge:
            return "other judge"
        if self.challenger is None:
            return "worse"      # a figure the challenger did not measure cannot be taken on trust
        gain = (self.challenger - self.champion) * (1 if self.higher_is_better else -1)
        return "better" if gain > self.tolerance else "worse" if gain < -self.tolerance else "same"


@dataclass(frozen=True)
class PromotionDecision:
    champion_version: str | None
    rows: tuple[FigureComparison, ...]

    @property
    def promote(self) -> bool:
        return not any(row.verdict in ("worse", "other judge") for row in self.rows)

    @property
    def reason(self) -> str:
        if self.champion_version is None:
            return "no champion yet"
        worse = [r for r in self.rows if r.verdict == "worse"]
        other = [r.metric for r in self.rows if r.verdict == "other judge"]
        if not worse and not other:
            return f"not worse than champion version {self.champion_version} on any compared figure"
        reasons = []
        if worse:
            reasons.append(f"worse than champion version {self.champion_version} on " + ", ".join(
                f"{r.metric} ({'-' if r.challenger is None else f'{r.challenger:.4g}'} vs {r.champion:.4g})"
                for r in worse))
        if other:
            reasons.append(f"{', '.join(other)} of champion version {self.champion_version} were measured by other "
                           "judges (re-evaluate it with this corpus's judges: `s2s eval --model champion`)")
        return "; ".join(reasons)

    def to_dict(self) -> dict[str, Any]:
        return {"champion_version": self.champion_version, "promote": self.promote, "reason": self.reason,
                "rows": [{"metric": r.metric, "challenger": r.challenger, "champion": r.champion,
                          "verdict": r.verdict} for r in self.rows]}


def compare_with_champion(challenger: dict[str, float], champion: dict[str, float] | None,
                          champion_version: str | None, challenger_judges: dict[str, str] | None = None,
                          champion_judges: dict[str, str] | None = None) -> PromotionDecision:
    """Compare flat metrics (`codec.stoi`, `quality.replies.cer`, ...); no champion: promote.
    The judges ({"emotion": run id, ...}) say which weights measured each side's figures; a judge
    known on both sides and different makes its figures "other judge"."""
    if champion is None:
        return PromotionDecision(None, ())
    differ = other_judges(challenger_judges or {}, champion_judges or {})
    return PromotionDecision(champion_version, tuple(
        FigureComparison(metric, challenger.get(metric), champion.get(metric), higher,
                         max(tolerance, one_reply(metric, challenger, champion)), JUDGE_OF.get(metric) not in differ)
        for metric, higher, tolerance in PROMOTION_FIGURES))


def other_judges(mine: dict[str, str], theirs: dict[str, str]) -> list[str]:
    """The judges of JUDGE_OF whose weights differ between two sides ({"asr": run id, ...}),
    sorted; a judge unknown on either side is not counted."""
    return sorted(j for j in set(JUDGE_OF.values()) if mine.get(j) and theirs.get(j) and mine[j] != theirs[j])


def judges_from_tags(tags: dict[str, str]) -> dict[str, str]:
    """{"asr": run id, "emotion": ..., "speaker": ...} from a version's `evaluator.<judge>_run_id` tags."""
    return {key[len("evaluator."):-len("_run_id")]: value for key, value in tags.items()
            if key.startswith("evaluator.") and key.endswith("_run_id") and value not in ("", "None")}


def one_reply(metric: str, challenger: dict[str, float], champion: dict[str, float]) -> float:
    """The share one judged reply makes of `metric` (the fewer replies of the two evaluations),
    0 for a figure that is not a share of replies or whose counts were not recorded."""
    counts = [figures[JUDGED_COUNTS[metric]] for figures in (challenger, champion)
              if metric in JUDGED_COUNTS and figures.get(JUDGED_COUNTS[metric], 0) > 0]
    return 1.0 / min(counts) + 1e-9 if counts else 0.0


def figures_from_tags(tags: dict[str, str]) -> dict[str, float]:
    """The flat metrics a registered version carries as tags (written with 4 significant digits)."""
    figures = {}
    for metric in [m for m, _, _ in PROMOTION_FIGURES] + list(JUDGED_COUNTS.values()):
        try:
            figures[metric] = float(tags[metric])
        except (KeyError, ValueError):
            continue
    return figures
