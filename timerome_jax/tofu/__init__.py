"""The TOFU benchmark: data, metrics, evaluation and reports."""
