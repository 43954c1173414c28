"""Comparing finished runs (`mtlrun-compare`): reading them, the table, statistics, figures and the report page."""
