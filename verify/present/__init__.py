"""Presentation: the report's tables, charts and HTML template. Imports verify.checks and below."""
