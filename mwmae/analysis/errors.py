"""The analysis' one error type."""


class AnalysisError(ValueError):
    """Input the analysis cannot use; the message names the file and what to do instead."""
