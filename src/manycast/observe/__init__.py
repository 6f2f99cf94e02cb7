"""The operator's view of a running pool: metrics, captures and the live web dashboard."""
