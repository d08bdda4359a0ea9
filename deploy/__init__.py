"""Packaging the Lambda functions: one zip per function, for its architecture (``./dev package``)."""
