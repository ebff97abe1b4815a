"""The demo and its stand-ins for the upstream tools: ``trainingd demo`` (:mod:`.run`: its tree in
:mod:`.tree`, its live line in :mod:`.narrate`, its live-accuracy act in :mod:`.live`, its
closing tour in :mod:`.tour`), the reviewer and crop-tool simulator (:mod:`.simulator`, also
``python -m daemon.demo.simulator``, each group's draws in :mod:`.groups`) and reviewer-like
sample data (:mod:`.sample`).

Nothing the daemon runs in production imports this package: the decisions contract, the store
and the settings never do (``tests/test_layering.py`` holds that).  Importing the package itself
is cheap; :mod:`.run` pulls in the service only when the demo runs.
"""
