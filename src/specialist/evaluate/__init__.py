"""Evaluate stage: scorers, statistics, gates, forgetting, the report (`runner.evaluate_run`).

Generation itself is shared with export and serving: `specialist.generation`.
"""
