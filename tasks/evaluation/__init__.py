"""Judging a candidate: the gates, the latency measurement, and the model-quality evaluation with
its evaluators (MOS predictors, the CTC recognizer and the classifiers, trained here)."""
