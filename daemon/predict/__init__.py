"""Predictions for new groups and the live accuracy of every champion (issue 13, items 2-3).

Rooms: :mod:`.grouping` (the upstream's grouping rule, ported), :mod:`.scoring` (the champion
ranker and crop proposer on vectors), :mod:`.store` (trainingd's own
``data/ai_data/predictions/<project>.db``: never a live decision DB), :mod:`.run` (one
prediction pass), :mod:`.live` (matching reviews to earlier predictions), :mod:`.cli`.
"""
