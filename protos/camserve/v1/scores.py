"""The faithfulness scores' wire enum values, names and reading, shared by client and server.

Names are the engine's (`camserve.server.engine.faithfulness.SCORES`), so a score keeps one name
from the engine to the SDK. Definitions are in explain.proto, on the Heatmap fields.
"""

from __future__ import annotations

from camserve.v1 import explain_pb2 as pb

# Wire value by name, in enum order.
SCORE_BY_NAME: dict[str, int] = {
    "confidence_change": pb.SCORE_CONFIDENCE_CHANGE,
    "deletion_auc": pb.SCORE_DELETION_AUC,
    "insertion_auc": pb.SCORE_INSERTION_AUC,
}
NAME_BY_SCORE: dict[int, str] = {value: name for name, value in SCORE_BY_NAME.items()}
# The scores that come with a curve (S + 1 probabilities) when OutputOptions.score_curves is set,
# and the Heatmap field of each curve. Each score's own Heatmap field has the score's name.
CURVE_FIELDS: dict[str, str] = {
    "deletion_auc": "deletion_curve",
    "insertion_auc": "insertion_curve",
}
CURVE_SCORES: tuple[str, ...] = tuple(CURVE_FIELDS)
# Which way is more faithful: a higher confidence change (less of a drop), a lower deletion
# area (the class vanishes fast), a higher insertion area (it appears fast).
HIGHER_IS_BETTER: dict[str, bool] = {
    "confidence_change": True,
    "deletion_auc": False,
    "insertion_auc": True,
}
# Steps of the deletion and insertion curves when a request leaves score_steps at 0; the
# engine's `faithfulness.DEFAULT_STEPS` (a test keeps them equal).
DEFAULT_SCORE_STEPS = 20
# The fewest steps a curve can have (the engine's `faithfulness.check_steps` lower bound).
MIN_SCORE_STEPS = 1
